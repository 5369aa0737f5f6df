"""Reference MoR convolution: base conv + 1x1 up-projection of gated rank channels (MOR_SPEC 2.2).

Each sample's active ranks are gathered (:mod:`.factors`): one ``k x k`` convolution with ``n``
output channels (a grouped convolution, one group per sample, when the batch has several samples),
then the gated 1x1 up-projection added into the base conv's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .factors import add_lowrank_conv2d, cast, rank_factors
from .mor_lora import compute_dtype


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
    xc = cast(x, ct)
    y = F.conv2d(xc, cast(weight, ct), cast(bias, ct), stride, padding, dilation)
    f = rank_factors(lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    y = add_lowrank_conv2d(y, xc, f, stride, padding, dilation)
    return cast(y, x.dtype)
