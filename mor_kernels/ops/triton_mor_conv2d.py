"""``mor_conv2d`` on Triton, fused around torch's (cuDNN's) convolution.

1x1 convolutions with stride 1 and no padding are a Linear over channels: they run through the fused linear
kernels (:mod:`.triton_mor_lora`) on a token view of ``x`` (``(B, H W, C)``; a view for NCHW and channels-last
inputs alike, the kernels take the strides), with ``y`` and ``dx`` in ``x``'s layout: one launch forward, no
epilogue pass.

Other convolutions (``mor::triton_conv2d``): ``z = conv(x, W0)`` and ``z_rank = conv(x, A)`` (two cuDNN calls;
no ``[W0; A]`` weight is built, so nothing weight-sized is allocated or copied per call), then one Triton pass
(``mor::triton_conv2d``'s :func:`..kernels.mor_conv2d.conv_up`) adds bias and ``B (scaling g z_rank)`` into
``z`` in place, which is ``y``. That pass is the price of keeping cuDNN for the convolution (PyTorch has no
convolution that accumulates into a given output): one read and one write of ``y``. ``z_rank`` is what the
backward needs (the ungated rank activations), nothing else is stored.

Backward (``mor::triton_conv2d_bwd``): the rank side in two Triton launches (``dy`` read once for ``dh`` and
``dB``; ``dz_rank``, the ``dB`` and gate partials, then their fixed-order reduction), then cuDNN:
``dx = conv_input(W0, dy) + conv_input([A'; A'], [dz_hi; dz_lo])`` and ``dA`` from ``conv_weight(x, [dz_hi;
dz_lo])`` summed over the two halves, with ``A'`` the rank filters with non-finite values zeroed (MOR_SPEC
2.2: an unpicked rank's zero ``dz`` must not meet its NaN filter). For 16-bit inputs ``dz`` is split into
``hi = round(dz)`` and ``lo = round(dz - hi)``: one 16-bit convolution over ``2R`` channels sums over every
pixel with a float32-accurate ``dz``, in place of the float32 convolution on ``x.float()`` that was needed
before. On CPU (the interpreter tests) the 16-bit convolutions run in float32 on the same rounded operands,
as CPU half-precision convolutions may accumulate in half precision.

cuDNN settings (:mod:`.cudnn_conv`): TF32 off for float32 operands and deterministic backward convolutions,
so the whole backward is bitwise repeatable for identical shapes (the Triton parts sum every partial in a fixed
order; the backward's split of its ``C_out`` loop, which depends on the batch and the image size, uses the linear
kernels' arrival counter, see :mod:`..kernels.mor_lora`).

Operands: ``x``, ``weight``, ``bias``, ``lora_a`` and ``lora_b`` are cast to one compute dtype first
(autocast's when it is on, else ``x``'s), as the kernels' dots need.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import mor_conv2d as KC
from ..validation import needs_grad
from . import cudnn_conv as CC
from .cudnn_conv import _conv, cudnn_settings
from .triton_mor_lora import _apply, cast_operands, compute_dtype, eager_inference

# ---------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("mor::triton_conv2d", mutates_args=())
def triton_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(B, C_in, H, W)`` -> ``y (B, C_out, H', W')`` (the layout cuDNN gives ``conv(x, W0)``) and
    ``z_rank = conv(x, A) (B, R, H', W')``; three launches (two convolutions, the Triton epilogue)."""
    return _forward(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation)


def _forward(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    """The body of ``triton_conv2d`` (also called directly for eager inference)."""
    with cudnn_settings(x.dtype, x.device, deterministic=False):
        z = _conv(x, weight, stride, padding, dilation)
        z_rank = _conv(x, lora_a, stride, padding, dilation)
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with unit stride
    y = KC.conv_up(_flat(z), _flat(z_rank), lora_b, bias, idx.contiguous(), gate.contiguous(), num_shared, scaling)
    return y, z_rank


@triton_conv2d.register_fake
def _(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    return _conv(x, weight, stride, padding, dilation), _conv(x, lora_a, stride, padding, dilation)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` with H and W flattening into one pixel stride (a cuDNN output already does)."""
    return t if t.stride(2) == t.stride(3) * t.shape[3] or t.shape[2] == 1 else t.contiguous()


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the backward convolutions' operands: the input's on GPU (cuDNN accumulates in float32),
    float32 for 16-bit inputs on CPU (the interpreter test path), whose half convolutions round partial sums."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


@torch.library.custom_op("mor::triton_conv2d_bwd", mutates_args=())
def triton_conv2d_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    z_rank: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dW, dA, dB, dgate)`` of the MoR convolution for ``needs`` (five flags, in that order; the others
    come back as ``(0,)``)."""
    need_x, need_w, need_a, need_b, need_g = (bool(n) for n in needs)
    conv = (stride, padding, dilation)
    ranks = lora_a.shape[0]
    split = x.dtype != torch.float32
    ct = _conv_dtype(x)
    dz, db, dgate = KC.rank_backward(
        _flat(dy), _flat(z_rank), lora_b, idx.contiguous(), gate.contiguous(), num_shared, scaling,
        (need_x or need_a, need_b, need_g), x.dtype, split,
    )  # fmt: skip
    empty = dy.new_empty((0,))
    dx = dw = da = empty
    with cudnn_settings(ct, x.device, deterministic=True):
        xc, dyc, dzc = x.to(ct), dy.to(ct), None if dz is None else dz.to(ct)
        if need_x:
            filters = KC.finite_ranks(lora_a, 2 if split else 1).to(ct)  # [A'; A'] against [dz_hi; dz_lo]
            dx = CC.conv2d_input(x.shape, weight.to(ct), dyc, *conv)
            dx = dx.add_(CC.conv2d_input(x.shape, filters, dzc, *conv)).to(x.dtype)
        if need_w:
            dw = CC.conv2d_weight(xc, weight.shape, dyc, *conv).to(weight.dtype)
        if need_a:
            da = CC.conv2d_weight(xc, (dz.shape[1], *lora_a.shape[1:]), dzc, *conv).to(x.dtype)
            if split:  # one rounding of each half, as a 16-bit cuDNN weight gradient gives, then their sum
                da = torch.add(da[:ranks], da[ranks:])
            da = da.to(lora_a.dtype)
    dx = dx.contiguous(memory_format=_format(x))  # a no-op unless the convolution chose another layout
    return dx, dw.contiguous(), da.contiguous(), db if db is not None else empty, dgate if dgate is not None else empty


def _format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


@triton_conv2d_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, z_rank, idx, gate, num_shared, scaling, stride, padding, dilation, needs):
    empty = dy.new_empty((0,))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x)) if needs[0] else empty
    dw = weight.new_empty(weight.shape) if needs[1] else empty
    da = lora_a.new_empty(lora_a.shape) if needs[2] else empty
    db = lora_b.new_empty(lora_b.shape) if needs[3] else empty
    return dx, dw, da, db, idx.new_empty(idx.shape, dtype=torch.float32) if needs[4] else empty


# ---------------------------------------------------------------------------------------------
# autograd


class _MoRConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, conv, store):
        y, z_rank = triton_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, *conv)
        ctx.save_for_backward(x, weight, lora_a, lora_b, idx, gate, z_rank if store else None)
        ctx.num_shared, ctx.scaling, ctx.conv = num_shared, scaling, conv
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, idx, gate, z_rank = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_gate = ctx.needs_input_grad[:7]
        needs = [need_x, need_w, need_a, need_b, need_gate]
        grads = [None] * 5
        if any(needs):
            outs = triton_conv2d_bwd(
                dy, x, weight, lora_a, lora_b, z_rank, idx, gate, ctx.num_shared, ctx.scaling, *ctx.conv, needs
            )
            grads = [g if n else None for g, n in zip(outs, needs, strict=True)]
        dx, dw, da, db, dgate = grads
        dgate = None if dgate is None else dgate.to(gate.dtype)
        dbias = dy.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
        return dx, dw, dbias, da, db, None, dgate, None, None, None, None


def _is_pointwise(weight, stride, padding) -> bool:
    """A 1x1 convolution with stride 1 and no padding (dilation is moot): a Linear over channels."""
    return tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _pointwise(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling):
    """The 1x1 convolution through the fused linear kernels on ``(B, H W, C)`` token views."""
    batch, c_in, height, width = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, c_in)  # a view for NCHW and channels-last
    y = _apply(tokens, weight.reshape(weight.shape[0], c_in), bias, lora_a.reshape(lora_a.shape[0], c_in), lora_b, idx,
               gate, None, num_shared, scaling)  # fmt: skip
    return y.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def mor_conv2d_prepared(x, weight, bias, lora_a, lora_b, idx, gate, num_shared: int, scaling: float, stride, padding,
                        dilation):  # fmt: skip
    """:func:`mor_conv2d` for checked arguments in one dtype, ``idx`` int32, nothing to differentiate, no autocast
    (see :func:`.triton_mor_lora.mor_linear_prepared`)."""
    if _is_pointwise(weight, stride, padding) or not eager_inference(False, x, weight, bias, lora_a, lora_b, idx, gate):
        return mor_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation)
    return _forward(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, list(stride), list(padding),
                    list(dilation))[0]  # fmt: skip


def mor_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    """Canonical ``mor_conv2d`` (sample routing): x ``(B, C_in, H, W)``, weight ``(C_out, C_in, kh, kw)``,
    lora_a ``(R, C_in, kh, kw)``, lora_b ``(C_out, R)``, idx/gate ``(B, k)`` -> ``(B, C_out, H_out, W_out)``."""
    store = needs_grad(x, weight, bias, lora_a, lora_b, gate)
    # One dtype for every operand (the kernels' dots need it), whatever the caller mixed or autocast
    # would have cast to.
    x, weight, bias, lora_a, lora_b = cast_operands(compute_dtype(x), x, weight, bias, lora_a, lora_b)
    idx, num_shared, scaling = idx.to(torch.int32), int(num_shared), float(scaling)
    if _is_pointwise(weight, stride, padding):
        return _pointwise(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling)
    conv = (list(stride), list(padding), list(dilation))
    if not store:  # nothing to differentiate: the kernels directly, or the custom op (its fallback under vmap)
        fwd = _forward if eager_inference(False, x, weight, bias, lora_a, lora_b, idx, gate) else triton_conv2d
        return fwd(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, *conv)[0]
    return _MoRConv2dFn.apply(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, conv, store)
