"""Real-ESRGAN second-order degradations: kernels, noise, JPEG, resize, and the whole pipeline."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("PIL", reason="JPEG compression goes through Pillow (the [model] extra)")

from mor_model.eval.metrics import psnr  # noqa: E402
from mor_model.train.degradations import (  # noqa: E402
    KERNEL_TYPES,
    DegradationConfig,
    add_gaussian_noise,
    add_poisson_noise,
    degrade,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    jpeg_compress,
    plateau_kernel,
    random_mixed_kernel,
    sinc_kernel,
)


def _hr(b=2, h=64, w=64, seed=0) -> torch.Tensor:
    """A photo-like test batch: smooth colour field plus edges and some texture."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(b, 3, 6, 6, generator=g), size=(h, w), mode="bicubic", align_corners=True)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    edges = (((yy // 8) + (xx // 8)) % 2).float() * 0.3
    tex = 0.1 * torch.sin(xx * 0.9 + yy * 0.4)
    return (0.6 * base + edges + tex).clamp(0, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- kernels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [7, 13, 21])
def test_kernels_normalised_and_centred(k):
    kernels = [
        gaussian_kernel(k, 1.5),
        gaussian_kernel(k, 2.0, 0.7, 0.6),
        generalized_gaussian_kernel(k, 1.2, 2.5, -1.0, 0.6),
        plateau_kernel(k, 1.0, 1.8, 0.3, 1.5),
        sinc_kernel(k, math.pi / 3),
    ]
    for kern in kernels:
        assert kern.shape == (k, k) and kern.dtype == torch.float64
        assert kern.sum().item() == pytest.approx(1.0, abs=1e-12)
        # point symmetric: K(x) == K(-x) (so correlation == convolution)
        assert torch.allclose(kern, kern.flip(0).flip(1), atol=1e-12)
        assert kern.argmax().item() == (k * k) // 2


def test_kernel_shapes_follow_parameters():
    iso = gaussian_kernel(21, 2.0)
    assert torch.allclose(iso, iso.T, atol=1e-12)
    aniso = gaussian_kernel(21, 3.0, 0.5, 0.0)  # wide along x (columns), narrow along y (rows)
    assert aniso[10, 13] > aniso[13, 10]
    rotated = gaussian_kernel(21, 3.0, 0.5, math.pi / 2)
    assert torch.allclose(rotated, aniso.T, atol=1e-10)
    # closed form of the isotropic Gaussian
    ax = torch.arange(21, dtype=torch.float64) - 10
    g = torch.exp(-(ax**2) / (2 * 2.0**2))
    assert torch.allclose(iso, torch.outer(g, g) / torch.outer(g, g).sum(), atol=1e-14)
    # beta = 1 generalised Gaussian is the Gaussian; heavier tails for small beta
    assert torch.allclose(generalized_gaussian_kernel(21, 1.3, 2.0, 0.4, 1.0), gaussian_kernel(21, 1.3, 2.0, 0.4))
    assert generalized_gaussian_kernel(21, 1.0, 1.0, 0, 0.5)[10, 0] > gaussian_kernel(21, 1.0)[10, 0]
    # plateau: flat top, heavy tail compared with the Gaussian of the same sigma
    p = plateau_kernel(21, 2.0, 2.0, 0, 2.0)
    assert p[10, 10] / p[10, 11] < gaussian_kernel(21, 2.0)[10, 10] / gaussian_kernel(21, 2.0)[10, 11]
    assert p[10, 0] > gaussian_kernel(21, 2.0)[10, 0]


def test_sinc_kernel_matches_bessel_formula_and_pads():
    special = pytest.importorskip("scipy.special")
    k, wc = 13, 1.7
    kern = sinc_kernel(k, wc)
    ax = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    r = torch.sqrt(ax.view(-1, 1) ** 2 + ax.view(1, -1) ** 2).numpy()
    rs = np.maximum(r, 1e-300)
    ref = np.where(r == 0, wc**2 / (4 * np.pi), wc * special.j1(wc * rs) / (2 * np.pi * rs))
    ref = ref / ref.sum()
    # torch.special.bessel_j1 agrees with scipy to ~1e-7 absolute, hence the tolerance
    assert torch.allclose(kern, torch.from_numpy(ref), rtol=0, atol=1e-7)
    assert (kern < 0).any()  # ringing lobes
    padded = sinc_kernel(7, 2.0, pad_to=21)
    assert padded.shape == (21, 21) and padded[:7].abs().sum() == 0
    assert torch.allclose(padded[7:14, 7:14], sinc_kernel(7, 2.0))


def test_random_mixed_kernel_covers_all_types_reproducibly():
    a = [random_mixed_kernel(_gen(s), 15) for s in range(40)]
    b = [random_mixed_kernel(_gen(s), 15) for s in range(40)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len({round(float(x.max()), 10) for x in a}) > 30
    for kind in KERNEL_TYPES:
        k = random_mixed_kernel(_gen(0), 9, kernel_list=[kind], kernel_prob=[1.0])
        assert k.shape == (9, 9) and k.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kernel types"):
        DegradationConfig(kernel_list=("iso", "disk"), kernel_prob=(0.5, 0.5))


def test_filter2d_per_image_kernels():
    img = _hr(2, 24, 24)
    delta = torch.zeros(5, 5, dtype=torch.float64)
    delta[2, 2] = 1
    kernels = torch.stack([delta, gaussian_kernel(5, 1.0)])
    out = filter2d(img, kernels)
    assert torch.allclose(out[0], img[0], atol=1e-6)
    ref = F.conv2d(
        F.pad(img[1:], (2, 2, 2, 2), mode="reflect"), gaussian_kernel(5, 1.0).float().expand(3, 1, 5, 5), groups=3
    )
    assert torch.allclose(out[1:], ref, atol=1e-6)
    # zero-padded kernels (as sampled: 7x7 and 9x9 inside 21x21) give the full 21x21 convolution's result
    padded = torch.stack([F.pad(gaussian_kernel(7, 1.0), (7,) * 4), F.pad(sinc_kernel(9, 2.0), (6,) * 4)])
    full = F.conv2d(
        F.pad(img, (10,) * 4, mode="reflect").reshape(1, 6, 44, 44),
        padded.float().repeat_interleave(3, 0).unsqueeze(1),
        groups=6,
    ).view(2, 3, 24, 24)
    assert torch.allclose(filter2d(img, padded), full, atol=1e-6)
    tiny = filter2d(torch.rand(1, 3, 4, 4), gaussian_kernel(21, 2.0))  # too small to reflect: replicate
    assert tiny.shape == (1, 3, 4, 4) and torch.isfinite(tiny).all()


# ---- noise, JPEG -------------------------------------------------------------------------------------


def test_gaussian_noise_strength_and_gray():
    img = torch.full((2, 3, 64, 64), 0.5)
    out = add_gaussian_noise(img, _gen(0), (10.0, 10.0), gray_prob=0.0)
    assert (out - img).std().item() == pytest.approx(10 / 255, rel=0.05)
    gray = add_gaussian_noise(img, _gen(0), (10.0, 10.0), gray_prob=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert not torch.equal(out[:, 0], out[:, 1])


def test_poisson_noise_unbiased_and_scaled():
    img = torch.full((1, 3, 64, 64), 0.5)
    img[..., :32] = 0.25  # two distinct levels -> 2 photon levels: strong noise
    small = add_poisson_noise(img, _gen(1), (0.1, 0.1), gray_prob=0.0)
    big = add_poisson_noise(img, _gen(1), (1.0, 1.0), gray_prob=0.0)
    assert (small - img).abs().mean() < (big - img).abs().mean()
    assert abs((small - img).mean().item()) < 0.01
    gray = add_poisson_noise(img, _gen(2), (1.0, 1.0), gray_prob=1.0)
    assert torch.equal(gray[:, 0], gray[:, 1])
    assert 0 <= big.min() and big.max() <= 1


def test_jpeg_quality_and_levels():
    img = _hr(2, 32, 32)
    hi = jpeg_compress(img, 95)
    lo = jpeg_compress(img, [10, 10])
    assert hi.shape == img.shape and hi.dtype == img.dtype
    assert torch.equal((hi * 255).round(), hi * 255)
    assert psnr(hi, img).min() > psnr(lo, img).max()
    assert torch.equal(jpeg_compress(img, 50), jpeg_compress(img, 50))
    assert not torch.equal(jpeg_compress(img, [50, 60])[1], jpeg_compress(img, [50, 50])[1])


# ---- the whole pipeline -----------------------------------------------------------------------------


def test_degrade_shape_range_levels_and_no_mutation():
    hr = _hr(3, 64, 48)
    hr0 = hr.clone()
    lr = degrade(hr, scale=4, generator=_gen(0))
    assert lr.shape == (3, 3, 16, 12) and lr.dtype == hr.dtype
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal((lr * 255).round(), lr * 255)
    assert torch.equal(hr, hr0)
    assert degrade(hr.double(), scale=2, generator=_gen(0)).shape == (3, 3, 32, 24)


def test_degrade_reproducible_under_seed():
    hr = _hr(2, 64, 64)
    a = degrade(hr, generator=_gen(123))
    b = degrade(hr, generator=_gen(123))
    c = degrade(hr, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = _gen(5)
    first, second = degrade(hr, generator=g), degrade(hr, generator=g)
    assert not torch.equal(first, second)  # the generator advances


def test_degrade_lowers_psnr_vs_hr():
    hr = _hr(4, 64, 64, seed=3)
    up = lambda lr: F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)  # noqa: E731
    clean = F.interpolate(hr, scale_factor=0.25, mode="area")
    clean_psnr = psnr(up(clean), hr, crop_border=4)
    deg_psnr = torch.stack([psnr(up(degrade(hr, generator=_gen(s))), hr, crop_border=4) for s in range(3)])
    # every degraded LR is worse than the clean bicubic LR, and clearly so on average
    assert (deg_psnr < clean_psnr).all()
    assert (clean_psnr - deg_psnr.mean(0)).mean() > 1.0
    # stronger settings degrade more: heavy noise and low JPEG quality everywhere
    harsh = replace(
        DegradationConfig(),
        gaussian_noise_prob=1.0,
        noise_range=(25.0, 30.0),
        gaussian_noise_prob2=1.0,
        noise_range2=(20.0, 25.0),
        jpeg_range=(30.0, 35.0),
        jpeg_range2=(30.0, 35.0),
    )
    mild = replace(
        DegradationConfig(),
        blur_sigma=(0.2, 0.3),
        blur_sigma2=(0.2, 0.3),
        sinc_prob=0.0,
        sinc_prob2=0.0,
        final_sinc_prob=0.0,
        second_blur_prob=0.0,
        resize_prob=(0.0, 0.0, 1.0),
        resize_prob2=(0.0, 0.0, 1.0),
        gaussian_noise_prob=1.0,
        gaussian_noise_prob2=1.0,
        noise_range=(1.0, 1.0),
        noise_range2=(1.0, 1.0),
        jpeg_range=(95.0, 95.0),
        jpeg_range2=(95.0, 95.0),
    )
    harsh_psnr = torch.stack(
        [psnr(up(degrade(hr, config=harsh, generator=_gen(s))), hr, crop_border=4) for s in range(2)]
    )
    mild_psnr = torch.stack(
        [psnr(up(degrade(hr, config=mild, generator=_gen(s))), hr, crop_border=4) for s in range(2)]
    )
    assert harsh_psnr.mean() < mild_psnr.mean() - 2.0


def test_degrade_bad_input():
    with pytest.raises(ValueError, match="multiples of scale"):
        degrade(torch.rand(1, 3, 30, 32), scale=4, generator=_gen(0))
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\)"):
        degrade(torch.rand(3, 32, 32), generator=_gen(0))
    with pytest.raises(TypeError, match="float"):
        degrade(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), generator=_gen(0))
    with pytest.raises(ValueError, match="scale"):
        degrade(torch.rand(1, 3, 32, 32), scale=0, generator=_gen(0))


def test_generator_forms():
    hr = _hr(1, 32, 32)
    by_gen = degrade(hr, generator=_gen(7))
    assert torch.equal(degrade(hr, generator=7), by_gen)  # an int seed == a generator seeded with it
    a = degrade(hr, generator=np.random.default_rng(1))
    b = degrade(hr, generator=np.random.default_rng(1))
    assert torch.equal(a, b)
    assert degrade(hr).shape == (1, 3, 8, 8)  # None: unseeded, still valid
    with pytest.raises(TypeError, match="generator"):
        degrade(hr, generator="seed")
    with pytest.raises(TypeError, match="config"):
        degrade(hr, config={"sinc_prob": 0.0}, generator=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_degrade_cuda_reproducible_and_on_device():
    hr = _hr(2, 64, 64).cuda()
    a = degrade(hr, generator=torch.Generator("cuda").manual_seed(3))
    b = degrade(hr, generator=torch.Generator("cuda").manual_seed(3))
    assert a.device.type == "cuda" and torch.equal(a, b)
    c = degrade(hr, generator=_gen(3))  # CPU generator with CUDA images: noise made on CPU, moved over
    assert c.device.type == "cuda" and torch.equal(c, degrade(hr, generator=_gen(3)))
