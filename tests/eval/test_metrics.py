"""PSNR/SSIM on the Y channel with a border crop, against hand-computed values and scikit-image."""

import math

import numpy as np
import pytest
import torch

from mor_model.eval.metrics import mse_to_psnr, psnr, rgb_to_y, ssim


def _img(seed: int, shape=(2, 3, 40, 44)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255.0


def test_rgb_to_y_range_and_values():
    black = torch.zeros(1, 3, 4, 4)
    white = torch.ones(1, 3, 4, 4)
    assert torch.allclose(rgb_to_y(black), torch.full((1, 1, 4, 4), 16.0))
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 4, 4), 235.0), atol=1e-4)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    assert torch.allclose(rgb_to_y(red), torch.full((1, 1, 2, 2), 16.0 + 65.481))


def test_psnr_known_mse_rgb():
    target = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    pred = target.clone()
    # every pixel off by exactly 2/255 -> MSE (on 0-255) = 4
    pred += 2.0 / 255.0
    got = psnr(pred, target, y_channel=False).item()
    assert got == pytest.approx(10 * math.log10(255**2 / 4.0), abs=1e-9)
    assert got == pytest.approx(mse_to_psnr(4.0), abs=1e-9)


def test_psnr_known_mse_y_channel():
    # a grey offset d in every RGB channel moves Y by d * (65.481 + 128.553 + 24.966) = 219 d
    target = torch.full((1, 3, 16, 16), 0.25, dtype=torch.float64)
    pred = target + 0.01
    expected_mse = (0.01 * 219.0) ** 2
    assert psnr(pred, target).item() == pytest.approx(mse_to_psnr(expected_mse), abs=1e-6)


def test_psnr_identical_is_inf_and_per_image():
    a = _img(0)
    assert torch.isinf(psnr(a, a)).all()
    b = a.clone()
    b[1] = _img(1)[1]
    out = psnr(b, a)
    assert out.shape == (2,)
    assert math.isinf(out[0].item()) and math.isfinite(out[1].item())


def test_crop_border_ignores_border_errors():
    a = _img(2, (1, 3, 32, 32))
    b = a.clone()
    b[..., :4, :] = 1.0 - b[..., :4, :]
    b[..., :, -4:] = 0.0
    assert math.isfinite(psnr(b, a).item())
    assert math.isinf(psnr(b, a, crop_border=4).item())
    assert ssim(b, a, crop_border=4).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(b, a).item() < 0.99


def test_ssim_identical_is_one_and_decreases_with_noise():
    a = _img(3)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(a.shape, generator=g)
    s_small = ssim((a + 0.02 * noise).clamp(0, 1), a)
    s_big = ssim((a + 0.2 * noise).clamp(0, 1), a)
    assert (s_small < 1).all() and (s_big < s_small).all()


def test_dtype_independent():
    a, b = _img(4), _img(5)
    assert torch.allclose(psnr(a.double(), b.double()), psnr(a, b))
    assert torch.allclose(ssim(a.half().float(), b), ssim(a.half(), b))


def test_bad_input():
    a = _img(6)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[..., :-1])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        psnr(a[:, :2], a[:, :2])
    with pytest.raises(ValueError, match="crop_border"):
        ssim(a, a, crop_border=20)
    with pytest.raises(TypeError, match="float"):
        psnr((a * 255).to(torch.uint8), (a * 255).to(torch.uint8))
    with pytest.raises(TypeError):
        psnr(a.numpy(), a)


def test_inputs_not_modified():
    a, b = _img(7), _img(8)
    a0, b0 = a.clone(), b.clone()
    psnr(a, b, crop_border=4)
    ssim(a, b, crop_border=4)
    assert torch.equal(a, a0) and torch.equal(b, b0)


def _skimage_y(img: torch.Tensor) -> np.ndarray:
    skc = pytest.importorskip("skimage.color")
    # skimage's rgb2ycbcr gives BT.601 studio range Y in [16, 235]: the same convention
    return skc.rgb2ycbcr(img.permute(1, 2, 0).double().numpy())[..., 0]


@pytest.mark.parametrize("crop", [0, 4])
def test_matches_skimage_on_y(crop):
    skm = pytest.importorskip("skimage.metrics")
    a = _img(9, (1, 3, 48, 52))
    g = torch.Generator().manual_seed(1)
    b = (a + 0.08 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    b = (b * 255).round() / 255
    ya, yb = _skimage_y(a[0]), _skimage_y(b[0])
    assert np.allclose(ya, rgb_to_y(a)[0, 0].double().numpy(), atol=1e-4)
    if crop:
        ya, yb = ya[crop:-crop, crop:-crop], yb[crop:-crop, crop:-crop]
    ref_psnr = skm.peak_signal_noise_ratio(ya, yb, data_range=255)
    ref_ssim = skm.structural_similarity(
        ya, yb, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert psnr(b, a, crop_border=crop).item() == pytest.approx(ref_psnr, abs=1e-3)
    assert ssim(b, a, crop_border=crop).item() == pytest.approx(ref_ssim, abs=1e-5)


def test_matches_skimage_rgb():
    skm = pytest.importorskip("skimage.metrics")
    a = _img(10, (1, 3, 33, 37))
    b = _img(11, (1, 3, 33, 37)) * 0.3 + a * 0.7
    an = a[0].permute(1, 2, 0).double().numpy() * 255
    bn = b[0].permute(1, 2, 0).double().numpy() * 255
    ref = skm.structural_similarity(
        an, bn, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=2
    )
    assert ssim(b, a, y_channel=False).item() == pytest.approx(ref, abs=1e-5)
    assert psnr(b, a, y_channel=False).item() == pytest.approx(
        skm.peak_signal_noise_ratio(an, bn, data_range=255), abs=1e-6
    )
