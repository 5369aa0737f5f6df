"""Per-sample merged inference: fold each sample's active ranks into the base weight, then run one base
GEMM/conv per sample (issue 13, item 1).

With sample routing the ranks of a sample are known before the layer runs, so

    W_b = W0 + scaling * B[:, act_b] diag(g_b) A[act_b]          (a conv: the 1x1 x kxk composition)

gives the layer's exact output in one base-sized GEMM per sample: a ``bmm`` (Linear) or a grouped conv
with ``groups = B`` (Conv2d) when the samples' ranks differ, the plain ``F.linear``/``F.conv2d`` when
there is one sample or every sample routes alike. Building ``W_b`` reads and writes a weight-sized
tensor, so it pays off when the layer has many tokens per weight; :func:`mor_kernels.dispatch.merge_plan`
decides per call. Inference only: nothing here is meant to be differentiated (the public ops never
take this path when a gradient is needed). Masked slots are exact zeros in ``A`` and ``B``
(:mod:`.rank_lists`), so an unpicked rank never reaches ``W_b``, non-finite values included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mor_lora import cast, compute_dtype
from .rank_lists import gather_a, gather_b, host_sync_allowed, sample_rank_lists


def _one_routing(idx: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether every sample routes alike (checked on the host where that is free; else assumed not)."""
    if idx.shape[0] <= 1:
        return True
    if not (host_sync_allowed(idx) and host_sync_allowed(gate)):
        return False
    return bool(torch.equal(idx, idx[:1].expand_as(idx)) and torch.equal(gate, gate[:1].expand_as(gate)))


def merged_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(D, *weight.shape)`` merged weights in ``dtype``: ``D = 1`` when every sample routes alike
    (one sample, or identical ``idx``/``gate`` rows), else ``D = B`` (one per sample).

    ``weight (d_out, d_in)`` or ``(C_out, C_in, kh, kw)``; ``lora_a (R, *weight.shape[1:])``;
    ``lora_b (d_out, R)``; ``idx``/``gate (B, k)`` (sample routing).
    """
    if _one_routing(idx, gate):
        idx, gate = idx[:1], gate[:1]
    lists = sample_rank_lists(idx, gate, num_shared, lora_a.shape[0], scaling, dtype)
    w0 = cast(weight, dtype)
    if lists.batch == 1 and lists.all_valid:  # one weight: W0 + (B_act g) A_act, one GEMM
        a = cast(lora_a, dtype).index_select(0, lists.ranks).view(lists.width, -1)
        b = cast(lora_b, dtype).index_select(1, lists.ranks).mul_(lists.weight)
        return torch.addmm(w0.view(w0.shape[0], -1), b, a).view(1, *weight.shape)
    a = gather_a(cast(lora_a, dtype), lists).flatten(2)  # (D, n, d_in * kh * kw)
    b = gather_b(cast(lora_b, dtype), lists) * lists.weight[:, None, :]  # (D, d_out, n), gated
    return torch.baddbmm(w0.reshape(1, weight.shape[0], -1), b, a).view(-1, *weight.shape)


def merged_linear(x: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (B, T, d_in)`` through ``merged (D, d_out, d_in)`` (``D`` 1 or B) plus ``bias``: ``(B, T, d_out)``
    in ``merged.dtype``."""
    x = cast(x, merged.dtype)
    bias = cast(bias, merged.dtype)
    if merged.shape[0] == 1:
        return F.linear(x, merged[0], bias)
    if bias is None:
        return torch.bmm(x, merged.transpose(1, 2))
    return torch.baddbmm(bias.expand(x.shape[0], 1, -1), x, merged.transpose(1, 2))


def merged_conv2d(
    x: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation
) -> torch.Tensor:
    """``x (B, C_in, H, W)`` through ``merged (D, C_out, C_in, kh, kw)`` (``D`` 1 or B) plus ``bias``: one
    conv, or a grouped conv with ``groups = B`` (a weight per sample); ``(B, C_out, H_out, W_out)``."""
    x = cast(x, merged.dtype)
    bias = cast(bias, merged.dtype)
    if merged.shape[0] == 1:
        return F.conv2d(x, merged[0], bias, stride, padding, dilation)
    batch, c_out = merged.shape[:2]
    flat = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    grouped_bias = None if bias is None else bias.repeat(batch)
    y = F.conv2d(flat, merged.flatten(0, 1), grouped_bias, stride, padding, dilation, groups=batch)
    return y.view(batch, c_out, *y.shape[2:])


def mor_linear_merged(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, *, upcast=True):
    """``mor_linear`` (sample routing) through per-sample merged weights; same signature and result."""
    ct = compute_dtype(x.dtype, upcast)
    merged = merged_weight(weight, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    return cast(merged_linear(x, merged, bias), x.dtype)


def mor_conv2d_merged(
    x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride=1, padding=0, dilation=1, *, upcast=True
):
    """``mor_conv2d`` through per-sample merged weights; same signature and result."""
    ct = compute_dtype(x.dtype, upcast)
    merged = merged_weight(weight, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    return cast(merged_conv2d(x, merged, bias, stride, padding, dilation), x.dtype)
