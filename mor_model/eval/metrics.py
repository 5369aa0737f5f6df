"""Full-reference SR metrics: PSNR and SSIM with the conventions of the SR literature.

The conventions are those of BasicSR's ``calculate_psnr`` / ``calculate_ssim`` (and of the MATLAB
scripts the SR papers use), so numbers match published tables:

- images are RGB in ``[0, 1]``; they are compared on the 0-255 scale;
- ``y_channel=True`` (the default) compares the luma of ITU-R BT.601 in studio range,
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (R, G, B in ``[0, 1]``, so ``Y`` in ``[16, 235]``),
  like BasicSR's ``rgb2ycbcr(img, y_only=True)``; with ``y_channel=False`` the three RGB channels are
  used and SSIM is the mean over channels;
- ``crop_border`` pixels (the scale factor, usually 4) are removed from every side first;
- PSNR = ``10 log10(255^2 / MSE)`` per image (infinite for identical images);
- SSIM uses an 11x11 Gaussian window with sigma 1.5, ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``,
  population (biased) statistics, and averages the SSIM map over the "valid" region (the window fully
  inside the cropped image), exactly like BasicSR's ``_ssim`` and skimage's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.

No rounding is applied: images read from 8-bit files are already on the 1/255 grid. Computation is in
float64, so the results do not depend on the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rgb_to_y", "psnr", "ssim", "mse_to_psnr"]

_Y_WEIGHTS = (65.481, 128.553, 24.966)


def _as_batch(img: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, 3, H, W) or (3, H, W), got {type(img).__name__}")
    if img.dim() == 3:
        img = img.unsqueeze(0)
    if img.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W) or (C, H, W), got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got {img.dtype}")
    return img


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """BT.601 studio-range luma of an RGB image in ``[0, 1]``: (B, 3, H, W) -> (B, 1, H, W) on 0-255.

    Same as BasicSR ``rgb2ycbcr(img, y_only=True) * 255``: values in ``[16, 235]``.
    """
    img = _as_batch(img, "img")
    if img.shape[1] != 3:
        raise ValueError(f"img must have 3 (RGB) channels, shape (B, 3, H, W); got {tuple(img.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True) + 16.0


def _prepare(pred: torch.Tensor, target: torch.Tensor, crop_border: int, y_channel: bool) -> tuple:
    pred = _as_batch(pred, "pred")
    target = _as_batch(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    h, w = pred.shape[-2:]
    if 2 * crop_border >= h or 2 * crop_border >= w:
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
    pred = pred.detach().to(torch.float64)
    target = target.detach().to(pred.device, torch.float64)
    if y_channel:
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    else:
        pred, target = pred * 255.0, target * 255.0
    if crop_border:
        c = crop_border
        pred, target = pred[..., c:-c, c:-c], target[..., c:-c, c:-c]
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, *, crop_border: int = 0, y_channel: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image.

    Args:
        pred, target: (B, 3, H, W) or (3, H, W) RGB in ``[0, 1]`` (any float dtype).
        crop_border: pixels removed on each side (use the scale factor).
        y_channel: compare BT.601 luma (default) instead of RGB.

    Returns:
        float64 tensor (B,); ``inf`` where the images are identical.
    """
    p, t = _prepare(pred, target, crop_border, y_channel)
    mse = (p - t).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 -> inf


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    # Same as cv2.getGaussianKernel(11, 1.5) outer product (BasicSR), and skimage's gaussian filter with
    # truncate=3.5 at sigma=1.5 (radius 5).
    ax = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = True,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with the SR conventions of the module docstring.

    Args:
        pred, target: (B, 3, H, W) or (3, H, W) RGB in ``[0, 1]``.
        crop_border: pixels removed on each side before the SSIM map is computed.
        y_channel: BT.601 luma (default) or the mean over the RGB channels.

    Returns:
        float64 tensor (B,); 1.0 for identical images.
    """
    p, t = _prepare(pred, target, crop_border, y_channel)
    if p.shape[-1] < window_size or p.shape[-2] < window_size:
        raise ValueError(
            f"images (after the border crop) must be at least {window_size}x{window_size}, got {tuple(p.shape[-2:])}"
        )
    c = p.shape[1]
    win = _gaussian_window(window_size, sigma, p.dtype, p.device).expand(c, 1, window_size, window_size)

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, win, groups=c)  # "valid": no padding, like BasicSR's [5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_p, mu_t = filt(p), filt(t)
    var_p = filt(p * p) - mu_p**2
    var_t = filt(t * t) - mu_t**2
    cov = filt(p * t) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ssim_map.flatten(1).mean(dim=1)


def mse_to_psnr(mse: float, peak: float = 255.0) -> float:
    """``10 log10(peak^2 / mse)``; a helper for tests and reports."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)
