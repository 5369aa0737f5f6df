"""Issue 15, item 3: a file that declares a huge image, or an image whose job cannot fit in memory, is
reported and skipped (exit 1) before it is decoded or the model runs on it; the other images are
processed; inputs and earlier outputs stay byte-for-byte the same."""

import pytest

pytest.importorskip("PIL.Image", reason="Pillow is not installed")

from cli_helpers import digest_tree, png_bytes, save_photo  # noqa: E402

from mor_model.cli import main  # noqa: E402


def test_cut_pngs_are_skipped_and_the_rest_is_processed(tiny_model_dir, tmp_path, capsys):
    """The issue's 185-byte PNG declaring 9000x9000 with 4 rows of data (refused from its header: the job
    cannot fit here, or the data ends early), and a 200x200 one with 4 rows (fails when loaded: Pillow
    alone loads both as black images)."""
    src = tmp_path / "in"
    src.mkdir()
    bomb = src / "bomb.png"
    bomb.write_bytes(png_bytes(9000, 9000, rows=4, level=9))
    assert bomb.stat().st_size < 300
    (src / "cut.png").write_bytes(png_bytes(200, 200, rows=4))
    save_photo(src / "good.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.png").write_bytes(b"an earlier output")
    before = digest_tree(tmp_path)
    code = main(["upscale", str(src), "-o", str(out), "--model", str(tiny_model_dir), "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.splitlines()
    assert any("bomb.png" in line and ("too large" in line or "ends early" in line) for line in lines), err
    assert any("cut.png" in line and "the image data ends early: 2404 of the 120200 bytes" in line for line in lines)
    assert "1 written" in err and "2 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["earlier.png", "good.png"]
    after = digest_tree(tmp_path)
    assert {p: after[p] for p in before} == before


def test_an_image_too_large_for_this_machine_is_skipped_with_its_size(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A valid 4000x4000 PNG at --scale 16 (a 64000x64000 output, hundreds of GiB) is refused from its
    header: it is never decoded (load_image is not called for it) and the small image is still done."""
    from mor_model.cli import upscale as upscale_cmd
    from mor_model.sr import image_io

    src = tmp_path / "in"
    src.mkdir()
    (src / "huge.png").write_bytes(png_bytes(4000, 4000))
    save_photo(src / "small.png", size=(8, 8))
    loaded = []
    real_load = image_io.load_image

    def load(path, **kw):
        loaded.append(path.name)
        return real_load(path, **kw)

    monkeypatch.setattr(image_io, "load_image", load)
    out = tmp_path / "out"
    before = digest_tree(src)
    code = upscale_cmd.run(
        upscale_cmd_args(["upscale", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--scale", "16", "-q"])
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert "huge.png" in err and "too large for this machine (4000x4000 input)" in err
    assert "for a 64000x64000 output" in err and "GiB of host memory" in err and "available" in err
    assert loaded == ["small.png"]
    assert sorted(p.name for p in out.iterdir()) == ["small.png"]
    assert digest_tree(src) == before


def upscale_cmd_args(argv):
    from mor_model.cli import build_parser

    return build_parser().parse_args(argv)


def test_the_plan_uses_the_memory_the_host_has_now(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """With (pretend) 1 MiB of host memory left even a small job is refused, naming what it needs."""
    from mor_model.sr import host_memory

    a = save_photo(tmp_path / "in" / "a.png")
    before = digest_tree(tmp_path / "in")
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1 << 20)
    code = main(["upscale", str(a), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "too large for this machine (16x16 input)" in err and "1.0 MiB is available" in err
    assert not (tmp_path / "out" / "a.png").exists()
    assert digest_tree(tmp_path / "in") == before
