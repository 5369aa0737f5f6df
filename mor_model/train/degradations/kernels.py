"""Blur kernels of the Real-ESRGAN degradation model (float64, ``(k, k)``, summing to 1): isotropic and
anisotropic Gaussian, generalised Gaussian, plateau and 2-D sinc, following BasicSR's ``degradations.py``
(re-implemented here), and the random draws of a kernel per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import _DEFAULT_KERNEL_PROB, KERNEL_TYPES, DegradationConfig, _Rng

__all__ = [
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "plateau_kernel",
    "random_blur_kernel",
    "random_mixed_kernel",
    "sinc_kernel",
]


# --------------------------------------------------------------------------------------------------
# kernels (float64, (k, k), summing to 1)


def _grid(k: int) -> torch.Tensor:
    ax = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # (k, k, 2): (x, y) per pixel


def _quad_form(k: int, sig_x: float, sig_y: float, theta: float) -> torch.Tensor:
    """x^T Sigma^-1 x on the grid, Sigma = R diag(sig_x^2, sig_y^2) R^T with R the rotation by theta.

    Closed form: Sigma^-1 = R diag(1 / sig_x^2, 1 / sig_y^2) R^T.
    """
    c, s = math.cos(theta), math.sin(theta)
    ix, iy = 1.0 / sig_x**2, 1.0 / sig_y**2
    a = c * c * ix + s * s * iy  # (0, 0)
    b = c * s * (ix - iy)  # (0, 1) == (1, 0)
    d = s * s * ix + c * c * iy  # (1, 1)
    g = _grid(k)
    x, y = g[..., 0], g[..., 1]
    return a * x * x + 2 * b * x * y + d * y * y


def _normalise(kernel: torch.Tensor) -> torch.Tensor:
    return kernel / kernel.sum()


def gaussian_kernel(k: int, sig_x: float, sig_y: float | None = None, theta: float = 0.0) -> torch.Tensor:
    """Bivariate Gaussian ``exp(-x^T Sigma^-1 x / 2)``; isotropic when ``sig_y`` is None."""
    sig_y = sig_x if sig_y is None else sig_y
    return _normalise(torch.exp(-0.5 * _quad_form(k, sig_x, sig_y, theta)))


def generalized_gaussian_kernel(k: int, sig_x: float, sig_y: float | None, theta: float, beta: float) -> torch.Tensor:
    """Generalised Gaussian ``exp(-(x^T Sigma^-1 x)^beta / 2)`` (beta = 1: Gaussian)."""
    sig_y = sig_x if sig_y is None else sig_y
    return _normalise(torch.exp(-0.5 * _quad_form(k, sig_x, sig_y, theta).pow(beta)))


def plateau_kernel(k: int, sig_x: float, sig_y: float | None, theta: float, beta: float) -> torch.Tensor:
    """Plateau-shaped ``1 / ((x^T Sigma^-1 x)^beta + 1)``."""
    sig_y = sig_x if sig_y is None else sig_y
    return _normalise(1.0 / (_quad_form(k, sig_x, sig_y, theta).pow(beta) + 1.0))


def sinc_kernel(k: int, cutoff: float, pad_to: int = 0) -> torch.Tensor:
    """2-D sinc (ideal circular low-pass, cutoff in radians/pixel) ``w J1(w r) / (2 pi r)``, centre ``w^2 / (4 pi)``.

    Models ringing and overshoot artifacts. Zero-padded to ``pad_to`` when that is larger.
    """
    if k % 2 == 0:
        raise ValueError(f"sinc kernel size must be odd, got {k}")
    r = _grid(k).norm(dim=-1)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    kernel = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), kernel)
    kernel = _normalise(kernel)
    return _pad_kernel(kernel, pad_to)


def _pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    k = kernel.shape[-1]
    if size > k:
        p = (size - k) // 2
        kernel = F.pad(kernel, (p, p, p, p))
    return kernel


def _random_beta(rng: _Rng, beta_range: tuple[float, float]) -> float:
    # BasicSR: half the time in [beta_min, 1], otherwise in [1, beta_max]
    if rng.uniform(0.0, 1.0) < 0.5:
        return rng.uniform(beta_range[0], 1.0)
    return rng.uniform(1.0, beta_range[1])


def random_mixed_kernel(
    rng_or_generator: torch.Generator | int,
    kernel_size: int,
    kernel_list=KERNEL_TYPES,
    kernel_prob=_DEFAULT_KERNEL_PROB,
    sigma_range: tuple[float, float] = (0.2, 3.0),
    betag_range: tuple[float, float] = (0.5, 4.0),
    betap_range: tuple[float, float] = (1.0, 2.0),
) -> torch.Tensor:
    """One kernel of a type drawn from ``kernel_list`` with ``kernel_prob`` (BasicSR ``random_mixed_kernels``)."""
    rng = _Rng.wrap(rng_or_generator)
    kind = rng.choice(list(kernel_list), list(kernel_prob))
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sig_x = rng.uniform(*sigma_range)
    if iso:
        sig_y, theta = sig_x, 0.0
    else:
        sig_y = rng.uniform(*sigma_range)
        theta = rng.uniform(-math.pi, math.pi)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(kernel_size, sig_x, sig_y, theta, _random_beta(rng, betag_range))
    if kind.startswith("plateau"):
        return plateau_kernel(kernel_size, sig_x, sig_y, theta, _random_beta(rng, betap_range))
    return gaussian_kernel(kernel_size, sig_x, sig_y, theta)


def random_blur_kernel(generator: torch.Generator | int, cfg: DegradationConfig, second: bool = False) -> torch.Tensor:
    """A first- or second-stage kernel, padded to ``cfg.blur_kernel_size`` (RealESRGANDataset.__getitem__)."""
    rng = _Rng.wrap(generator)
    size = rng.odd_kernel_size(cfg.blur_kernel_size)
    sinc_prob = cfg.sinc_prob2 if second else cfg.sinc_prob
    if rng.uniform(0.0, 1.0) < sinc_prob:
        cutoff = rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi)
        kernel = sinc_kernel(size, cutoff)
    else:
        kernel = random_mixed_kernel(
            rng,
            size,
            cfg.kernel_list2 if second else cfg.kernel_list,
            cfg.kernel_prob2 if second else cfg.kernel_prob,
            cfg.blur_sigma2 if second else cfg.blur_sigma,
            cfg.betag_range2 if second else cfg.betag_range,
            cfg.betap_range2 if second else cfg.betap_range,
        )
    return _pad_kernel(kernel, cfg.blur_kernel_size)


def _final_sinc_kernel(rng: _Rng, cfg: DegradationConfig) -> torch.Tensor:
    if rng.uniform(0.0, 1.0) < cfg.final_sinc_prob:
        size = rng.odd_kernel_size(cfg.blur_kernel_size)
        return sinc_kernel(size, rng.uniform(math.pi / 3, math.pi), pad_to=cfg.blur_kernel_size)
    pulse = torch.zeros(cfg.blur_kernel_size, cfg.blur_kernel_size, dtype=torch.float64)
    pulse[cfg.blur_kernel_size // 2, cfg.blur_kernel_size // 2] = 1.0
    return pulse
