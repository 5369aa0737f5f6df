"""``backend="blas"``: the compiled extension's BLAS CPU path for sample-routed MoR layers (what ``"auto"``
runs on CPU when ``mor_kernels._C`` is built; :data:`mor_kernels.dispatch.DECISIONS` cites the measurement).

One C++ op per public op does the whole call (``csrc/cpu/blas_mor_linear.cpp``, ``blas_mor_conv2d.cpp``): the
rank lists read from ``idx`` on the host, the base GEMM/convolution in ATen's BLAS / oneDNN, and the rank work
either in the AVX-512 rank kernels (``csrc/cpu/rank_kernels.h``: float32 on a CPU with AVX-512F; they read the
active rows of ``lora_a`` and columns of ``lora_b`` where they are) or, without them, in ATen GEMMs on the
gathered active ranks (gates folded in): per-sample merged weights (inference, when the cost model says so) or
the low-rank path (``u = A_act x``, ``y += B_act diag(g) u`` in place), and a backward with a dense LoRA's
GEMMs (ATen only). :func:`rank_kernels` says which runs here. On a CPU the cost of a MoR layer next to its
base GEMM is mostly per-op overhead (each torch op issued after the base GEMM waits on the caches it evicted),
so the whole op is one dispatcher hop instead of the reference's dozen Python-issued ops; the FLOPs are the
reference's.

Same maths as the reference (:mod:`mor_kernels.reference`), which stays the test oracle; the C++ loop kernels
(``backend="cpp"``) stay the CUDA kernels' oracle-independent CPU twin. Token routing has no per-sample
gathers to do: this backend runs the reference's masked all-rank path for it. ``mor_lora`` and ``route`` are
not implemented here (``"auto"`` runs the reference for them). The public ops call the C++ ops directly on their
lean path (:func:`mor_kernels.functional.mor_linear`); the functions below are the canonical backend
signatures used by the general path (explicit ``backend="blas"`` with unusual arguments, autocast...).
"""

from __future__ import annotations

import math
import os

import torch

from .. import _extension
from ..reference import mor_linear as _reference_linear

_C, _LOAD_ERROR = _extension.load()
if _C is not None and os.environ.get("MOR_CPU_RANK_KERNELS", "1") == "0":  # the A/B switch of the benchmarks
    torch.ops.mor.cpu_rank_kernels(False)

#: the C++ ops each public op needs
OP_KERNELS = {"mor_linear": "blas_mor_linear_fwd", "mor_conv2d": "blas_mor_conv2d_fwd"}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # 16-bit computed in float32
NEVER = math.inf  # merge_above: rho is never above it


def unavailable_reason(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Why the BLAS path cannot run ``op`` on ``device`` for ``dtype`` inputs (None when it can)."""
    if _C is None:
        return f"extension not built: {_LOAD_ERROR}"
    if torch.device(device).type != "cpu":
        return f"the BLAS path reads the routing on the host: CPU tensors only, got {torch.device(device).type}"
    if not _extension.has_kernel(OP_KERNELS[op], "CPU"):
        return f"mor::{OP_KERNELS[op]} is not in this build of mor_kernels._C (rebuild it)"
    if dtype not in DTYPES:
        return f"{str(dtype).replace('torch.', '')} unsupported (float32, float64, float16, bfloat16)"
    return None


def rank_kernels() -> str:
    """Where this process runs the BLAS path's float32 rank work, and why (for ``explain_backend``)."""
    if _C is None:
        return f"nowhere: {_LOAD_ERROR}"
    if torch.ops.mor.cpu_rank_kernels(None):
        return "the AVX-512 rank kernels (csrc/cpu/rank_kernels.h; float64 in ATen GEMMs)"
    if "AVX512" in torch.backends.cpu.get_cpu_capability():
        why = "MOR_CPU_RANK_KERNELS=0 or torch.ops.mor.cpu_rank_kernels(False) switched them off"
    else:
        why = "this CPU has no AVX-512F"
    return f"ATen GEMMs on the gathered ranks ({why})"


def linear_op():
    """``torch.ops.mor.blas_mor_linear.default`` (x, weight, bias, lora_a, lora_b, idx, gate, num_shared,
    scaling, merge_above, check_indices)."""
    return torch.ops.mor.blas_mor_linear.default


def conv2d_op():
    """``torch.ops.mor.blas_mor_conv2d.default`` (..., scaling, stride, padding, dilation, merge_above,
    check_indices)."""
    return torch.ops.mor.blas_mor_conv2d.default


def mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling):
    """Canonical backend signature (``x (B, T, d_in)``, ``idx`` int32 ``(B, k)`` or ``(B, T, k)``); never merges
    (the public op decides merging before it gets here)."""
    if idx.dim() == 3:  # token routing: no per-sample gathers; the reference's masked all-rank path
        return _reference_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling)
    return linear_op()(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, NEVER, False)


def mor_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    """Canonical backend signature (``stride``/``padding``/``dilation`` pairs); never merges."""
    return conv2d_op()(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, list(stride), list(padding),
                       list(dilation), NEVER, False)  # fmt: skip
