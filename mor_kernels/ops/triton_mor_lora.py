"""``mor_lora`` / ``mor_linear`` on the Triton kernels: ``mor::triton_lora_*`` custom ops (one per
launch, each with a fake implementation), composed by an autograd.Function.

Forward: ``triton_lora_fwd``, one kernel that reads ``x`` once for the base GEMM and the rank
projection, applies gates and scaling, adds the up-projection, bias and ``base``, and writes ``y``
once (plus the float32 rank activations ``u`` when a backward will need them). Backward:
``triton_lora_bwd``, two launches (``dy`` read once for ``dy W`` and ``dy B``; ``dx``, partials of ``dA``,
``dB`` and the gate gradient; then their fixed-order reduction onto the ranks, see
:mod:`..kernels.mor_lora_bwd`); ``dW``/``db``, when the base layer is trained, are a torch matmul and sum.
Every partial sum is reduced in a fixed order, the forward's split-K partials too (their one atomic, an
``acq_rel`` arrival counter, orders the partial writes before the reducing split reads them, and picks no order
of summation; see :mod:`..kernels.mor_lora`): forward and backward are bitwise repeatable for identical shapes.
Across shapes they are not: the split of the K loop depends on the batch and the token count, so one image alone
and the same image in a batch can differ in the low bits. No host synchronisation and no data-dependent grid:
both can be captured in a CUDA graph (a captured split-K launch gets its own workspace). Each launch runs on its
tensors' device, whichever device is current.

Operands: ``x``, ``weight``, ``bias``, ``lora_a``, ``lora_b`` and ``base`` are cast to one compute
dtype first (autocast's when it is on, else ``x``'s; see :func:`compute_dtype`), as the kernels'
dots need; ``gate`` is read as float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..kernels import mor_lora as K
from ..kernels import mor_lora_bwd as KB
from ..validation import needs_grad

# ---------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("mor::triton_lora_fwd", mutates_args=())
def triton_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    base: torch.Tensor | None,
    num_shared: int,
    scaling: float,
    store_u: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: x ``(B, T, d_in)``, idx/gate ``(B, k)`` or ``(B, T, k)`` -> ``y (B, T, d_out) = (x W^T +
    bias) + h B^T (+ base)`` in ``x.dtype`` with ``h = scaling g (x A^T)``, and ``u = x A^T`` float32
    ``(B, T, RP)`` over the rank list (``(0,)`` unless ``store_u``); ``base`` is only read."""
    return _forward(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling, store_u)


def _forward(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling, store_u):
    """The body of ``triton_lora_fwd`` (also called directly for eager inference, see :func:`eager_inference`)."""
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with unit stride
    return K.forward(
        x, weight, bias, lora_a, lora_b, idx.contiguous(), gate.contiguous(), base, num_shared, scaling, store_u
    )


def eager_inference(store: bool, *tensors) -> bool:
    """Whether a forward can launch its kernels directly instead of through its custom op and autograd Function:
    no backward will run (``store`` False), not tracing (``torch.compile`` needs the custom op's fake), no Python
    dispatch mode active (``FlopCounterMode`` counts the custom ops, a fake mode needs their fakes), plain tensors
    or parameters (no fake or other subclass, and no ``torch.func`` wrapper: under ``vmap`` the launcher would
    meet a batched tensor without storage, while the custom op gets torch's per-sample fallback). The two
    wrappers cost ~18 us of Python per call on the CPU of benchmarks/README.md, host time next to each layer's
    kernels on a GPU."""
    if store or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (type(t) in _PLAIN and not _wrapped(t)) for t in tensors)


# A model's layers pass their weights as nn.Parameter (no __torch_function__ of its own): plain tensors too.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # vmap's BatchedTensor, grad's GradTrackingTensor


@triton_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling, store_u):
    rp = K.padded_ranks(lora_a.shape[0], num_shared, idx.shape[-1], idx.dim() == 3)
    u_shape = (x.shape[0], x.shape[1], rp) if store_u else (0,)
    return K.like_tokens(x, lora_b.shape[0]), x.new_empty(u_shape, dtype=torch.float32)


@torch.library.custom_op("mor::triton_lora_bwd", mutates_args=())
def triton_lora_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two launches: dy ``(B, T, d_out)`` and the forward's ``u`` ``(B, T, RP)`` -> ``dx`` ``(B, T, d_in)`` (``du A``
    plus ``dy W`` when ``weight`` is given; in ``x``'s layout), ``dA`` ``(R, d_in)``, ``dB`` ``(d_out, R)`` in the
    operands' dtype and ``dgate`` float32 of idx's shape; ``needs`` = which of the four to compute (the others
    come back as ``(0,)``)."""
    need = tuple(bool(n) for n in needs)
    outs = KB.backward(dy, x, weight, lora_a, lora_b, u.contiguous(), idx.contiguous(), gate.contiguous(),
                       num_shared, scaling, need)  # fmt: skip
    return tuple(o if o is not None else dy.new_empty((0,)) for o in outs)


@triton_lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, u, idx, gate, num_shared, scaling, needs):
    empty = dy.new_empty((0,))
    return (
        K.like_tokens(x, x.shape[-1]) if needs[0] else empty,
        lora_a.new_empty(lora_a.shape) if needs[1] else empty,
        lora_b.new_empty(lora_b.shape) if needs[2] else empty,
        idx.new_empty(idx.shape, dtype=torch.float32) if needs[3] else empty,
    )


# ---------------------------------------------------------------------------------------------
# autograd


class _MoRLinearFn(torch.autograd.Function):
    """y = [x W^T + bias] + [base] + scaling B (g * (A x)); ``weight``/``bias``/``base`` may be None."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling, store_u):
        y, u = triton_lora_fwd(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling, store_u)
        ctx.save_for_backward(x, weight, lora_a, lora_b, idx, gate, u)
        ctx.num_shared, ctx.scaling = num_shared, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, idx, gate, u = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_gate, need_base = ctx.needs_input_grad[:8]
        dx = dw = dbias = da = db = dgate = dbase = None
        if need_x or need_a or need_b or need_gate:
            needs = [need_x, need_a, need_b, need_gate]
            w = weight if need_x else None
            dx, da, db, dgate = triton_lora_bwd(
                dy, x, w, lora_a, lora_b, u, idx, gate, ctx.num_shared, ctx.scaling, needs
            )
            dx, da, db = (t if n else None for t, n in zip((dx, da, db), needs, strict=False))
            dgate = dgate.to(gate.dtype) if need_gate else None
        if need_w:
            with torch.autocast(dy.device.type, enabled=False):  # dy and x share the compute dtype
                dw = torch.matmul(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if need_bias:
            dbias = dy.sum((0, 1), dtype=torch.float32).to(ctx.bias_dtype)
        if need_base:
            dbase = dy
        return dx, dw, dbias, da, db, None, dgate, dbase, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The one dtype the kernels' operands share: autocast's when it is on for ``x``'s device (as for
    ``F.linear``/``F.conv2d``, float64 is never cast), else ``x``'s."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def cast_operands(dtype: torch.dtype, *tensors):
    """``tensors`` in ``dtype`` (None stays None). The casts are autograd ops outside the fused
    Function, so each gradient comes back in its input's own dtype."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _apply(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling):
    store_u = needs_grad(x, weight, bias, lora_a, lora_b, gate, base)
    idx = idx.to(torch.int32)
    # One dtype for every dot operand, whatever the caller mixed (or autocast would have cast).
    x, weight, bias, lora_a, lora_b, base = cast_operands(compute_dtype(x), x, weight, bias, lora_a, lora_b, base)
    if not store_u:  # nothing to differentiate: the kernels directly, or the custom op (its fallback under vmap)
        fwd = _forward if eager_inference(False, x, weight, bias, lora_a, lora_b, idx, gate, base) else triton_lora_fwd
        return fwd(x, weight, bias, lora_a, lora_b, idx, gate, base, int(num_shared), float(scaling), False)[0]
    return _MoRLinearFn.apply(
        x, weight, bias, lora_a, lora_b, idx, gate, base, int(num_shared), float(scaling), store_u
    )


def mor_linear_prepared(x, weight, bias, lora_a, lora_b, idx, gate, num_shared: int, scaling: float):
    """:func:`mor_linear` for a caller whose arguments of the same kinds already passed the public op's checks,
    all in one dtype, ``idx`` int32, nothing to differentiate, no autocast (``mor_model.inference``'s calls after
    an image's first): the kernel launched without the conversions of :func:`_apply`, where
    :func:`eager_inference` allows (else :func:`mor_linear`)."""
    if eager_inference(False, x, weight, bias, lora_a, lora_b, idx, gate):
        return _forward(x, weight, bias, lora_a, lora_b, idx, gate, None, num_shared, scaling, False)[0]
    return mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling)


def mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, *, base=None):
    """Canonical ``mor_lora``: x ``(B, T, d_in)``, lora_a ``(R, d_in)``, lora_b ``(d_out, R)``, idx/gate
    ``(B, k)`` or ``(B, T, k)``, base ``(B, T, d_out)`` or None -> ``(B, T, d_out)`` in ``x.dtype``."""
    return _apply(x, None, None, lora_a, lora_b, idx, gate, base, num_shared, scaling)


def mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling):
    """Canonical ``mor_linear``: ``F.linear(x, weight, bias) + mor_lora(...)`` in one fused pass."""
    return _apply(x, weight, bias, lora_a, lora_b, idx, gate, None, num_shared, scaling)
