"""``mor_conv2d`` on Triton, fused around torch's (cuDNN's) convolution.

Forward: one convolution with the weight ``[W0; A]`` (ranks as extra output channels,
``mor::conv2d``, see :mod:`.cudnn_conv`), then the ``mor::triton_conv_up`` pass (gates + 1x1 up-projection + add +
bias, ``y`` written once). Backward: the rank-space gradients reuse the linear kernels with pixels as
tokens (``mor::triton_lora_bwd_dh``: one pass over ``dy`` for ``dh``/``du``/``dgate`` and ``dB``); the
convolution's own gradients are ``mor::conv2d_input`` / ``mor::conv2d_weight`` on the
same concatenated weight.

cuDNN settings (:mod:`.cudnn_conv`): TF32 off for float32 operands and deterministic backward
convolutions, so the whole backward is bitwise repeatable (the Triton parts never use atomics).

Operands: ``x``, ``weight``, ``bias``, ``lora_a`` and ``lora_b`` are cast to one compute dtype first
(autocast's when it is on, else ``x``'s), as the kernels' dots need.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels.mor_conv2d import conv_up, out_format
from .cudnn_conv import conv2d_input_op, conv2d_op, conv2d_weight_op
from .triton_mor_lora import _active_ranks, cast_operands, compute_dtype, triton_lora_bwd_dh

# ---------------------------------------------------------------------------------------------
# the Triton pass and the autograd.Function


@torch.library.custom_op("mor::triton_conv_up", mutates_args=())
def triton_conv_up(
    z: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    store_u: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """z ``(B, C_out + R, H, W)`` -> ``y (B, C_out, H, W)`` and ``u`` float32 ``(B, H*W, RP)`` (or ``(0,)``)."""
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with unit stride
    return conv_up(z, lora_b, bias, idx.contiguous(), gate.contiguous(), num_shared, scaling, store_u)


@triton_conv_up.register_fake
def _(z, lora_b, bias, idx, gate, num_shared, scaling, store_u):
    from ..kernels.mor_lora import padded_ranks

    batch, _, height, width = z.shape
    c_out, ranks = lora_b.shape
    rp = padded_ranks(ranks, num_shared, idx.shape[1], False)
    u_shape = (batch, height * width, rp) if store_u else (0,)
    y = torch.empty((batch, c_out, height, width), dtype=z.dtype, device=z.device, memory_format=out_format(z))
    return y, z.new_empty(u_shape, dtype=torch.float32)


def _grad_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the torch conv gradients: the input's on GPU (cuDNN accumulates in float32), float32
    for 16-bit inputs on CPU (the interpreter test path), whose half convolutions round partial sums."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


class _MoRConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, conv, store_u):
        z = conv2d_op(x, torch.cat([weight, lora_a], 0), *conv)
        y, u = triton_conv_up(z, lora_b, bias, idx, gate, num_shared, scaling, store_u)
        ctx.save_for_backward(x, weight, lora_a, lora_b, idx, gate, u)
        ctx.num_shared, ctx.scaling, ctx.conv = num_shared, scaling, conv
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, idx, gate, u = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_gate = ctx.needs_input_grad[:7]
        s, ranks, conv = ctx.num_shared, lora_a.shape[0], ctx.conv
        batch, c_out, height, width = dy.shape
        dx = dw = dbias = da = db = dgate = None
        dz_rank = None
        if need_x or need_a or need_b or need_gate:
            dy_tokens = dy.reshape(batch, c_out, height * width).transpose(1, 2)  # (B, P, C_out)
            du, dg, dbt = triton_lora_bwd_dh(dy_tokens, lora_b, u, idx, gate, s, ctx.scaling, need_b)
            if need_b:
                db = dbt.t().to(lora_b.dtype)
            if need_gate:
                dgate = dg.to(gate.dtype)
            if need_x or need_a:  # du over the rank list -> the gradient of the rank channels of z
                onehot = torch.zeros(batch, du.shape[2], ranks + 1, dtype=du.dtype, device=du.device)
                onehot.scatter_(2, _active_ranks(idx, s, ranks, du.shape[2])[..., None], 1.0)
                with torch.autocast(du.device.type, enabled=False):  # float32, one fixed-order contraction
                    dz_rank = torch.einsum("btp,bpr->brt", du, onehot[..., :ranks])
                dz_rank = dz_rank.reshape(batch, ranks, height, width)
        gt = _grad_dtype(x)
        if need_x:  # one conv-input gradient for the base and the rank channels together
            dz = torch.cat([dy.to(gt), dz_rank.to(gt)], 1)
            dx = conv2d_input_op(x.to(gt), torch.cat([weight, lora_a], 0).to(gt), dz, *conv).to(x.dtype)
        if need_w:
            dw = conv2d_weight_op(x.to(gt), weight.to(gt), dy.to(gt), *conv).to(weight.dtype)
        if need_a:
            # float32: dA sums over every pixel of the batch, and rounding dz_rank to 16 bits first costs
            # more than the float16 tolerance allows (a rank-sized weight gradient, R << C_out).
            da = conv2d_weight_op(x.float(), lora_a.float(), dz_rank, *conv).to(lora_a.dtype)
        if need_bias:
            dbias = dy.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, dbias, da, db, None, dgate, None, None, None, None


def mor_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    """Canonical ``mor_conv2d`` (sample routing): x ``(B, C_in, H, W)``, weight ``(C_out, C_in, kh, kw)``,
    lora_a ``(R, C_in, kh, kw)``, lora_b ``(C_out, R)``, idx/gate ``(B, k)`` -> ``(B, C_out, H_out, W_out)``."""
    trainable = (x, weight, bias, lora_a, lora_b, gate)
    store_u = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in trainable)
    conv = (list(stride), list(padding), list(dilation))
    # One dtype for every operand (the kernels' dots need it), whatever the caller mixed or autocast
    # would have cast to.
    x, weight, bias, lora_a, lora_b = cast_operands(compute_dtype(x), x, weight, bias, lora_a, lora_b)
    return _MoRConv2dFn.apply(
        x, weight, bias, lora_a, lora_b, idx.to(torch.int32), gate, int(num_shared), float(scaling), conv, store_u
    )
