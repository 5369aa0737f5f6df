"""``mor_conv2d`` on Triton, fused around torch's (cuDNN's) convolution.

Forward: one convolution with the weight ``[W0; A]`` (ranks as extra output channels,
``mor::triton_conv2d``), then the ``mor::triton_conv_up`` pass (gates + 1x1 up-projection + add +
bias, ``y`` written once). Backward: the rank-space gradients reuse the linear kernels with pixels as
tokens (``mor::triton_lora_bwd_dh``: one pass over ``dy`` for ``dh``/``du``/``dgate`` and ``dB``); the
convolution's own gradients are ``mor::triton_conv2d_input`` / ``mor::triton_conv2d_weight`` on the
same concatenated weight.

cuDNN settings: a convolution whose operands are float32 runs with
``torch.backends.cudnn.conv.fp32_precision = "ieee"`` (PyTorch's default lets cuDNN use TF32, whose
10-bit mantissa misses the float32 tolerance), and the backward convolutions run with
``torch.backends.cudnn.deterministic = True``, so the whole backward is bitwise repeatable (the Triton
parts never use atomics). Both are set only around these calls and restored after; the convolutions
are custom ops so that the settings hold under ``torch.compile`` too (FLOP formulas registered here).

Operands: ``x``, ``weight``, ``bias``, ``lora_a`` and ``lora_b`` are cast to one compute dtype first
(autocast's when it is on, else ``x``'s), as the kernels' dots need.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ..kernels.mor_conv2d import conv_up, out_format
from .triton_mor_lora import _active_ranks, cast_operands, compute_dtype, triton_lora_bwd_dh


def _conv_tf32_flag():
    """``(get, set)`` of cuDNN convolution TF32: the fp32_precision API (torch >= 2.9: "ieee" or
    "tf32"), else the legacy ``allow_tf32`` flag, mapped onto the same two values."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None:
        try:
            conv.fp32_precision  # noqa: B018 - probing for the attribute
        except (AttributeError, RuntimeError):
            conv = None
    if conv is not None:
        return (lambda: conv.fp32_precision), (lambda value: setattr(conv, "fp32_precision", value))

    def set_legacy(value):
        cudnn.allow_tf32 = value != "ieee"

    return (lambda: "tf32" if cudnn.allow_tf32 else "ieee"), set_legacy


@contextlib.contextmanager
def cudnn_settings(dtype: torch.dtype, device: torch.device, *, deterministic: bool):
    """Around one convolution with operands of ``dtype`` on ``device``: no TF32 for float32, cuDNN's
    deterministic algorithms when ``deterministic``, autocast off (the operands are cast already)."""
    cudnn = torch.backends.cudnn
    ieee = dtype == torch.float32
    get_tf32, set_tf32 = _conv_tf32_flag()
    before = (get_tf32() if ieee else None, cudnn.deterministic)
    try:
        if ieee:
            set_tf32("ieee")
        if deterministic:
            cudnn.deterministic = True
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if ieee:
            set_tf32(before[0])
        if deterministic:
            cudnn.deterministic = before[1]


# ---------------------------------------------------------------------------------------------
# the convolutions (custom ops: opaque to torch.compile, so the cuDNN settings apply when compiled)


def _conv(x, weight, stride, padding, dilation):
    return F.conv2d(x, weight, None, stride, padding, dilation)


@torch.library.custom_op("mor::triton_conv2d", mutates_args=())
def triton_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> torch.Tensor:
    """``F.conv2d(x, weight)`` without bias, TF32 off for float32 operands."""
    with cudnn_settings(x.dtype, x.device, deterministic=False):
        return _conv(x, weight, stride, padding, dilation)


triton_conv2d.register_fake(_conv)


def _conv_dx(x, weight, dz, stride, padding, dilation):
    return conv2d_input(x.shape, weight, dz, stride, padding, dilation)


@torch.library.custom_op("mor::triton_conv2d_input", mutates_args=())
def triton_conv2d_input(
    x: torch.Tensor,
    weight: torch.Tensor,
    dz: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """The input gradient of ``conv2d(x, weight)`` for output gradient ``dz`` (``x`` gives the shape),
    in ``dz``'s dtype; deterministic, TF32 off for float32 operands."""
    with cudnn_settings(dz.dtype, dz.device, deterministic=True):
        return _conv_dx(x, weight, dz, stride, padding, dilation)


triton_conv2d_input.register_fake(_conv_dx)


def _conv_dw(x, weight, dz, stride, padding, dilation):
    return conv2d_weight(x, weight.shape, dz, stride, padding, dilation)


@torch.library.custom_op("mor::triton_conv2d_weight", mutates_args=())
def triton_conv2d_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    dz: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """The weight gradient of ``conv2d(x, weight)`` for output gradient ``dz`` (``weight`` gives the
    shape), in ``dz``'s dtype; deterministic, TF32 off for float32 operands."""
    with cudnn_settings(dz.dtype, dz.device, deterministic=True):
        return _conv_dw(x, weight, dz, stride, padding, dilation)


triton_conv2d_weight.register_fake(_conv_dw)


@register_flop_formula(torch.ops.mor.triton_conv2d)
def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape)


@register_flop_formula(torch.ops.mor.triton_conv2d_input)
def _(x_shape, w_shape, dz_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(dz_shape, w_shape, x_shape, transposed=True)  # as aten's conv backward counts


@register_flop_formula(torch.ops.mor.triton_conv2d_weight)
def _(x_shape, w_shape, dz_shape, *args, out_shape=None, **kwargs) -> int:
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    return conv_flop_count(t(x_shape), t(dz_shape), t(w_shape))


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
        z = triton_conv2d(x, torch.cat([weight, lora_a], 0), *conv)
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
            dx = triton_conv2d_input(x.to(gt), torch.cat([weight, lora_a], 0).to(gt), dz, *conv).to(x.dtype)
        if need_w:
            dw = triton_conv2d_weight(x.to(gt), weight.to(gt), dy.to(gt), *conv).to(weight.dtype)
        if need_a:
            # float32: dA sums over every pixel of the batch, and rounding dz_rank to 16 bits first costs
            # more than the float16 tolerance allows (a rank-sized weight gradient, R << C_out).
            da = triton_conv2d_weight(x.float(), lora_a.float(), dz_rank, *conv).to(lora_a.dtype)
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
