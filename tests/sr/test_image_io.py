"""Collecting, loading, naming and atomically writing images."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="image I/O needs Pillow (the [model] extra)")

from mor_model.sr.image_io import (  # noqa: E402
    ImageReadError,
    collect_images,
    drop_earlier_outputs,
    iter_images,
    load_image,
    plan_outputs,
    save_image,
)


def _rgb(h=6, w=7, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png16(path, arr: np.ndarray) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB)."""
    h, w, c = arr.shape
    color_type = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_collect_files_and_folders_case_insensitive(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.BMP", "f.tif", "g.TIFF", "notes.txt", ".hidden.png"]:
        (d / name).write_bytes(b"x")
    (d / "sub" / "h.png").write_bytes(b"x")
    single = tmp_path / "single.Png"
    single.write_bytes(b"x")
    res = collect_images([d, single, d / "a.jpg", tmp_path / "missing.png", d / "notes.txt"])
    names = [p.name for p in res.files]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.BMP", "f.tif", "g.TIFF", "single.Png"]
    assert res.roots[0] == d and res.roots[-1] is None
    reasons = {p.name: r for p, r in res.errors}
    assert "no such file" in reasons["missing.png"] and "unsupported" in reasons["notes.txt"]
    rec = collect_images(d, recursive=True)
    assert [p.name for p in rec.files][-1] == "h.png" and len(rec.files) == 8
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect_images([empty]).errors and not collect_images([empty]).files


def test_load_rgb_grey_rgba_palette(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "pal.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")

    x = load_image(tmp_path / "rgb.png")
    assert x.shape == (3, 6, 7) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(rgb))
    g = load_image(tmp_path / "grey.png")
    assert g.shape == (3, 6, 7) and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert torch.allclose(g[0] * 255, torch.from_numpy(rgb[..., 0]).float())
    assert torch.equal(load_image(tmp_path / "rgba.png"), x)  # alpha dropped, colours as stored
    p = load_image(tmp_path / "pal.png")
    assert p.shape == (3, 6, 7) and 0 <= p.min() and p.max() <= 1
    la = load_image(tmp_path / "la.png")
    assert torch.allclose(la, g)


def test_load_16bit(tmp_path):
    grey = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7, 1) * 1500
    _png16(tmp_path / "g16.png", grey)
    g = load_image(tmp_path / "g16.png")
    assert g.shape == (3, 6, 7)
    torch.testing.assert_close(g[0], torch.from_numpy(grey[..., 0].astype(np.float32) / 65535.0))
    rgb = np.arange(6 * 7 * 3, dtype=np.uint16).reshape(6, 7, 3) * 700
    _png16(tmp_path / "c16.png", rgb)
    c = load_image(tmp_path / "c16.png")  # Pillow gives 8-bit precision for 16-bit RGB
    assert c.shape == (3, 6, 7)
    assert (c.permute(1, 2, 0) - torch.from_numpy(rgb.astype(np.float32) / 65535.0)).abs().max() < 1 / 255 + 1e-6


def test_load_float_and_exif_orientation(tmp_path):
    f = np.linspace(0, 1, 42, dtype=np.float32).reshape(6, 7)
    Image.fromarray(f).save(tmp_path / "f.tiff")
    t = load_image(tmp_path / "f.tiff")
    torch.testing.assert_close(t[1], torch.from_numpy(f))
    rgb = _rgb(4, 9)
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    r = load_image(tmp_path / "rot.jpg")
    assert r.shape == (3, 9, 4)


def test_corrupt_files_are_reported_and_others_still_load(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_rgb()).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    (tmp_path / "dir.png").mkdir()
    results = list(iter_images([trunc, good, junk, tmp_path / "gone.png", tmp_path / "dir.png"]))
    assert [r[0].name for r in results] == ["trunc.png", "good.png", "junk.jpg", "gone.png", "dir.png"]
    assert results[1][1] is not None and results[1][2] is None
    for i in (0, 2, 3, 4):
        assert results[i][1] is None and isinstance(results[i][2], ImageReadError)
        assert results[i][0].name in str(results[i][2])
    with pytest.raises(ValueError, match="junk.jpg"):
        load_image(junk)


def test_plan_outputs_never_overwrites_inputs_and_avoids_collisions(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ["a.png", "a.jpg", "b.webp", "sub/c.png"]:
        Image.fromarray(_rgb()).save(d / name)
    col = collect_images([d], recursive=True)
    # writing next to the inputs, no suffix: a.png would be an input -> renamed
    plans = plan_outputs(col, d)
    outs = {p.input.name: p.output for p in plans}
    inputs = {p.resolve() for p in col.files}
    assert all(p.output.resolve() not in inputs for p in plans)
    assert len({p.output for p in plans}) == len(plans)
    assert outs["a.png"] == d / "a_png.png" and outs["a.jpg"] == d / "a_jpg.png"
    assert outs["b.webp"] == d / "b.png" and outs["c.png"] == d / "sub" / "c_png.png"
    # to another folder: plain names, sub-folders kept, the second "a" gets its extension
    o = tmp_path / "out"
    plans = plan_outputs(col, o, suffix="_x4")
    assert [p.output.relative_to(o).as_posix() for p in plans] == [
        "a_x4.png",
        "a_png_x4.png",
        "b_x4.png",
        "sub/c_x4.png",
    ]
    assert not any(p.skip for p in plans)
    save_image(torch.rand(3, 4, 4), plans[0].output)
    again = plan_outputs(col, o, suffix="_x4")
    assert [p.skip for p in again] == [True, False, False, False]
    assert not any(p.skip for p in plan_outputs(col, o, suffix="_x4", overwrite=True))
    # a name a previous rule would pick is itself an input: the counter takes over
    e = tmp_path / "e"
    e.mkdir()
    for name in ["x.png", "x_png.png"]:
        Image.fromarray(_rgb()).save(e / name)
    outs = [p.output.name for p in plan_outputs(collect_images([e]), e)]
    assert "x.png" not in outs and "x_png.png" not in outs and len(set(outs)) == 2
    # names differing only in case count as the same file (case-insensitive file systems)
    u = tmp_path / "u"
    u.mkdir()
    Image.fromarray(_rgb()).save(u / "P.PNG")
    assert plan_outputs(collect_images([u]), u)[0].output.name == "P_png.png"
    with pytest.raises(ValueError, match="ext"):
        plan_outputs(col, o, ext=".gif")


def _names(col, base):
    return sorted(f.relative_to(base).as_posix() for f in col.files)


def test_earlier_outputs_are_not_inputs_again(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ["p.png", "q.jpg", "sub/r.png"]:
        Image.fromarray(_rgb()).save(d / name)
    col = collect_images([d], recursive=True)
    # -o equal to the scanned folder without a suffix: outputs could not be told from inputs -> refused
    with pytest.raises(ValueError, match="suffix"):
        drop_earlier_outputs(col, d)
    with pytest.raises(ValueError, match="suffix"):
        drop_earlier_outputs(collect_images([d]), d)
    # with a suffix: simulate three runs; the set of inputs and outputs stays the same after the first
    for _ in range(3):
        kept, dropped = drop_earlier_outputs(collect_images([d], recursive=True), d, suffix="_x4")
        assert _names(kept, d) == ["p.png", "q.jpg", "sub/r.png"]
        for plan in plan_outputs(kept, d, suffix="_x4"):
            if not plan.skip:
                save_image(torch.rand(3, 4, 4), plan.output)
    assert sorted(dropped) == sorted([d / "p_x4.png", d / "q_x4.png", d / "sub" / "r_x4.png"])
    assert sorted(f.relative_to(d).as_posix() for f in d.rglob("*.png")) == [
        "p.png", "p_x4.png", "q_x4.png", "sub/r.png", "sub/r_x4.png",
    ]  # fmt: skip
    assert all(p.skip for p in plan_outputs(kept, d, suffix="_x4"))  # the rerun skips everything
    # case-insensitive match of the output names
    Image.fromarray(_rgb()).save(d / "S_X4.PNG")
    assert "S_X4.PNG" not in _names(drop_earlier_outputs(collect_images([d]), d, suffix="_x4")[0], d)
    # -o inside a scanned folder: everything found inside it is an earlier result (no suffix needed)
    kept, dropped = drop_earlier_outputs(collect_images([d], recursive=True), d / "sub")
    assert d / "sub" / "r.png" in dropped and "p.png" in _names(kept, d)
    # a folder input inside the output folder (outputs go elsewhere): nothing is dropped or refused
    kept, dropped = drop_earlier_outputs(collect_images([d / "sub"]), d)
    assert not dropped and _names(kept, d) == ["sub/r.png", "sub/r_x4.png"]
    # files given by name are always inputs, and the output folder is not scanned then
    kept, dropped = drop_earlier_outputs(collect_images([d / "p.png", d / "p_x4.png"]), d)
    assert not dropped and len(kept.files) == 2


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp", ".tiff"])
def test_save_roundtrip_and_atomic(tmp_path, ext):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 17), indexing="ij")
    img = torch.stack([yy, xx, 0.5 * (yy + xx)]).unsqueeze(0)  # smooth, so lossy formats stay close
    img0 = img.clone()
    path = save_image(img, tmp_path / "deep" / f"out{ext}")
    assert path.exists() and torch.equal(img, img0)
    back = load_image(path)
    if ext in (".png", ".bmp", ".tiff"):
        torch.testing.assert_close(back, (img[0] * 255).round() / 255, atol=1e-6, rtol=0)
    else:
        assert back.shape == img[0].shape and (back - img[0]).abs().mean() < 0.02
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    mode = os.stat(path).st_mode & 0o777
    assert mode & 0o044  # readable by others (not mkstemp's 0o600), subject to the umask
    save_image(torch.zeros(3, 2, 2), path)  # replacing an existing file works
    assert load_image(path).max() == 0


def test_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "o.png"
    save_image(torch.ones(3, 4, 4), target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_image(torch.zeros(3, 4, 4), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_save_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="end with"):
        save_image(torch.rand(3, 4, 4), tmp_path / "x.gif")
    with pytest.raises(ValueError, match="\\(3, H, W\\)"):
        save_image(torch.rand(2, 3, 4, 4), tmp_path / "x.png")
    with pytest.raises(TypeError):
        save_image(np.zeros((4, 4, 3)), tmp_path / "x.png")


def _cut_png(width, height, rows, *, interlace=False):
    """A PNG whose valid, complete zlib stream holds only ``rows`` rows of the declared size."""
    return _png_with_data(width, height, b"\x00" * ((1 + 3 * width) * rows), interlace=interlace)


def _png_with_data(width, height, raw, *, interlace=False):
    """An 8-bit RGB PNG with these filtered scanline bytes (compressed into one IDAT)."""
    data = zlib.compress(raw, 9)

    def chunk(tag, d):
        return struct.pack(">I", len(d)) + tag + d + struct.pack(">I", zlib.crc32(tag + d))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_truncated_data_fails_on_load(tmp_path):
    """The issue's 185-byte PNG declaring 9000x9000 with 4 rows loads with Pillow alone as a black image;
    here it fails, naming the file, before anything of that size is allocated."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_cut_png(9000, 9000, 4))
    assert len(bomb.read_bytes()) < 300
    with Image.open(bomb) as im:
        im.load()  # what Pillow does: no error
        assert im.size == (9000, 9000)
    with pytest.raises(ImageReadError, match="ends early: 108004 of the 243009000 bytes") as e:
        load_image(bomb)
    assert e.value.path == bomb
    # every prefix of a real PNG fails too (or loads the same pixels, when only IEND is lost)
    good = tmp_path / "good.png"
    Image.fromarray(_rgb(9, 11)).save(good)
    data, full = good.read_bytes(), load_image(good)
    cut = tmp_path / "cut.png"
    for n in range(0, len(data)):
        cut.write_bytes(data[:n])
        try:
            assert torch.equal(load_image(cut), full), n
        except ImageReadError:
            pass


def test_png_data_checks(tmp_path):
    from mor_model.sr.image_checks import png_expected_bytes

    p = tmp_path / "x.png"
    p.write_bytes(_cut_png(7, 5, 5))  # complete: loads
    assert load_image(p).shape == (3, 5, 7)
    p.write_bytes(_cut_png(7, 5, 6))  # one row too many: a damaged header
    with pytest.raises(ImageReadError, match="more rows than the header declares"):
        load_image(p)
    p.write_bytes(_cut_png(7, 5, 5, interlace=True))  # interlaced files count Adam7's passes
    with pytest.raises(ImageReadError, match="ends early"):
        load_image(p)
    # Adam7 passes of a 7x5 image: (width, height) = (1, 1) (1, 1) (2, 1) (2, 2) (4, 1) (3, 3) (7, 2)
    passes = [(1, 1), (1, 1), (2, 1), (2, 2), (4, 1), (3, 3), (7, 2)]
    assert png_expected_bytes(7, 5, 8, 2, True) == sum(h * (1 + 3 * w) for w, h in passes) == 116
    adam7 = tmp_path / "adam7_ok.png"  # exactly that many bytes (all filter 0, black): loads
    adam7.write_bytes(_png_with_data(7, 5, b"\0" * 116, interlace=True))
    assert load_image(adam7).max() == 0
    adam7.write_bytes(_png_with_data(7, 5, b"\0" * 115, interlace=True))
    with pytest.raises(ImageReadError, match="115 of the 116 bytes"):
        load_image(adam7)
    interlaced = tmp_path / "adam7.png"
    Image.fromarray(_rgb(5, 7)).save(interlaced)  # Pillow writes non-interlaced; check a real 16-bit file too
    _png16(tmp_path / "g16.png", np.arange(35, dtype=np.uint16).reshape(5, 7, 1) * 1000)
    assert load_image(tmp_path / "g16.png").shape == (3, 5, 7)
    raw = bytearray(interlaced.read_bytes())
    raw[-20] ^= 0xFF  # inside the IDAT data: the chunk CRC no longer matches
    interlaced.write_bytes(bytes(raw))
    with pytest.raises(ImageReadError, match="CRC|corrupt"):
        load_image(interlaced)


def test_declared_size_is_checked_before_decoding(tmp_path, monkeypatch):
    from mor_model.sr import host_memory

    p = tmp_path / "a.png"
    Image.fromarray(_rgb(20, 30)).save(p)
    with pytest.raises(ImageReadError, match="declares 30x20 = 600 pixels, more than the limit of 599"):
        load_image(p, max_pixels=599)
    assert load_image(p, max_pixels=600).shape == (3, 20, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # Pillow's own cap, read at call time
    with pytest.raises(ImageReadError, match="more than the limit of 400"):
        load_image(p)
    assert load_image(p, max_pixels=None).shape == (3, 20, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # above twice the cap Pillow's header parser refuses it
    with pytest.raises(ImageReadError, match="image too large"):
        load_image(p, max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1000)
    with pytest.raises(ImageReadError, match="needs about 28.1 KiB of memory; 1000 B is available"):
        load_image(p)


def test_load_truncated_images_switch_is_refused(tmp_path, monkeypatch):
    from PIL import ImageFile

    p = tmp_path / "a.jpg"
    Image.fromarray(_rgb(16, 16)).save(p)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageReadError, match="LOAD_TRUNCATED_IMAGES is set"):
        load_image(p)


def test_suffix_cannot_leave_the_output_folder(tmp_path):
    from mor_model.sr.image_io import check_suffix

    a, b = tmp_path / "x" / "a.png", tmp_path / "y" / "a.png"  # two inputs whose names collide
    for f in (a, b):
        f.parent.mkdir()
        Image.fromarray(_rgb()).save(f)
    for bad in ("/../../ESCAPED", "../x", "a/b", "a\\b", "..", "x\0y"):
        with pytest.raises(ValueError, match="--suffix must be a plain part of a file name"):
            check_suffix(bad)
        with pytest.raises(ValueError, match="--suffix"):
            plan_outputs([a, b], tmp_path / "out", suffix=bad)
        collected = collect_images([tmp_path / "x", tmp_path / "y"])
        with pytest.raises(ValueError, match="--suffix"):
            drop_earlier_outputs(collected, tmp_path / "out", suffix=bad)
    assert check_suffix("_x4.v2") == "_x4.v2"


def test_output_name_planning_always_terminates(tmp_path, monkeypatch):
    """With the suffix check switched off, the issue's suffix maps every candidate name of colliding
    inputs to one path: planning now stops with an error instead of looping forever."""
    import threading

    from mor_model.sr import image_io

    a, b = tmp_path / "x" / "a.png", tmp_path / "y" / "a.png"
    for f in (a, b):
        f.parent.mkdir()
        Image.fromarray(_rgb()).save(f)
    monkeypatch.setattr(image_io, "check_suffix", lambda s: s)
    outcome = []

    def plan():
        try:
            plan_outputs([a, b], tmp_path / "out" / "deep", suffix="/../../ESCAPED")
        except ValueError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=plan, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "plan_outputs did not terminate"
    assert outcome and "found no free output name" in outcome[0]
    # many inputs sharing a stem still get distinct names, quickly
    files = []
    for ext in (".png", ".jpg", ".webp", ".bmp", ".tif", ".tiff", ".jpeg"):
        f = tmp_path / "many" / f"p{ext}"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
        files.append(f)
    plans = plan_outputs(files, tmp_path / "many", ext=".png")
    assert len({p.output for p in plans}) == len(files) and not {p.output for p in plans} & set(files)


def test_save_without_overwrite_never_replaces(tmp_path):
    target = tmp_path / "o.png"
    target.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError):
        save_image(torch.ones(3, 4, 4), target, overwrite=False)
    assert target.read_bytes() == b"someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    save_image(torch.ones(3, 4, 4), tmp_path / "new.png", overwrite=False)
    assert load_image(tmp_path / "new.png").min() == 1
