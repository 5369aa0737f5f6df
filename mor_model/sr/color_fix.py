"""Colour correction of SR outputs against the (upsampled) low-quality input.

One-step diffusion SR tends to shift colours; the usual fix (StableSR, OSEDiff) transfers the colour
of the input back onto the output:

- ``"adain"`` (default): per sample and channel, the output's spatial mean and standard deviation
  are replaced by the reference's: ``(x - mean_x) / std_x * std_ref + mean_ref``.
- ``"wavelet"``: the output is split into a low-frequency band and high-frequency bands by a
  multi-level "a trous" wavelet (a 3x3 binomial blur dilated by 1, 2, 4, 8, 16 with replicate
  padding, as in StableSR); the result is the output's high bands plus the reference's low band.
- ``"none"``: the output unchanged.

Any value range works (both methods commute with affine maps of the range); the result is not
clamped, the caller clamps after converting to its output range. Computation is in float32 (or
float64 for float64 inputs) and the result has the output's dtype. Inputs are never modified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COLOR_FIX_METHODS", "adain_color_fix", "wavelet_color_fix", "wavelet_decomposition", "color_fix"]

COLOR_FIX_METHODS = ("adain", "wavelet", "none")


def _check(output: torch.Tensor, reference: torch.Tensor) -> None:
    for name, t in (("output", output), ("reference", reference)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, C, H, W), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if output.shape[:2] != reference.shape[:2]:
        raise ValueError(
            f"output and reference must agree in (B, C): output {tuple(output.shape)}, reference {tuple(reference.shape)}"
        )


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def adain_color_fix(output: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's spatial mean/std of ``output`` to ``reference``.

    Args:
        output: (B, C, H, W) the SR result.
        reference: (B, C, H', W') the colour reference (usually the bicubic-upsampled input; any size).
        eps: added to the variances (StableSR uses 1e-5).

    Returns:
        (B, C, H, W) tensor with ``reference``'s per-channel statistics, dtype of ``output``.
    """
    _check(output, reference)
    dt = _work_dtype(output)
    x = output.to(dt)
    r = reference.to(output.device, dt)
    x_mean = x.mean(dim=(2, 3), keepdim=True)
    x_std = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    r_mean = r.mean(dim=(2, 3), keepdim=True)
    r_std = (r.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return ((x - x_mean) / x_std * r_std + r_mean).to(output.dtype)


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    c = x.shape[1]
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = torch.outer(k1, k1).expand(c, 1, 3, 3)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, kernel, groups=c, dilation=radius)


def wavelet_decomposition(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (B, C, H, W) into ``(high, low)`` with ``high + low == x``.

    ``low`` is ``x`` blurred by the 3x3 binomial kernel at dilations 1, 2, ..., 2^(levels-1) in turn;
    ``high`` is the sum of the detail bands removed at each level.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _wavelet_blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(output: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Replace the low-frequency band of ``output`` with that of ``reference``.

    Args:
        output: (B, C, H, W) the SR result.
        reference: (B, C, H', W'); resized to (H, W) with bicubic interpolation when the sizes differ
            (pass the upsampled low-quality input to avoid that).
        levels: wavelet levels (5, as StableSR: the low band keeps structures larger than ~60 px).

    Returns:
        (B, C, H, W): ``high(output) + low(reference)``, dtype of ``output``.
    """
    _check(output, reference)
    dt = _work_dtype(output)
    x = output.to(dt)
    r = reference.to(output.device, dt)
    if r.shape[-2:] != x.shape[-2:]:
        r = F.interpolate(r, size=x.shape[-2:], mode="bicubic", align_corners=False)
    high, _ = wavelet_decomposition(x, levels)
    _, low = wavelet_decomposition(r, levels)
    return (high + low).to(output.dtype)


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """Apply the colour fix named by ``method`` (one of ``COLOR_FIX_METHODS``)."""
    if method == "adain":
        return adain_color_fix(output, reference)
    if method == "wavelet":
        return wavelet_color_fix(output, reference)
    if method == "none":
        _check(output, reference)
        return output
    raise ValueError(f"method must be one of {COLOR_FIX_METHODS}, got {method!r}")
