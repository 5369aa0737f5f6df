"""Reference MoR convolution: base conv + 1x1 up-projection of gated rank channels (MOR_SPEC 2.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mor_lora import compute_dtype, finite_ranks, gate_ranks, routing_gate


def mor_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    stride=1,
    padding=0,
    dilation=1,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``conv(x, W0) + b + scaling * B (g * conv(x, A))``, sample routing.

    Shapes: ``x (B, C_in, H, W)``, ``weight (C_out, C_in, kh, kw)``, ``bias (C_out,)`` or None,
    ``lora_a (R, C_in, kh, kw)``, ``lora_b (C_out, R)``, ``idx``/``gate (B, k)``. The rank
    convolution uses the base conv's stride, padding and dilation. Returns ``(B, C_out, H_out,
    W_out)`` in ``x.dtype``.
    """
    ct = compute_dtype(x.dtype, upcast)
    xc = x.to(ct)
    a, b, bad = finite_ranks(lora_a.to(ct), lora_b.to(ct))  # MOR_SPEC 2.2: see gate_ranks
    ranks = lora_a.shape[0]
    y = F.conv2d(xc, weight.to(ct), None if bias is None else bias.to(ct), stride, padding, dilation)
    h = F.conv2d(xc, a, None, stride, padding, dilation).movedim(1, -1)  # (B, H_out, W_out, R)
    g = routing_gate(idx, gate, num_shared, ranks, 1.0, 4, ct)  # (B, 1, 1, R)
    h = gate_ranks(h, g * scaling, g, bad).movedim(-1, 1)
    y = y + F.conv2d(h, b[:, :, None, None])
    return y.to(x.dtype)
