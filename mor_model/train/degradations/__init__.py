"""Real-ESRGAN second-order degradations in plain torch (no basicsr), seeded and reproducible: the
settings and random draws (:mod:`.config`), the blur kernels (:mod:`.kernels`) and the pipeline that
applies them to a batch (:mod:`.pipeline`, :func:`degrade`)."""

from .config import KERNEL_TYPES, DegradationConfig
from .kernels import (
    gaussian_kernel,
    generalized_gaussian_kernel,
    plateau_kernel,
    random_blur_kernel,
    random_mixed_kernel,
    sinc_kernel,
)
from .pipeline import add_gaussian_noise, add_poisson_noise, degrade, filter2d, jpeg_compress, random_resize

__all__ = [
    "KERNEL_TYPES",
    "DegradationConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "degrade",
    "filter2d",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "jpeg_compress",
    "plateau_kernel",
    "random_blur_kernel",
    "random_mixed_kernel",
    "random_resize",
    "sinc_kernel",
]
