"""Loads the compiled extension ``mor_kernels._C`` on first use and says why when it cannot."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import torch


def build_info() -> dict | None:
    """What ``setup.py`` recorded about the build (``torch``, ``cuda``, ``arch_list``), or None."""
    path = Path(__file__).with_name("_C_build.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: the ops csrc/registration.cpp defines, all of which these sources call
OPS = (
    "route",
    "dense_gate",
    "lora_fwd",
    "lora_bwd",
    "conv_up",
    "blas_mor_linear",
    "blas_mor_linear_fwd",
    "blas_mor_linear_bwd",
    "blas_mor_conv2d",
    "blas_mor_conv2d_fwd",
    "blas_mor_conv2d_bwd",
    "blas_merged_weights",
    "cpu_rank_kernels",
    "cpu_rank_isa",
)


@functools.cache
def load():
    """``(module, None)`` when the extension imports, else ``(None, reason)``."""
    try:
        module = importlib.import_module("mor_kernels._C")
    except ImportError as err:
        info = build_info() or {}
        built = info.get("torch")
        mismatch = (
            f"; it was built against torch {built} but torch {torch.__version__} is running"
            if built and built != torch.__version__
            else ""
        )
        return None, (
            f"the compiled extension mor_kernels._C is not available ({err}{mismatch}); build it against the "
            "installed torch with `pip install --no-build-isolation .`"
        )
    missing = [op for op in OPS if not hasattr(torch.ops.mor, op)]
    if missing:  # a _C built from older sources (the sources changed, the extension was not rebuilt)
        return None, (
            f"the compiled extension mor_kernels._C is older than these sources: it lacks "
            f"{', '.join('mor::' + op for op in missing)}; rebuild it with `pip install --no-build-isolation .` "
            "(or `python setup.py build_ext --inplace` in a checkout)"
        )
    _register_fakes()
    return module, None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``mor::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA") in this process."""
    module, _ = load()
    if module is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mor::{op}", dispatch_key)


# fake implementations (shapes and dtypes only) of the C++ ops, for torch.compile
def _register_fakes() -> None:
    @torch.library.register_fake("mor::dense_gate")
    def _(idx, gate, num_shared, num_ranks):
        return gate.new_empty((*idx.shape[:-1], num_ranks), dtype=torch.float32)

    @torch.library.register_fake("mor::route")
    def _(logits, top_k, num_zero, renormalize):
        sel = (*logits.shape[:-1], top_k)
        return (
            logits.new_empty(sel, dtype=torch.int32),
            logits.new_empty(sel, dtype=torch.float32),
            logits.new_empty(logits.shape, dtype=torch.float32),
            logits.new_empty(sel, dtype=torch.int32),
        )

    @torch.library.register_fake("mor::lora_fwd")
    def _(x, lora_a, lora_b, idx, gate, num_shared, scaling, base, store_h=True):
        b, t, _ = x.shape
        h = (b, t, lora_a.shape[0]) if store_h else (0,)
        return x.new_empty((b, t, lora_b.shape[0])), x.new_empty(h, dtype=torch.float32)

    @torch.library.register_fake("mor::lora_bwd")
    def _(grad_y, x, lora_a, lora_b, idx, gate, h, num_shared, scaling, output_mask):
        def out(i, shape, dtype):
            return x.new_empty(shape if output_mask[i] else (0,), dtype=dtype)

        return (
            out(0, x.shape, x.dtype),
            out(1, lora_a.shape, x.dtype),
            out(2, lora_b.shape, x.dtype),
            out(3, idx.shape, torch.float32),
        )

    @torch.library.register_fake("mor::conv_up")
    def _(base, z_rank, lora_b, idx, gate, num_shared, scaling):
        return base.new_empty(base.shape)

    _register_blas_fakes()


def _blas_dtype(x) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # the BLAS ops' compute dtype


def _channels_last(x) -> bool:
    """The BLAS conv ops keep channels_last when ``x`` is laid out so (and not also plain contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _grads(x, weight, lora_a, lora_b, idx, gate, mask, dx):
    def out(i, like, dtype=x.dtype):
        return like() if mask[i] else x.new_empty((0,))

    return (
        out(0, dx),
        out(1, lambda: x.new_empty(weight.shape)),
        out(2, lambda: x.new_empty((weight.shape[0],))),
        out(3, lambda: x.new_empty(lora_a.shape)),
        out(4, lambda: x.new_empty(lora_b.shape)),
        out(5, lambda: gate.new_empty(idx.shape)),
    )


def _register_blas_fakes() -> None:
    @torch.library.register_fake("mor::blas_mor_linear_fwd")
    def _(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, merge_above, check_indices, store_u):
        tokens = 1
        for size in x.shape[1:-1]:
            tokens *= size
        u = (x.shape[0], tokens, num_shared + idx.shape[1]) if store_u else (0,)
        return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty(u, dtype=_blas_dtype(x))

    @torch.library.register_fake("mor::blas_mor_linear_bwd")
    def _(grad_y, x, weight, lora_a, lora_b, idx, gate, u, num_shared, scaling, output_mask):
        return _grads(x, weight, lora_a, lora_b, idx, gate, output_mask, lambda: x.new_empty(x.shape))

    def conv_out(x, weight, stride, padding, dilation):
        return [
            (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in (0, 1)
        ]

    @torch.library.register_fake("mor::blas_mor_conv2d_fwd")
    def _(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation, merge_above,
          check_indices, store_u):  # fmt: skip
        h, w = conv_out(x, weight, stride, padding, dilation)
        fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
        y = torch.empty((x.shape[0], weight.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        shape = (x.shape[0], num_shared + idx.shape[1], h, w) if store_u else (0,)
        u = torch.empty(shape, dtype=_blas_dtype(x), device=x.device)
        return y, (u.contiguous(memory_format=fmt) if store_u else u)

    @torch.library.register_fake("mor::blas_mor_conv2d_bwd")
    def _(grad_y, x, weight, lora_a, lora_b, idx, gate, u, num_shared, scaling, stride, padding, dilation, output_mask):
        return _grads(x, weight, lora_a, lora_b, idx, gate, output_mask, lambda: torch.empty_like(x))
