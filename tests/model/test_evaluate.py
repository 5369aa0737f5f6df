"""mor_model.evaluate / `mor-sr eval`: pairing, known PSNR/SSIM values, CSV, unavailable metrics."""

import csv
import math

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (dev extra) is not installed")

from mor_model.evaluate import evaluate, format_summary, write_csv  # noqa: E402


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
