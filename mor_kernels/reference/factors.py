"""Each sample's active low-rank factors, and the two ways to apply them (sample routing).

:func:`rank_factors` gathers, once per routing, what a sample-routed layer needs: ``a`` = the rows of
``lora_a`` of the sample's active ranks and ``b`` = the matching columns of ``lora_b`` with
``scaling * gate`` folded in (masked slots exact zeros, :mod:`.rank_lists`). Then either

- the **low-rank path** (:func:`add_lowrank_linear`, :func:`add_lowrank_conv2d`): ``y += b (a x)``, two
  skinny GEMMs (convs) over the activations, added into the base layer's output; or
- the **merged path** (:func:`merge_weights`, :func:`merged_linear`, :func:`merged_conv2d`):
  ``W_b = W0 + b a`` (for a conv the 1x1 x kxk composition), then one base-sized GEMM/conv per weight.

The reference ops build the factors per call; a MoR layer in inference builds them once per image
(``mor_model.inference``) and reuses them, and the merged weights, across the image's tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rank_lists import gather_a, gather_b, host_sync_allowed, sample_rank_lists


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)``, skipping the call when there is nothing to do (each op call costs microseconds)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


@dataclass
class RankFactors:
    """The factors of one routing shared by the whole batch (``single``: one sample, or identical routing
    rows): ``a (n, *a_shape)`` and gated ``b (d_out, n)``; else one per sample: ``a (B, n, *a_shape)``,
    ``b (B, d_out, n)``."""

    a: torch.Tensor
    b: torch.Tensor
    single: bool

    @property
    def count(self) -> int:
        """Distinct weights a merge makes: 1, or one per sample."""
        return 1 if self.single else self.a.shape[0]


def one_routing(idx: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether every sample routes alike (checked on the host where that is free; else assumed not)."""
    if idx.shape[0] <= 1:
        return True
    if not host_sync_allowed(idx):
        return False
    return bool(torch.equal(idx, idx[:1].expand_as(idx)) and torch.equal(gate, gate[:1].expand_as(gate)))


def rank_factors(lora_a, lora_b, idx, gate, num_shared: int, scaling: float, dtype: torch.dtype) -> RankFactors:
    """The factors of ``idx``/``gate (B, k)`` in ``dtype`` (differentiable w.r.t. ``lora_a``, ``lora_b``,
    ``gate``); ``lora_a (R, *a_shape)``, ``lora_b (d_out, R)``."""
    single = one_routing(idx, gate)
    if single:
        idx, gate = idx[:1], gate[:1]
    lists = sample_rank_lists(idx, gate, num_shared, lora_a.shape[0], scaling, dtype)
    lora_a, lora_b = cast(lora_a, dtype), cast(lora_b, dtype)
    grad = torch.is_grad_enabled() and (lora_b.requires_grad or lists.weight.requires_grad)
    if single and lists.all_valid:  # one list, nothing masked: two gathers and the gate, no reshaping
        b = lora_b.index_select(1, lists.ranks)
        w = lists.weight.view(-1)
        return RankFactors(lora_a.index_select(0, lists.ranks), b * w if grad else b.mul_(w), True)
    a, b, w = gather_a(lora_a, lists), gather_b(lora_b, lists), lists.weight[:, None, :]
    b = b * w if grad else b.mul_(w)
    return RankFactors(a[0], b[0], True) if single else RankFactors(a, b, False)


# ----------------------------------------------------------------------------------------------
# low-rank path


def lowrank_down_linear(x: torch.Tensor, f: RankFactors) -> torch.Tensor:
    """``h = a x``: ``x (B, T, d_in)`` -> ``(B, T, n)`` (any token dimensions when ``f.single``)."""
    if f.single:
        return F.linear(x, f.a)
    return torch.bmm(x, f.a.transpose(1, 2))


def add_lowrank_linear(y: torch.Tensor | None, x: torch.Tensor, f: RankFactors, *, inplace: bool) -> torch.Tensor:
    """``y + b (a x)`` for ``x (B, T, d_in)``, ``y (B, T, d_out)`` (None: the low-rank part alone);
    ``inplace`` adds into ``y`` (an intermediate of the caller)."""
    h = lowrank_down_linear(x, f)
    if y is None:
        return F.linear(h, f.b) if f.single else torch.bmm(h, f.b.transpose(1, 2))
    if f.single:
        rows = math.prod(y.shape[:-1])  # explicit sizes: also right for an empty batch or an empty list
        y2, h2 = y.view(rows, y.shape[-1]), h.view(rows, h.shape[-1])
        return (y2.addmm_(h2, f.b.t()) if inplace else torch.addmm(y2, h2, f.b.t())).view(y.shape)
    return y.baddbmm_(h, f.b.transpose(1, 2)) if inplace else torch.baddbmm(y, h, f.b.transpose(1, 2))


def lowrank_down_conv2d(x: torch.Tensor, f: RankFactors, stride, padding, dilation) -> torch.Tensor:
    """``x (B, C_in, H, W)`` convolved with each sample's rank filters: ``(B, n, H_out, W_out)`` (one conv
    when the batch shares its ranks, else a grouped conv with ``groups = B``)."""
    if f.single:
        return F.conv2d(x, f.a, None, stride, padding, dilation)
    batch, n = f.a.shape[:2]
    flat = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    h = F.conv2d(flat, f.a.reshape(batch * n, *f.a.shape[2:]), None, stride, padding, dilation, groups=batch)
    return h.view(batch, n, *h.shape[2:])


def add_lowrank_conv2d(y: torch.Tensor, x: torch.Tensor, f: RankFactors, stride, padding, dilation) -> torch.Tensor:
    """``y (B, C_out, H, W) += b @ conv(x, a)`` over the pixels: in place when ``y`` is NCHW- or
    NHWC-contiguous (an intermediate of the caller), out of place otherwise."""
    h = lowrank_down_conv2d(x, f, stride, padding, dilation)
    batch, c_out = y.shape[:2]
    n, pixels = h.shape[1], h.shape[2] * h.shape[3]
    if f.single and batch == 1 and y.is_contiguous():
        y.view(c_out, pixels).addmm_(f.b, h.view(n, pixels))
        return y
    b = f.b.expand(batch, -1, -1) if f.single else f.b
    if y.is_contiguous():
        y.view(batch, c_out, -1).baddbmm_(b, h.reshape(batch, n, -1))
        return y
    if y.is_contiguous(memory_format=torch.channels_last):
        ht = h.permute(0, 2, 3, 1).reshape(batch, -1, n)  # (B, HW, n)
        y.permute(0, 2, 3, 1).view(batch, -1, c_out).baddbmm_(ht, b.transpose(1, 2))
        return y
    return y + torch.einsum("bon,bnhw->bohw", b, h)


# ----------------------------------------------------------------------------------------------
# merged path


def merge_weights(weight: torch.Tensor, f: RankFactors) -> torch.Tensor:
    """``(D, *weight.shape)``: ``W0 + b a`` per distinct routing (``D = f.count``), in ``f``'s dtype."""
    w0 = cast(weight, f.b.dtype).reshape(weight.shape[0], -1)
    if f.single:
        return torch.addmm(w0, f.b, f.a.reshape(f.a.shape[0], -1)).view(1, *weight.shape)
    return torch.baddbmm(w0.unsqueeze(0), f.b, f.a.flatten(2)).view(-1, *weight.shape)


def merged_linear(x: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (B, T, d_in)`` through ``merged (D, d_out, d_in)`` (``D`` 1 or B) plus ``bias``: ``(B, T, d_out)``."""
    x, bias = cast(x, merged.dtype), cast(bias, merged.dtype)
    if merged.shape[0] == 1:
        return F.linear(x, merged[0], bias)
    if bias is None:
        return torch.bmm(x, merged.transpose(1, 2))
    return torch.baddbmm(bias.expand(x.shape[0], 1, -1), x, merged.transpose(1, 2))


def merged_conv2d(x: torch.Tensor, merged: torch.Tensor, bias, stride, padding, dilation) -> torch.Tensor:
    """``x (B, C_in, H, W)`` through ``merged (D, C_out, C_in, kh, kw)`` plus ``bias``: one conv, or a
    grouped conv with ``groups = B`` (a weight per sample); ``(B, C_out, H_out, W_out)``."""
    x, bias = cast(x, merged.dtype), cast(bias, merged.dtype)
    if merged.shape[0] == 1:
        return F.conv2d(x, merged[0], bias, stride, padding, dilation)
    batch, c_out = merged.shape[:2]
    flat = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    grouped_bias = None if bias is None else bias.repeat(batch)
    y = F.conv2d(flat, merged.flatten(0, 1), grouped_bias, stride, padding, dilation, groups=batch)
    return y.view(batch, c_out, *y.shape[2:])
