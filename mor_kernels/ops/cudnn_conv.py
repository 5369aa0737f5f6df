"""Convolutions for the backends that fuse around torch's (cuDNN's) convolution: custom ops that run
with TF32 off for float32 operands and, for the gradients, with cuDNN's deterministic algorithms.

``torch.backends.cudnn.conv.fp32_precision = "ieee"`` is set around a convolution whose operands are
float32 (PyTorch's default lets cuDNN use TF32, whose 10-bit mantissa misses the float32 tolerance;
torch versions without ``cudnn.conv`` use the legacy ``cudnn.allow_tf32``), and the backward
convolutions run with ``torch.backends.cudnn.deterministic = True``. Both are restored after. They are
custom ops (``mor::conv2d``, ``mor::conv2d_input``, ``mor::conv2d_weight``, with fakes and FLOP
formulas) so that the settings hold under ``torch.compile`` too. Used by the Triton and the compiled
(``cuda``/``cpp``) backends' ``mor_conv2d``; on CPU the settings change nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight
from torch.utils.flop_counter import conv_flop_count, register_flop_formula


@functools.cache
def _conv_tf32_flag():
    """``(get, set)`` of cuDNN convolution TF32: the fp32_precision API (torch >= 2.9: "ieee" or
    "tf32"), else the legacy ``allow_tf32`` flag, mapped onto the same two values (probed once)."""
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


_NOTHING = contextlib.nullcontext()


def cudnn_settings(dtype: torch.dtype, device: torch.device, *, deterministic: bool):
    """Around one convolution with operands of ``dtype`` on ``device``: no TF32 for float32, cuDNN's
    deterministic algorithms when ``deterministic``, autocast off (the operands are cast already). A 16-bit
    inference convolution outside autocast needs none of them: no context then (entering the full one costs
    ~6 us of Python per convolution, host time next to each MoR conv layer's kernels on a GPU)."""
    if dtype != torch.float32 and not deterministic and not torch.is_autocast_enabled(device.type):
        return _NOTHING
    return _cudnn_settings(dtype, device, deterministic)


@contextlib.contextmanager
def _cudnn_settings(dtype: torch.dtype, device: torch.device, deterministic: bool):
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


@torch.library.custom_op("mor::conv2d", mutates_args=())
def conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int]
) -> torch.Tensor:
    """``F.conv2d(x, weight)`` without bias, TF32 off for float32 operands."""
    with cudnn_settings(x.dtype, x.device, deterministic=False):
        return _conv(x, weight, stride, padding, dilation)


conv2d_op.register_fake(_conv)


def _conv_dx(x, weight, dz, stride, padding, dilation):
    return conv2d_input(x.shape, weight, dz, stride, padding, dilation)


@torch.library.custom_op("mor::conv2d_input", mutates_args=())
def conv2d_input_op(
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


conv2d_input_op.register_fake(_conv_dx)


def _conv_dw(x, weight, dz, stride, padding, dilation):
    return conv2d_weight(x, weight.shape, dz, stride, padding, dilation)


@torch.library.custom_op("mor::conv2d_weight", mutates_args=())
def conv2d_weight_op(
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


conv2d_weight_op.register_fake(_conv_dw)


@register_flop_formula(torch.ops.mor.conv2d)
def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape)


@register_flop_formula(torch.ops.mor.conv2d_input)
def _(x_shape, w_shape, dz_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(dz_shape, w_shape, x_shape, transposed=True)  # as aten's conv backward counts


@register_flop_formula(torch.ops.mor.conv2d_weight)
def _(x_shape, w_shape, dz_shape, *args, out_shape=None, **kwargs) -> int:
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    return conv_flop_count(t(x_shape), t(dz_shape), t(w_shape))
