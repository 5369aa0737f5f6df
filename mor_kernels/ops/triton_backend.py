"""``backend="triton"``: the fused Triton kernels behind the canonical backend signatures.

``route`` (``mor::triton_route``), ``mor_lora``/``mor_linear`` (``mor::triton_lora_*``) and
``mor_conv2d`` (the linear kernels for 1x1, else cuDNN convolutions + a Triton epilogue, ``mor::triton_conv2d``),
each a ``torch.library`` custom op with
a fake implementation and an autograd.Function. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (for tests).

Precision and determinism: every Triton dot accumulates in float32 with IEEE float32 products (no
TF32); ``mor_conv2d``'s cuDNN convolutions with float32 operands run with TF32 off too. Partial sums
are reduced in a fixed order (split-K's one atomic, an ``acq_rel`` arrival counter, orders the partial writes
before the reducing split reads them; relaxing it would break results, and it picks no order of summation) and
the backward convolutions use cuDNN's deterministic algorithms, so forward and backward are bitwise repeatable
on one device for identical shapes. Not across shapes: the split of a K loop depends on the batch and the token
count, so one image alone and in a batch can differ in the low bits. Operands are cast to one compute dtype
first (autocast's when it is on, else ``x``'s). Every launch runs on its tensors' device.
"""

from __future__ import annotations

import torch

from .triton_mor_conv2d import mor_conv2d, mor_conv2d_prepared
from .triton_mor_lora import mor_linear, mor_linear_prepared, mor_lora
from .triton_route import route

__all__ = ["mor_conv2d", "mor_conv2d_prepared", "mor_linear", "mor_linear_prepared", "mor_lora", "route",
           "unavailable_reason"]  # fmt: skip

_DOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run ``op`` for ``dtype`` inputs (None when they can)."""
    if op != "route" and dtype not in _DOT_DTYPES:
        return f"the Triton kernels support float32, float16 and bfloat16 inputs (tl.dot), not {dtype}"
    if device.type == "cuda" and dtype == torch.bfloat16 and op != "route":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"bfloat16 tl.dot needs a GPU of compute capability 8.0 or newer, this one is {major}.{minor}"
    return None
