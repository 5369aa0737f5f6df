"""Reference fused layer: ``F.linear(x, weight, bias) + mor_lora(...)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .factors import cast
from .mor_lora import add_lora_delta, compute_dtype


def mor_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``W0 x + b + scaling * B (g * (A x))`` with the base GEMM in the same compute dtype; the
    low-rank part is added into the base GEMM's output (one output tensor, no extra pass).

    Shapes: ``x (B, T, d_in)``, ``weight (d_out, d_in)``, ``bias (d_out,)`` or None, the rest as in
    ``mor_lora``. Returns ``(B, T, d_out)`` in ``x.dtype``.
    """
    ct = compute_dtype(x.dtype, upcast)
    xc = cast(x, ct)
    y = F.linear(xc, cast(weight, ct), cast(bias, ct))
    y = add_lora_delta(y, xc, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    return cast(y, x.dtype)
