"""Reference MoR convolution: base conv + 1x1 up-projection of gated rank channels (MOR_SPEC 2.2).

Each sample's active ranks are gathered (:mod:`.rank_lists`): one ``k x k`` convolution with ``n``
output channels (a grouped convolution, one group per sample, when the batch has several samples),
then the gated 1x1 up-projection added into the base conv's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mor_lora import cast, compute_dtype, gated
from .rank_lists import gather_a, gather_b, sample_rank_lists


def rank_conv(x: torch.Tensor, a: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``x (B, C_in, H, W)`` convolved per sample with its own filters ``a (B, n, C_in, kh, kw)``:
    ``(B, n, H_out, W_out)`` (one plain conv for B = 1, else a grouped conv with ``groups = B``)."""
    batch, n = a.shape[:2]
    if batch == 1:
        return F.conv2d(x, a[0], None, stride, padding, dilation)
    flat = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    h = F.conv2d(flat, a.reshape(batch * n, *a.shape[2:]), None, stride, padding, dilation, groups=batch)
    return h.view(batch, n, *h.shape[2:])


def add_up_projection(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y (B, C_out, H, W) += b (B, C_out, n) @ h (B, n, H, W)`` over the pixels, in place when ``y`` is
    NCHW- or NHWC-contiguous (out of place otherwise)."""
    batch, c_out = y.shape[:2]
    if y.is_contiguous():
        y.view(batch, c_out, -1).baddbmm_(b, h.reshape(batch, h.shape[1], -1))
        return y
    if y.is_contiguous(memory_format=torch.channels_last):
        ht = h.permute(0, 2, 3, 1).reshape(batch, -1, h.shape[1])  # (B, HW, n)
        y.permute(0, 2, 3, 1).view(batch, -1, c_out).baddbmm_(ht, b.transpose(1, 2))
        return y
    return y + torch.einsum("bon,bnhw->bohw", b, h)


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
    lists = sample_rank_lists(idx, gate, num_shared, lora_a.shape[0], scaling, ct)
    h = rank_conv(xc, gather_a(cast(lora_a, ct), lists), stride, padding, dilation)  # (B, n, H_out, W_out)
    h = gated(h, lists.weight[:, :, None, None])
    y = add_up_projection(y, h, gather_b(cast(lora_b, ct), lists))
    return cast(y, x.dtype)
