"""``mor_lora`` / ``mor_linear`` on the Triton kernels: ``mor::triton_lora_*`` custom ops (one per
launch, each with a fake implementation), composed by an autograd.Function.

Forward: ``triton_lora_fwd``, one kernel that reads ``x`` once for the base GEMM and the rank
projection, applies gates and scaling, adds the up-projection, bias and ``base``, and writes ``y``
once (plus the float32 rank activations ``u`` when a backward will need them). Backward: ``triton_lora_bwd_dh``
(``dy`` read once for ``dh`` and ``dB``; gate gradient), ``triton_lora_bwd_dx`` (``du A + dy W``) and
``triton_lora_rank_grad`` for ``dA``; ``dW``/``db`` are torch matmuls/sums. Every partial sum is
reduced in a fixed order (no atomics): the backward is bitwise repeatable. No host synchronisation
and no data-dependent grid: the forward can be captured in a CUDA graph.

Operands: ``x``, ``weight``, ``bias``, ``lora_a``, ``lora_b`` and ``base`` are cast to one compute
dtype first (autocast's when it is on, else ``x``'s; see :func:`compute_dtype`), as the kernels'
dots need; ``gate`` is read as float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import mor_lora as K
from ..kernels import mor_lora_bwd as KB

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
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with unit stride
    return K.forward(
        x, weight, bias, lora_a, lora_b, idx.contiguous(), gate.contiguous(), base, num_shared, scaling, store_u
    )


@triton_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared, scaling, store_u):
    rp = K.padded_ranks(lora_a.shape[0], num_shared, idx.shape[-1], idx.dim() == 3)
    u_shape = (x.shape[0], x.shape[1], rp) if store_u else (0,)
    return x.new_empty((x.shape[0], x.shape[1], lora_b.shape[0])), x.new_empty(u_shape, dtype=torch.float32)


def _active_ranks(idx: torch.Tensor, num_shared: int, ranks: int, rp: int) -> torch.Tensor:
    """Sample routing: the rank each position of the rank list holds, ``ranks`` where inactive."""
    batch, k = idx.shape
    sel = idx.long()
    routed = torch.where((sel >= 0) & (sel < ranks - num_shared), sel + num_shared, ranks)
    shared = torch.arange(num_shared, device=idx.device).expand(batch, num_shared)
    pad = torch.full((batch, rp - num_shared - k), ranks, dtype=torch.long, device=idx.device)
    return torch.cat([shared, routed, pad], dim=1)


def _to_ranks(partial: torch.Tensor, idx: torch.Tensor, num_shared: int, ranks: int) -> torch.Tensor:
    """``(B, RP, N)`` per-sample sums over the rank list -> ``(R, N)`` over ranks (duplicates summed), in a
    fixed order (a one-hot contraction, no atomics)."""
    if idx.dim() == 3:  # token routing: position p is rank p
        return partial.sum(0)[:ranks]
    rp = partial.shape[1]
    onehot = torch.zeros(idx.shape[0], rp, ranks + 1, dtype=partial.dtype, device=partial.device)
    onehot.scatter_(2, _active_ranks(idx, num_shared, ranks, rp)[..., None], 1.0)
    return torch.einsum("bpr,bpn->rn", onehot[..., :ranks], partial)


@torch.library.custom_op("mor::triton_lora_bwd_dh", mutates_args=())
def triton_lora_bwd_dh(
    dy: torch.Tensor,
    lora_b: torch.Tensor,
    u: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over dy ``(B, T, d_out)`` with u ``(B, T, RP)`` -> ``du = scaling g (dy B)`` float32
    ``(B, T, RP)``, ``dgate`` float32 of idx's shape, and ``dB^T = sum_{b,t} h^T dy`` float32 ``(R, d_out)``
    with ``h = scaling g u`` (``(0,)`` unless ``need_db``); dy and lora_b of one dtype."""
    idx, gate = idx.contiguous(), gate.contiguous()
    du, dgate, dbt = KB.backward_dh(dy, lora_b, u.contiguous(), idx, gate, num_shared, scaling, need_db)
    if idx.dim() == 2:  # sample routing: sum the per-block partials in a fixed order
        k = idx.shape[1]
        dgate = dgate.sum(1)[:, num_shared : num_shared + k]
        ok = (idx >= 0) & (idx < lora_b.shape[1] - num_shared)
        dgate = torch.where(ok, dgate, torch.zeros_like(dgate))
    if need_db:  # fixed-order sum over token blocks, then rank list -> ranks
        dbt = _to_ranks(dbt.sum(1), idx, num_shared, lora_b.shape[1])
    return du, dgate, dbt


@triton_lora_bwd_dh.register_fake
def _(dy, lora_b, u, idx, gate, num_shared, scaling, need_db):
    dbt = u.new_empty((lora_b.shape[1], dy.shape[-1]) if need_db else (0,))
    return torch.empty_like(u), idx.new_empty(idx.shape, dtype=torch.float32), dbt


@torch.library.custom_op("mor::triton_lora_bwd_dx", mutates_args=())
def triton_lora_bwd_dx(
    du: torch.Tensor,
    lora_a: torch.Tensor,
    idx: torch.Tensor,
    num_shared: int,
    dy: torch.Tensor | None,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """``dx (B, T, d_in) = du A (+ dy W)`` in ``lora_a.dtype``."""
    return KB.backward_dx(du.contiguous(), lora_a, idx.contiguous(), num_shared, dy, weight, lora_a.dtype)


@triton_lora_bwd_dx.register_fake
def _(du, lora_a, idx, num_shared, dy, weight):
    return du.new_empty((du.shape[0], du.shape[1], lora_a.shape[1]), dtype=lora_a.dtype)


@torch.library.custom_op("mor::triton_lora_rank_grad", mutates_args=())
def triton_lora_rank_grad(
    lhs: torch.Tensor, rhs: torch.Tensor, idx: torch.Tensor, num_shared: int, ranks: int
) -> torch.Tensor:
    """``sum_{b,t} lhs[b, t]^T rhs[b, t]`` mapped from the rank list to ranks: float32 ``(R, N)``.

    lhs ``(B, T, RP)`` float32 (``du`` for ``dA``), rhs ``(B, T, N)`` (``x``).
    """
    partial = KB.rank_grad_partials(lhs.contiguous(), rhs).sum(1)  # fixed-order sum over token chunks
    return _to_ranks(partial, idx, num_shared, ranks)


@triton_lora_rank_grad.register_fake
def _(lhs, rhs, idx, num_shared, ranks):
    return lhs.new_empty((ranks, rhs.shape[-1]), dtype=torch.float32)


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
        s, ranks = ctx.num_shared, lora_a.shape[0]
        dx = dw = dbias = da = db = dgate = dbase = None
        if need_x or need_a or need_b or need_gate:
            du, dg, dbt = triton_lora_bwd_dh(dy, lora_b, u, idx, gate, s, ctx.scaling, need_b)
            if need_x:
                dx = triton_lora_bwd_dx(du, lora_a, idx, s, dy if weight is not None else None, weight)
            if need_a:
                da = triton_lora_rank_grad(du, x, idx, s, ranks).to(lora_a.dtype)
            if need_b:
                db = dbt.t().to(lora_b.dtype)
            if need_gate:
                dgate = dg.to(gate.dtype)
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
    trainable = (x, weight, bias, lora_a, lora_b, gate, base)
    store_u = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in trainable)
    idx = idx.to(torch.int32)
    # One dtype for every dot operand, whatever the caller mixed (or autocast would have cast).
    x, weight, bias, lora_a, lora_b, base = cast_operands(compute_dtype(x), x, weight, bias, lora_a, lora_b, base)
    return _MoRLinearFn.apply(
        x, weight, bias, lora_a, lora_b, idx, gate, base, int(num_shared), float(scaling), store_u
    )


def mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, *, base=None):
    """Canonical ``mor_lora``: x ``(B, T, d_in)``, lora_a ``(R, d_in)``, lora_b ``(d_out, R)``, idx/gate
    ``(B, k)`` or ``(B, T, k)``, base ``(B, T, d_out)`` or None -> ``(B, T, d_out)`` in ``x.dtype``."""
    return _apply(x, None, None, lora_a, lora_b, idx, gate, base, num_shared, scaling)


def mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling):
    """Canonical ``mor_linear``: ``F.linear(x, weight, bias) + mor_lora(...)`` in one fused pass."""
    return _apply(x, weight, bias, lora_a, lora_b, idx, gate, None, num_shared, scaling)
