"""Fused kernels and reference ops for Mixture-of-Ranks (MoR) adapters.

Public ops (MOR_SPEC section 6): :func:`route`, :func:`mor_lora`, :func:`mor_linear`,
:func:`mor_conv2d`, each with ``backend="auto" | "reference" | "triton" | "cuda" | "cpp"``.
:func:`explain_backend` says which backend ``"auto"`` runs on a device and why not a faster one (with
the measurement behind the decision); :func:`merge_decision` says whether a call runs per-sample merged
weights (inference, sample routing) or the low-rank path, and why.

Importing this package never touches the GPU, Triton or the compiled extension; those load on
first use.
"""

from .dispatch import BackendUnavailableError, available_backends
from .dispatch import explain as explain_backend
from .functional import merge_decision, mor_conv2d, mor_linear, mor_lora, route

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "explain_backend",
    "merge_decision",
    "mor_conv2d",
    "mor_linear",
    "mor_lora",
    "route",
]
