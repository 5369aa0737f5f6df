"""Reference fused layer: ``F.linear(x, weight, bias) + mor_lora(...)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mor_lora import compute_dtype, lora_delta


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
    """``W0 x + b + scaling * B (g * (A x))`` with the base GEMM in the same compute dtype.

    Shapes: ``x (B, *tokens, d_in)``, ``weight (d_out, d_in)``, ``bias (d_out,)`` or None, the rest
    as in ``mor_lora``. Returns ``(B, *tokens, d_out)`` in ``x.dtype``.
    """
    ct = compute_dtype(x.dtype, upcast)
    y = F.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct))
    y = y + lora_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    return y.to(x.dtype)
