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
