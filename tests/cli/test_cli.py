"""The mor-sr CLI: upscale end to end in a subprocess (mixed good/corrupt files, overwrite rules, exit
codes), route-stats, eval, train delegation and --help, on the tiny random model.

Runtime on the 2-core CPU box: about a minute (three subprocesses, each loading torch and the model).
"""

import hashlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
pytest.importorskip("open_clip", reason="the [model] extra (open_clip_torch) is not installed")
Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) is not installed")

from mor_model.cli import build_parser, main  # noqa: E402
from mor_model.testing import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def photo(size):
    return Image.fromarray(skimage_data.astronaut()).resize(size, Image.BICUBIC)


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    photo((16, 16)).save(d / "a.png")
    photo((16, 16)).rotate(90).save(d / "b.jpg", quality=90)
    photo((12, 20)).save(d / "sub" / "c.webp")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated garbage")
    (d / "notes.txt").write_text("not an image, ignored in folders")
    return d


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "mor_model", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def digest(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_upscale_end_to_end(model_dir, inputs, tmp_path):
    out = tmp_path / "out"
    before = digest(inputs)
    r = run_cli("upscale", inputs, "-r", "-o", out, "--model", model_dir, "--batch-size", "2", "-q")
    assert r.returncode == 1, r.stderr  # the broken file failed, the rest was processed
    assert "broken.png" in r.stderr and "3 written" in r.stderr
    assert digest(inputs) == before  # inputs untouched
    sizes = {p.relative_to(out).as_posix(): Image.open(p).size for p in out.rglob("*.png")}
    assert sizes == {"a.png": (64, 64), "b.png": (64, 64), "sub/c.png": (48, 80)}
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left

    # good files only: existing outputs are skipped (not rewritten), exit 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r = run_cli("upscale", inputs / "a.png", inputs / "b.jpg", "-o", out, "--model", model_dir, "-q")
    assert r.returncode == 0, r.stderr
    assert "2 skipped" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamp

    # --overwrite redoes them; an output next to its input never replaces it
    (out / "a.png").write_bytes(b"stale")
    r = run_cli(
        "upscale", inputs / "a.png", "-o", out, "--model", model_dir, "--overwrite", "--tile", "8", "--color-fix",
        "wavelet", "--dtype", "bf16", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Image.open(out / "a.png").size == (64, 64)
    assert digest(inputs) == before


def test_upscale_next_to_inputs_and_errors(model_dir, inputs, tmp_path):
    before = digest(inputs)
    assert main(["upscale", str(inputs / "a.png"), "-o", str(inputs), "--model", str(model_dir), "-q"]) == 0
    after = digest(inputs)
    assert {p: after[p] for p in before} == before  # inputs intact; the output got another name
    assert Image.open(inputs / "a_png.png").size == (64, 64)
    # an output folder inside a scanned input folder: earlier results are not taken as inputs
    single = tmp_path / "single"
    single.mkdir()
    photo((8, 8)).save(single / "p.png")
    for _ in range(2):
        assert main(["upscale", str(single), "-r", "-o", str(single / "out"), "--model", str(model_dir), "-q"]) == 0
    assert sorted(p.relative_to(single).as_posix() for p in single.rglob("*.png")) == ["out/p.png", "p.png"]
    # missing input and a model folder that is not one
    assert main(["upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path / "o"), "--model", str(model_dir)]) == 1
    assert main(["upscale", str(inputs / "b.jpg"), "-o", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2


def test_upscale_into_the_input_folder_reruns_cleanly(model_dir, tmp_path, capsys):
    """-o equal to the scanned folder: refused without a suffix (outputs could not be told from inputs on
    the next run); with one, reruns skip the existing outputs and never upscale an output again."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    photo((8, 8)).save(d / "p.png")
    photo((8, 8)).save(d / "sub" / "q.png")
    base = ["upscale", str(d), "-r", "-o", str(d), "--model", str(model_dir), "-q"]
    assert main(base) == 2
    assert "suffix" in capsys.readouterr().err
    assert sorted(p.name for p in d.rglob("*.png")) == ["p.png", "q.png"]  # nothing written
    stamps = None
    for run in range(3):
        assert main([*base, "--suffix", "_x4"]) == 0
        err = capsys.readouterr().err
        files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*.png"))
        assert files == ["p.png", "p_x4.png", "sub/q.png", "sub/q_x4.png"], (run, files)
        assert Image.open(d / "p_x4.png").size == (32, 32)
        now = {p: p.stat().st_mtime_ns for p in d.rglob("*.png")}
        if stamps is None:
            stamps = now
        else:
            assert "2 skipped" in err and "2 earlier outputs" in err
            assert now == stamps  # nothing rewritten, nothing new


def test_bad_arguments_are_usage_errors_before_any_image(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["upscale", str(inputs / "a.png"), "-o", str(out), "--model", str(model_dir), "-q"]
    cases = [
        (["--tile", "3"], "tile must be"),  # not a multiple of the UNet factor (2)
        (["--tile", "8", "--tile-overlap", "8"], "tile_overlap"),
        (["--tile-overlap", "3"], "tile_overlap"),
        (["--encoder-tile", "6"], "encoder_tile"),  # not a multiple of the VAE factor (4)
        (["--scale", "0"], "scale"),
        (["--device", "nonsense"], "device"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert main(["route-stats", str(inputs / "a.png"), "--model", str(model_dir), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not out.exists()  # nothing was processed or written
    with pytest.raises(SystemExit) as e:
        main([*base, "--tile-overlap", "-8"])
    assert e.value.code == 2


def test_failures_of_any_kind_are_per_image(model_dir, inputs, tmp_path, monkeypatch, capsys):
    """An exception of an unexpected type on one image is reported and counted; the others are written."""
    from mor_model.sr.pipeline import MoRSRPipeline

    real = MoRSRPipeline.__call__
    calls = []

    def flaky(self, images, **kwargs):
        calls.append(images.shape)
        if len(calls) == 1:
            raise KeyError("something unexpected")
        return real(self, images, **kwargs)

    monkeypatch.setattr(MoRSRPipeline, "__call__", flaky)
    out = tmp_path / "out"
    files = [str(inputs / "a.png"), str(inputs / "b.jpg")]
    # --adapter FILE (the adapter's safetensors file) is accepted: its folder is loaded
    adapter = model_dir / "mor_adapter" / "mor_adapter.safetensors"
    code = main(["upscale", *files, "-o", str(out), "--model", str(model_dir), "--adapter", str(adapter), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "KeyError" in err and "1 written" in err and "1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["b.png"]


def test_route_stats_runs_clip_once_and_survives_failures(model_dir, inputs, monkeypatch, tmp_path, capsys):
    from mor_model.estimator import DegradationEstimator
    from mor_model.sr.pipeline import MoRSRPipeline

    seen = []
    real_forward, real_call = DegradationEstimator.forward, MoRSRPipeline.__call__

    def counting(self, *a, **k):
        seen.append(1)
        return real_forward(self, *a, **k)

    def failing_on_b(self, images, **kwargs):
        if images.shape[-1] == 16 and len(seen) == 2:  # the second image (b.jpg)
            raise IndexError("broken for this image")
        return real_call(self, images, **kwargs)

    monkeypatch.setattr(DegradationEstimator, "forward", counting)
    monkeypatch.setattr(MoRSRPipeline, "__call__", failing_on_b)
    images = [str(inputs / "a.png"), str(inputs / "b.jpg"), str(inputs / "sub" / "c.webp")]
    code = main(["route-stats", *images, "--model", str(model_dir), "-o", str(tmp_path / "h.png")])
    out = capsys.readouterr()
    assert code == 1 and "IndexError" in out.err and "b.jpg" in out.err
    assert len(seen) == 3  # the CLIP estimator ran once per image
    assert "a.png" in out.out and "c.webp" in out.out and "image 1:" in out.out and "image 2:" not in out.out


def test_route_stats(model_dir, inputs, tmp_path, capsys):
    png, js = tmp_path / "heat.png", tmp_path / "stats.json"
    code = main(
        ["route-stats", str(inputs / "a.png"), str(inputs / "b.jpg"), "--model", str(model_dir), "-o", str(png),
         "--json", str(js)]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "unet." in text and "vae." in text and "severity" in text
    assert Image.open(png).size[0] > 100
    import json

    data = json.loads(js.read_text())
    assert len(data["images"]) == 2 and len(data["active_ranks"]) == len(data["layers"])
    # S = 2 shared ranks + up to top-3 routed: 2 <= active <= 5 for the UNet layers
    unet_rows = [r for n, r in zip(data["layers"], data["active_ranks"], strict=True) if n.startswith("unet.")]
    assert all(2 <= v <= 5 for row in unet_rows for v in row)


def test_eval_cli(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    img = photo((40, 40))
    img.save(gt / "x.png")
    img.save(pred / "x.png")
    code = main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "psnr,ssim,musiq"])
    out = capsys.readouterr()
    assert code == 0
    assert "inf" in out.out and "musiq" in out.out and "unavailable" in out.err
    assert (pred / "metrics.csv").read_text().startswith("name,pred,gt,psnr,ssim")


def test_train_delegation(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "CONFIG" in text and "--overwrite" in text and "--resume" in text
    monkeypatch.setitem(sys.modules, "mor_model.cli.train", None)  # as if the module were missing
    import mor_model.cli

    monkeypatch.delattr(mor_model.cli, "train", raising=False)
    assert main(["train", "cfg.json"]) == 2
    assert "training is not available" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["upscale", "route-stats", "eval", "demo"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = {
        "upscale": ["--model", "--adapter", "--clip", "--scale", "--tile", "--dtype", "--color-fix", "--prompt",
                    "--overwrite", "--batch-size", "--fold-shared", "-o", "--encoder-tile", "--decoder-tile", "--tile-norm",
                    "--tile-overlap", "--suffix"],
        "route-stats": ["--model", "--adapter", "--clip", "--json", "-o"],
        "eval": ["--pred", "--gt", "--metrics", "--crop-border", "--csv", "--suffix"],
        "demo": ["--model", "--revision", "--adapter", "--vae-adapter", "--clip", "--dtype", "--device", "--backend",
                 "--fold-shared", "--host", "--port", "--share", "--max-pixels", "--max-file-size", "--no-examples",
                 "127.0.0.1", "tiny"],
    }[command]  # fmt: skip
    for flag in flags:
        assert flag in text, flag


def test_console_script_declared():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["mor-sr"] == "mor_model.cli:main"
