"""``backend="blas"``: the compiled extension's BLAS CPU path for sample-routed MoR layers (what ``"auto"``
runs on CPU when ``mor_kernels._C`` is built; :data:`mor_kernels.dispatch.DECISIONS` cites the measurement).

One C++ op per public op does the whole call (``csrc/cpu/blas_mor_linear.cpp``, ``blas_mor_conv2d.cpp``): the
rank lists read from ``idx`` on the host, the base GEMM/convolution in ATen's BLAS / oneDNN, and the rank work
either in the rank kernels (``csrc/cpu/rank_kernels.h``: float32 on a CPU with AVX-512F, or AVX2 with FMA; they
read the active rows of ``lora_a`` and columns of ``lora_b`` where they are) or, without them, in ATen GEMMs on the
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


def apply_rank_kernels_setting(value: str) -> None:
    """``MOR_CPU_RANK_KERNELS``, the benchmarks' A/B switch of the rank kernels: ``"1"`` (default: the widest
    instruction set the CPU has), ``"0"`` (off: ATen GEMMs), ``"avx2"`` or ``"avx512"`` (that set; the CPU must
    have it). Anything else, or a set the CPU lacks, is a ValueError naming the variable."""
    if _C is None or value == "1":
        return
    if value == "0":
        torch.ops.mor.cpu_rank_kernels(False)
        return
    if value not in ("avx2", "avx512"):
        raise ValueError(f"MOR_CPU_RANK_KERNELS must be 1, 0, avx2 or avx512, got {value!r}")
    try:
        torch.ops.mor.cpu_rank_isa(value)
    except (RuntimeError, ValueError) as err:  # the op's ValueError, as the dispatcher raises it
        raise ValueError(f"MOR_CPU_RANK_KERNELS={value}: {err}") from None


apply_rank_kernels_setting(os.environ.get("MOR_CPU_RANK_KERNELS", "1"))

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
    isa = torch.ops.mor.cpu_rank_isa(None)
    if isa != "none":
        name = {"avx512": "AVX-512", "avx2": "AVX2"}[isa]
        return f"the {name} rank kernels (csrc/cpu/rank_kernels.h; float64 in ATen GEMMs)"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        why = "MOR_CPU_RANK_KERNELS=0 or torch.ops.mor.cpu_rank_kernels(False) switched them off"
    else:
        why = "this CPU has neither AVX-512F nor AVX2 with FMA"
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
