"""Settings of the Real-ESRGAN degradation model (defaults of ``train_realesrgan_x4plus.yml``) and the
random draws, all taken in a fixed order from one ``torch.Generator``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["KERNEL_TYPES", "DegradationConfig"]

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
_DEFAULT_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)


@dataclass
class DegradationConfig:
    """Probabilities and ranges of the second-order model (Real-ESRGAN x4plus defaults).

    ``*2`` fields are the second stage's. Sigmas are in pixels, noise sigmas on the 0-255 scale,
    ``resize_prob`` is (up, down, keep), ``resize_range`` the (min, max) scale factor.
    """

    blur_kernel_size: int = 21  # kernels are sampled with odd sizes 7..21 and zero-padded to this
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = _DEFAULT_KERNEL_PROB
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)

    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = _DEFAULT_KERNEL_PROB
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)

    final_sinc_prob: float = 0.8

    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)

    resize_modes: tuple[str, ...] = field(default=("area", "bilinear", "bicubic"))

    def __post_init__(self) -> None:
        for name in ("kernel_list", "kernel_list2"):
            bad = [k for k in getattr(self, name) if k not in KERNEL_TYPES]
            if bad:
                raise ValueError(f"{name} has unknown kernel types {bad}; expected a subset of {KERNEL_TYPES}")
        for lst, prob in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, lst)) != len(getattr(self, prob)):
                raise ValueError(f"{prob} must have one probability per entry of {lst}")
        if self.blur_kernel_size < 7 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd and >= 7, got {self.blur_kernel_size}")
        bad = [m for m in self.resize_modes if m not in ("area", "bilinear", "bicubic", "nearest")]
        if bad or not self.resize_modes:
            raise ValueError(f"resize_modes must be a non-empty subset of area/bilinear/bicubic/nearest, got {bad}")
        for name in ("jpeg_range", "jpeg_range2"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi <= 100:
                raise ValueError(f"{name} must satisfy 1 <= min <= max <= 100, got {(lo, hi)}")


# --------------------------------------------------------------------------------------------------
# random draws, all from one torch.Generator


class _Rng:
    def __init__(self, generator: torch.Generator):
        self.g = generator
        self.device = generator.device

    @staticmethod
    def wrap(source) -> _Rng:
        """A ``_Rng`` from a ``torch.Generator``, an int seed, a ``numpy.random.Generator`` (one 63-bit seed
        is drawn from it), or None (a fresh unseeded generator: not reproducible)."""
        if isinstance(source, _Rng):
            return source
        if isinstance(source, torch.Generator):
            return _Rng(source)
        if source is None:
            g = torch.Generator()
            g.seed()
            return _Rng(g)
        if isinstance(source, np.random.Generator):
            source = int(source.integers(0, 2**63 - 1))
        if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
            return _Rng(torch.Generator().manual_seed(int(source)))
        raise TypeError(
            f"generator must be a torch.Generator, an int seed, a numpy.random.Generator or None, got {type(source).__name__}"
        )

    def uniform(self, lo: float, hi: float, n: int | None = None):
        u = torch.rand(1 if n is None else n, generator=self.g, device=self.device, dtype=torch.float64)
        v = (lo + (hi - lo) * u).tolist()
        return v[0] if n is None else v

    def choice(self, items, probs=None):
        p = torch.tensor(probs if probs is not None else [1.0] * len(items), dtype=torch.float64)
        cdf = (p / p.sum()).cumsum(0)
        u = self.uniform(0.0, 1.0)
        return items[min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64)).item()), len(items) - 1)]

    def odd_kernel_size(self, max_size: int) -> int:
        sizes = list(range(7, max_size + 1, 2))  # Real-ESRGAN: 2 * v + 1 for v in 3..10
        return self.choice(sizes)
