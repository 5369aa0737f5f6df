"""mor_model.eval.evaluate / `mor-sr eval`: pairing, known PSNR/SSIM values, CSV, unavailable metrics."""

import csv
import math

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (dev extra) is not installed")

from mor_model.eval.evaluate import evaluate, format_summary, write_csv  # noqa: E402


def y_channel(rgb_uint8):
    """BT.601 studio-range luma on the 0-255 scale (BasicSR's rgb2ycbcr y_only)."""
    x = rgb_uint8.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    a = rng.integers(20, 200, size=(40, 48, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8)
    Image.fromarray(a).save(gt / "a.png")
    Image.fromarray(a + 8).save(pred / "a_x4.png")  # +8 on R, G, B: Y moves by exactly 8 * 219 / 255
    Image.fromarray(b).save(gt / "b.png")
    noisy = np.clip(b.astype(int) + rng.integers(-20, 21, size=b.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(pred / "b_x4.png")
    Image.fromarray(b[:20]).save(pred / "c_x4.png")  # a prediction without ground truth
    Image.fromarray(b).save(gt / "d.png")
    Image.fromarray(b[:30]).save(pred / "d_x4.png")  # wrong size
    return pred, gt, a, b, noisy


def test_known_values(folders):
    pred, gt, a, b, noisy = folders
    res = evaluate(pred, gt, suffix="_x4", crop_border=4)
    rows = {r["name"]: r for r in res.rows}
    assert set(rows) == {"a", "b"}
    # constant offset: PSNR = 20 log10(255 / (8 * 219 / 255)) exactly
    assert rows["a"]["psnr"] == pytest.approx(20 * math.log10(255 / (8 * 219 / 255)), abs=1e-6)
    # against skimage on the cropped Y channel
    yg, yp = y_channel(b)[4:-4, 4:-4], y_channel(noisy)[4:-4, 4:-4]
    assert rows["b"]["psnr"] == pytest.approx(skimage_metrics.peak_signal_noise_ratio(yg, yp, data_range=255), abs=1e-6)
    ref_ssim = skimage_metrics.structural_similarity(
        yg, yp, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert rows["b"]["ssim"] == pytest.approx(ref_ssim, abs=1e-6)
    assert 0 < rows["b"]["ssim"] < rows["a"]["ssim"] <= 1
    assert res.summary["psnr"] == pytest.approx((rows["a"]["psnr"] + rows["b"]["psnr"]) / 2)
    errors = dict(res.errors)
    assert any("c_x4" in p and "no ground truth" in why for p, why in errors.items())
    assert any("d_x4" in p and "differs" in why for p, why in errors.items())


def test_csv_and_summary(folders, tmp_path):
    pred, gt, *_ = folders
    res = evaluate(pred, gt, suffix="_x4", metrics=["psnr", "ssim", "lpips"], crop_border=0, y_channel=False)
    assert "lpips" in res.unavailable and "lpips" not in res.summary
    path = write_csv(res, tmp_path / "m" / "metrics.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["name"] for r in rows] == ["a", "b"] and set(rows[0]) == {"name", "pred", "gt", "psnr", "ssim"}
    text = format_summary(res, crop_border=0, y_channel=False)
    assert "RGB, crop 0" in text and "unavailable" in text


def test_bad_arguments(folders, tmp_path):
    pred, gt, *_ = folders
    with pytest.raises(FileNotFoundError, match="--gt"):
        evaluate(pred, tmp_path / "missing")
    with pytest.raises(ValueError, match="crop_border"):
        evaluate(pred, gt, crop_border=-1)
    with pytest.raises(ValueError, match="metrics"):
        evaluate(pred, gt, metrics=[" "])


# -- pyiqa metrics: nothing may be downloaded ------------------------------------------------------------
# pyiqa is not installed here; a fake module in sys.modules plays its part. Every URL points at port 9 of
# this machine (the discard port), so even a broken guard could not fetch anything from outside.
URL = "http://127.0.0.1:9/weights.pth"


class FakeMetric:
    metric_mode = "NR"

    def __init__(self, fn=None):
        self.fn = fn

    def __call__(self, pred, gt=None):
        if self.fn is not None:
            self.fn()
        return pred.mean()


def _fake_pyiqa(tmp_path):
    import socket
    import types
    import urllib.request

    import torch

    def torch_hub():  # pyiqa's load_file_from_url / torchvision's weights=... path
        torch.hub.load_state_dict_from_url(URL, model_dir=str(tmp_path / "hub"), progress=False)

    def torchvision_weights():  # LPIPS/DISTS backbones: vgg16(weights=...) calls weights.get_state_dict(...)
        from torchvision.models._api import Weights, WeightsEnum

        class LocalWeights(WeightsEnum):
            V1 = Weights(url=URL, transforms=None, meta={})

        LocalWeights.V1.get_state_dict(progress=False, model_dir=str(tmp_path / "tv"))

    def clip_urllib():  # pyiqa.archs.clip_model._download
        with urllib.request.urlopen(URL) as source:
            source.read()

    def hugging_face():
        import huggingface_hub

        huggingface_hub.hf_hub_download("fake/none", "w.pth", endpoint="http://127.0.0.1:9", cache_dir=tmp_path / "hf")

    def raw_socket():  # any other downloader
        socket.create_connection(("127.0.0.1", 9), timeout=5).close()

    makers = {
        "fake-hub": torch_hub,
        "fake-torchvision": torchvision_weights,
        "fake-clip": clip_urllib,
        "fake-hf": hugging_face,
        "fake-socket": raw_socket,
    }
    created = []

    def create_metric(name, device=None, as_loss=False):
        created.append(name)
        if name == "fake-ok":
            return FakeMetric()
        if name == "fake-lazy":  # downloads on its first call
            return FakeMetric(clip_urllib)
        makers[name]()
        return FakeMetric()

    mod = types.ModuleType("pyiqa")
    mod.list_models = lambda: [*makers, "fake-ok", "fake-lazy"]
    mod.create_metric = create_metric
    return mod, list(makers), created


def test_pyiqa_metrics_never_download(folders, tmp_path, monkeypatch):
    import socket
    import sys

    import torch

    pred, gt, *_ = folders
    fake, downloading, created = _fake_pyiqa(tmp_path)
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    hub_before, connect_before = torch.hub.download_url_to_file, socket.socket.connect
    metrics = ["psnr", *downloading, "fake-ok", "fake-lazy"]
    res = evaluate(pred, gt, suffix="_x4", metrics=metrics)
    assert created == [*downloading, "fake-ok", "fake-lazy"]
    for m in downloading:
        why = res.unavailable[m]
        assert "downloads are blocked" in why, (m, why)
    assert "127.0.0.1:9" in res.unavailable["fake-hub"] and "127.0.0.1" in res.unavailable["fake-socket"]
    assert "failed on" in res.unavailable["fake-lazy"] and "downloads are blocked" in res.unavailable["fake-lazy"]
    # the metric that has its weights ran; the others did not stop the evaluation
    assert set(res.summary) == {"psnr", "fake-ok"}
    assert all("fake-ok" in r and "fake-lazy" not in r for r in res.rows) and len(res.rows) == 2
    # everything is restored afterwards
    assert torch.hub.download_url_to_file is hub_before and socket.socket.connect == connect_before
    assert "connect" not in vars(socket.socket)


# -- issue 15, item 10: small pairs, unknown metrics, identical pairs ------------------------------------


@pytest.fixture
def mixed(tmp_path):
    """gt/pred with a normal pair, an identical pair and a pair too small for a 4-pixel border crop."""
    rng = np.random.default_rng(1)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    same = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    tiny = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(a).save(gt / "a.png")
    Image.fromarray(np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)).save(pred / "a.png")
    Image.fromarray(same).save(gt / "same.png")
    Image.fromarray(same).save(pred / "same.png")
    Image.fromarray(tiny).save(gt / "tiny.png")
    Image.fromarray(tiny[::-1]).save(pred / "tiny.png")
    return pred, gt


def test_small_pairs_are_skipped_and_identical_pairs_counted_apart(mixed):
    pred, gt = mixed
    res = evaluate(pred, gt, crop_border=4)
    assert [r["name"] for r in res.rows] == ["a", "same"]
    assert any("tiny.png" in p and "skipped" in why and "crop" in why for p, why in res.errors), res.errors
    assert math.isinf(res.rows[1]["psnr"]) and res.infinite == {"psnr": ["same"]}
    assert math.isfinite(res.summary["psnr"]) and res.summary["psnr"] == res.rows[0]["psnr"]  # the finite one
    assert res.summary["ssim"] == pytest.approx((res.rows[0]["ssim"] + 1.0) / 2)  # SSIM 1 is finite: kept
    text = format_summary(res, crop_border=4, y_channel=True)
    assert "mean over 1 finite values, 1 identical pairs (inf) left out" in text


def test_unknown_metrics_are_named_with_the_known_ones(mixed):
    from mor_model.eval.evaluate import check_metric_names

    pred, gt = mixed
    with pytest.raises(ValueError, match=r"unknown metric 'bogus'; known: psnr, ssim \(built in\); .*lpips"):
        evaluate(pred, gt, metrics=["psnr", "bogus"])
    assert check_metric_names([" PSNR", "lpips", ""]) == ["psnr", "lpips"]


def test_eval_cli_reports_small_unknown_and_identical(mixed, capsys):
    import hashlib

    from mor_model.cli import main

    pred, gt = mixed
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pred.parent.rglob("*.png"))}
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "--metrics", "bogus,psnr"]) == 2
    err = capsys.readouterr().err
    assert "unknown metric 'bogus'" in err and "psnr, ssim (built in)" in err and "pyiqa is not installed" not in err
    assert not (pred / "metrics.csv").exists()
    code = main(["eval", "--pred", str(pred), "--gt", str(gt)])
    out = capsys.readouterr()
    assert code == 1  # one pair was skipped
    assert "tiny.png" in out.err and "skipped" in out.err
    assert "1 pairs have psnr = inf (identical images), left out of its mean: same" in out.err
    rows = list(csv.DictReader((pred / "metrics.csv").open()))
    assert [r["name"] for r in rows] == ["a", "same"] and rows[1]["psnr"] == "inf"
    psnr_line = next(line for line in out.out.splitlines() if line.startswith("psnr"))
    assert math.isfinite(float(psnr_line.split()[1])) and "1 identical pairs (inf) left out" in psnr_line
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest
