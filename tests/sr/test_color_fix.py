"""AdaIN and wavelet colour fixes."""

import pytest
import torch
import torch.nn.functional as F

from mor_model.sr.color_fix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition


def _smooth(seed: int, shape=(2, 3, 64, 72)) -> torch.Tensor:
    """A low-frequency colour image: random 4x4 field upsampled bicubically."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(shape[0], shape[1], 4, 4, generator=g)
    return F.interpolate(small, size=shape[-2:], mode="bicubic", align_corners=True)


def _texture(shape=(2, 3, 64, 72)) -> torch.Tensor:
    """Zero-mean high-frequency pattern (period 2 checkerboard)."""
    yy, xx = torch.meshgrid(torch.arange(shape[-2]), torch.arange(shape[-1]), indexing="ij")
    return (((yy + xx) % 2) * 2 - 1).float().expand(shape).clone()


def test_adain_matches_reference_statistics():
    g = torch.Generator().manual_seed(0)
    out = torch.rand(2, 3, 40, 50, generator=g) * 0.5 + 0.4
    ref = torch.rand(2, 3, 20, 25, generator=g) * 0.2 + 0.1  # another size on purpose
    fixed = adain_color_fix(out, ref)
    assert fixed.shape == out.shape and fixed.dtype == out.dtype
    assert torch.allclose(fixed.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(fixed.std(dim=(2, 3), unbiased=False), ref.std(dim=(2, 3), unbiased=False), atol=1e-4)
    # structure kept: per-channel correlation with the output is 1
    a = (fixed - fixed.mean(dim=(2, 3), keepdim=True)).flatten(2)
    b = (out - out.mean(dim=(2, 3), keepdim=True)).flatten(2)
    corr = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert torch.allclose(corr, torch.ones_like(corr), atol=1e-5)


def test_adain_identity_when_reference_is_output():
    x = _smooth(1)
    assert torch.allclose(adain_color_fix(x, x), x, atol=1e-5)


def test_wavelet_decomposition_sums_back():
    shape = (1, 3, 96, 96)
    g = torch.Generator().manual_seed(2)
    # a bilinear ramp: every dilated binomial blur leaves it unchanged away from the borders
    ramp = F.interpolate(torch.rand(1, 3, 2, 2, generator=g), size=shape[-2:], mode="bilinear", align_corners=True)
    x = ramp + 0.1 * _texture(shape)
    high, low = wavelet_decomposition(x)
    assert torch.allclose(high + low, x, atol=1e-5)
    # the checkerboard lives in the high band, the ramp in the low band (the blurs reach 31 px)
    c = (..., slice(32, -32), slice(32, -32))
    assert torch.allclose(high[c], 0.1 * _texture(shape)[c], atol=1e-5)
    assert torch.allclose(low[c], ramp[c], atol=1e-5)


def test_wavelet_keeps_output_details_and_reference_colours():
    ref = _smooth(3)
    tex = 0.1 * _texture()
    # output: the reference's structure with a colour cast (a low-frequency shift) plus fine texture
    cast = torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    out = ref + cast + tex
    fixed = wavelet_color_fix(out, ref)
    assert fixed.shape == out.shape
    # colour cast removed: the result's low band is the reference's
    assert torch.allclose(fixed.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=2e-3)
    # details kept: result == reference + texture (up to the wavelet's imperfect band split)
    assert (fixed - (ref + tex)).abs().mean() < 5e-3
    # exact identity of the construction: high(result input) + low(reference)
    high_out, _ = wavelet_decomposition(out)
    _, low_ref = wavelet_decomposition(ref)
    assert torch.allclose(fixed, high_out + low_ref, atol=1e-6)


def test_wavelet_identity_when_reference_is_output_and_resizes_reference():
    x = _smooth(4) + 0.05 * _texture()
    assert torch.allclose(wavelet_color_fix(x, x), x, atol=1e-5)
    small = _smooth(5, (2, 3, 16, 18))
    fixed = wavelet_color_fix(x, small)
    assert fixed.shape == x.shape
    up = F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)
    assert torch.allclose(fixed, wavelet_color_fix(x, up), atol=1e-6)


def test_dispatch_dtypes_and_no_mutation():
    x = _smooth(6).half()
    r = _smooth(7)
    x0, r0 = x.clone(), r.clone()
    for method in ("adain", "wavelet"):
        y = color_fix(x, r, method)
        assert y.dtype == torch.float16 and y.shape == x.shape and torch.isfinite(y).all()
    assert color_fix(x, r, "none") is x
    assert torch.equal(x, x0) and torch.equal(r, r0)
    with pytest.raises(ValueError, match="method"):
        color_fix(x, r, "histogram")
    with pytest.raises(ValueError, match="\\(B, C\\)"):
        color_fix(x, r[:1], "adain")
    with pytest.raises(ValueError, match="\\(B, C, H, W\\)"):
        color_fix(x[0], r[0], "wavelet")
