"""Triton kernels of the fused MoR linear / LoRA backward (MOR_SPEC 2.2); the rank list, the gates and the
forward are in :mod:`.mor_lora`. Two launches, deterministic (every sum in a fixed order; the only atomic is the
split-K arrival counter of :mod:`.mor_lora`, whose ``acq_rel`` ordering the split reduction needs, and which
picks no order of summation):

1. ``_bwd_kernel``, one program per (token block, ``d_in`` tile, sample), the forward mirrored: each ``dy``
   tile is read once for both ``dy W`` (the ``dx`` GEMM) and ``dh = dy B`` over the rank list (``[W | B]``
   as one extended N; every ``d_in`` tile recomputes ``dh``, ``RP / BLOCK_N`` more MMA work, as the forward
   recomputes ``u``). Then ``du = scaling g dh`` (zero where ``g = 0``), ``dx = du A + dy W`` for its
   ``d_in`` columns, and float32 partials per token block: ``du^T x`` (``dA``) for its columns; in the
   ``pid_k == 0`` programs ``h^T dy`` (``dB``, with ``h = scaling g u`` from the saved ``u``) and the gate
   gradient (per token under token routing; a per-block partial under sample routing). ``h^T dy`` runs in a
   ``dy`` loop of its own before the main one (a second read of that ``dy`` slice, by one column tile in
   ``n_k``, mostly from L2), and ``u``, ``g`` are reloaded after the main loop: held across it, with ``acc``
   and ``dh``, they pushed the sm_90 build to 255 registers and 0.6-8.6 KB of spills per thread (bf16; the
   most under token routing);
2. ``_bwd_reduce_kernel``: ``dA``, ``dB`` from the partials, summed over samples and token blocks in order
   and mapped from the rank list to ranks by selection (a rank picked twice in a sample gets both
   positions; no one-hot product, so a NaN of one rank never reaches another's gradient), written in
   their final dtypes and layouts (``dB`` as ``(d_out, R)``); the sample-routing gate gradient from its
   per-block partials.

``dW`` and ``db`` (when the base layer is trained) are a torch matmul and sum. Against the former five
launches and about 25 small torch ops (the one-hot ``_to_ranks`` contractions, gate sums, casts), this
is a fixed two at any shape. The ``dA``/``dB`` partials cost ``4 RP (d_in + d_out)`` bytes per token
block (written once, read once): at 64-128 token blocks a few percent of ``dy`` and ``x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mor_lora import (
    _dot,
    _dot_picked,
    _gates,
    _rank_list,
    _routing_strides,
    _same_dtype,
    _split_arrive,
    _split_sum,
    like_tokens,
    on_tensor_device,
    split_buffers,
)
from .mor_lora_tiles import bwd_config, cdiv

REDUCE_BLOCK = 64  # columns per program of the reduction


@triton.jit
def _part_rows(b, m, n_m, RP: tl.constexpr, width):
    """Offsets (int64) of the ``RP`` rows of sample ``b``, token block ``m`` in ``part (B, n_m, RP, width)``: the
    product passes 2^31 at large batches and widths, whatever the integer type of ``b`` (a loop index is int32)."""
    return ((tl.cast(b, tl.int64) * n_m + m) * RP + tl.arange(0, RP).to(tl.int64)) * width


@triton.jit
def _load_u(u_ptr, pid_b, offs_m, mask_m, T, RP: tl.constexpr):
    """The forward's ``u`` rows of the token block, ``(BLOCK_M, RP)`` float32 (zero on padded tokens)."""
    p = tl.arange(0, RP)
    return tl.load(u_ptr + (pid_b * T + offs_m[:, None]) * RP + p[None, :], mask=mask_m[:, None], other=0.0)


@triton.jit
def _h(u_ptr, idx_ptr, gate_ptr, pid_b, offs_m, mask_m, T, num_shared, num_routed, scaling, stride_ib, stride_it,
       TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """``h = scaling g u`` ``(BLOCK_M, RP)`` float32, zero where ``g = 0`` (whatever ``u`` holds)."""
    g = _gates(idx_ptr, gate_ptr, stride_ib, stride_it, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, TOKEN_ROUTING, BLOCK_M)  # fmt: skip
    return tl.where(g != 0, _load_u(u_ptr, pid_b, offs_m, mask_m, T, RP) * g, 0.0)


@triton.jit
def _bwd_epilogue(
    acc, dh, a_ptr, x_ptr, u_ptr, idx_ptr, gate_ptr, dx_ptr, part_row, gpart_ptr, dgate_ptr,
    rank, active, offs_m, offs_c, mask_m, mask_c, pid_b, pid_m, first, n_m,
    T, d_in, num_shared, num_routed, scaling,
    stride_ar, stride_ak, stride_xb, stride_xt, stride_xk, stride_db, stride_dt, stride_dk, stride_ib, stride_it,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DA: tl.constexpr, NEED_DG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """After the ``d_out`` loop: the gate gradient, ``du = scaling g dh`` (zero where ``g = 0``), ``dx = acc + du
    A`` and the ``dA`` partial ``du^T x``. ``u`` and ``g`` are loaded and rebuilt here rather than kept live
    across the loop."""
    p = tl.arange(0, RP)
    if NEED_DG:
        if first:
            c = dh * _load_u(u_ptr, pid_b, offs_m, mask_m, T, RP) * scaling  # d(loss)/d(gate of position p)
            if TOKEN_ROUTING:
                base = pid_b * stride_ib + offs_m * stride_it
                for j in range(TOP_K):
                    sel = tl.load(idx_ptr + base + j, mask=mask_m, other=-1)
                    w = tl.load(gate_ptr + base + j, mask=mask_m, other=0.0)
                    ok = (sel >= 0) & (sel < num_routed) & (w != 0)  # a gate of 0: the rank is not used
                    dg = tl.sum(tl.where(p[None, :] == (num_shared + sel)[:, None], c, 0.0), axis=1)
                    tl.store(dgate_ptr + (pid_b * T + offs_m) * TOP_K + j, tl.where(ok, dg, 0.0), mask=mask_m)
            else:
                tl.store(gpart_ptr + (pid_b * n_m + pid_m) * RP + p, tl.sum(c, axis=0))
    g = _gates(idx_ptr, gate_ptr, stride_ib, stride_it, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, TOKEN_ROUTING, BLOCK_M)  # fmt: skip
    du = tl.where(g != 0, dh * g, 0.0)  # an unpicked rank's dh (dy times its column of B) never reaches dx
    if NEED_DX:
        at = tl.load(
            a_ptr + rank[:, None] * stride_ar + offs_c[None, :] * stride_ak,
            mask=active[:, None] & mask_c[None, :],
            other=0.0,
        )
        acc = _dot_picked(du.to(at.dtype), at, acc, TOKEN_ROUTING)
        dx_ptrs = dx_ptr + pid_b * stride_db + offs_m[:, None] * stride_dt + offs_c[None, :] * stride_dk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    if NEED_DA:
        xt = tl.load(
            x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xt + offs_c[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_c[None, :],
            other=0.0,
        )
        # float32 operands: these sums run over every token, so rounding du to 16 bits would cost more than
        # the float16 tolerance allows (a small GEMM next to the base layer's)
        part = _dot(tl.trans(du), xt.to(tl.float32), tl.zeros((RP, BLOCK_N), dtype=tl.float32))
        tl.store(part_row + offs_c[None, :], part, mask=mask_c[None, :])


@triton.jit
def _bwd_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, u_ptr, idx_ptr, gate_ptr, dx_ptr, part_ptr, gpart_ptr, dgate_ptr,
    ws_acc_ptr, ws_dh_ptr, lock_ptr,
    T, d_in, d_out, num_shared, num_routed, scaling,
    stride_yb, stride_yt, stride_yn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xb, stride_xt, stride_xk, stride_db, stride_dt, stride_dk, stride_ib, stride_it,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, HAS_W: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, NEED_DG: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dy ``(B, T, d_out)``, u ``(B, T, RP)`` float32 -> dx ``(B, T, d_in)`` (its ``BLOCK_N`` columns), partials
    ``part (B, n_m, RP, d_in + d_out)`` float32 (``du^T x`` in the first ``d_in`` columns, ``h^T dy`` after),
    the gate gradient (token routing: ``dgate (B, T, k)``; sample routing: ``gpart (B, n_m, RP)``).
    Grid ``(n_m = cdiv(T, BLOCK_M), cdiv(d_in, BLOCK_N) (1 without dx/dA) * SPLIT_K, B)``; with ``SPLIT_K > 1``
    the ``d_out`` loop is split as the forward splits its ``d_in`` loop (``acc`` and ``dh`` partials, the last
    split of a tile sums them in split order)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_ks = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    pid_k = pid_ks // SPLIT_K
    pid_s = pid_ks % SPLIT_K
    n_m = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_c = pid_k * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < T
    mask_c = offs_c < d_in
    rank, active = _rank_list(idx_ptr, gate_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, TOKEN_ROUTING)
    part_row = part_ptr + _part_rows(pid_b, pid_m, n_m, RP, d_in + d_out)[:, None]
    first = pid_k == 0
    dy_row = dy_ptr + pid_b * stride_yb + offs_m[:, None] * stride_yt
    n_steps = tl.cdiv(d_out, BLOCK_K)
    n_lo = (pid_s * n_steps // SPLIT_K) * BLOCK_K
    n_hi = ((pid_s + 1) * n_steps // SPLIT_K) * BLOCK_K
    if NEED_DB:
        if first:
            # The dB partial h^T dy, in a loop of its own before the dx loop, so that h (and g, u) are not held
            # in registers across that loop (they made it spill); the second read of this dy slice, by one
            # column tile of the n_k, mostly hits L2. float32 operands: dB sums over every token, and rounding h
            # to 16 bits would cost more than the float16 tolerance allows (a small GEMM next to the base's).
            ht = tl.trans(_h(u_ptr, idx_ptr, gate_ptr, pid_b, offs_m, mask_m, T, num_shared, num_routed, scaling,
                             stride_ib, stride_it, TOP_K, RP, TOKEN_ROUTING, BLOCK_M))  # fmt: skip
            for n0 in range(n_lo, n_hi, BLOCK_K):
                offs_n = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
                mask_n = offs_n < d_out
                dyt = tl.load(dy_row + offs_n[None, :] * stride_yn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
                part = _dot(ht, dyt.to(tl.float32), tl.zeros((RP, BLOCK_K), dtype=tl.float32))
                tl.store(part_row + d_in + offs_n[None, :], part, mask=mask_n[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dh = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    # one dy tile read for both products: [dy W | dy B] as one extended N; each d_in tile recomputes dh
    for n0 in range(n_lo, n_hi, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_n = offs_n < d_out
        dyt = tl.load(dy_row + offs_n[None, :] * stride_yn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if HAS_W:
            wt = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_c[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_c[None, :],
                other=0.0,
            )
            acc = _dot(dyt, wt, acc)
        bt = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + rank[None, :] * stride_br,
            mask=mask_n[:, None] & active[None, :],
            other=0.0,
        )
        dh = _dot(dyt, bt, dh)
    if SPLIT_K == 1:
        _bwd_epilogue(acc, dh, a_ptr, x_ptr, u_ptr, idx_ptr, gate_ptr, dx_ptr, part_row, gpart_ptr, dgate_ptr,
                      rank, active, offs_m, offs_c, mask_m, mask_c, pid_b, pid_m, first, n_m,
                      T, d_in, num_shared, num_routed, scaling,
                      stride_ar, stride_ak, stride_xb, stride_xt, stride_xk, stride_db, stride_dt, stride_dk,
                      stride_ib, stride_it,
                      TOP_K, RP, TOKEN_ROUTING, NEED_DX, NEED_DA, NEED_DG, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        tile = (pid_b * n_m + pid_m) * (tl.num_programs(1) // SPLIT_K) + pid_k
        if _split_arrive(acc, dh, ws_acc_ptr, ws_dh_ptr, lock_ptr, tile, pid_s, SPLIT_K, HAS_W, BLOCK_M, BLOCK_N, RP):
            acc, dh = _split_sum(ws_acc_ptr, ws_dh_ptr, lock_ptr, tile, SPLIT_K, HAS_W, BLOCK_M, BLOCK_N, RP)
            _bwd_epilogue(acc, dh, a_ptr, x_ptr, u_ptr, idx_ptr, gate_ptr, dx_ptr, part_row, gpart_ptr, dgate_ptr,
                          rank, active, offs_m, offs_c, mask_m, mask_c, pid_b, pid_m, first, n_m,
                          T, d_in, num_shared, num_routed, scaling,
                          stride_ar, stride_ak, stride_xb, stride_xt, stride_xk, stride_db, stride_dt, stride_dk,
                          stride_ib, stride_it,
                          TOP_K, RP, TOKEN_ROUTING, NEED_DX, NEED_DA, NEED_DG, BLOCK_M, BLOCK_N)  # fmt: skip


@triton.jit
def _bwd_reduce_kernel(
    part_ptr, gpart_ptr, idx_ptr, gate_ptr, da_ptr, db_ptr, dgate_ptr,
    batch, n_m, d_in, d_out, ranks, num_shared, num_routed,
    stride_ar, stride_ak, stride_bn, stride_br, stride_ib,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_DG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program ``(r < R, c)``: columns ``[c BLOCK, (c + 1) BLOCK)`` of rank ``r``'s row of ``[dA | dB^T]``, the
    sum over samples b, then token blocks m, of the partial rows of the positions of b's rank list that hold
    ``r``; written to dA ``(R, d_in)`` and dB ``(d_out, R)`` in their dtypes. Program ``(R + b, 0)`` (sample
    routing): sample b's gate gradient from ``gpart``. Grid ``(R (+ B), cdiv(d_in + d_out, BLOCK))``."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    p = tl.arange(0, RP)
    width = d_in + d_out
    if pid_r < ranks:
        offs = pid_c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < width
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for sample in range(batch):
            b = tl.cast(sample, tl.int64)
            rank, active = _rank_list(idx_ptr, gate_ptr, stride_ib, b, num_shared, num_routed, TOP_K, RP, TOKEN_ROUTING)
            hit = active & (rank == pid_r)
            if tl.sum(hit.to(tl.int32), axis=0) > 0:
                for m in range(n_m):
                    rows = part_ptr + _part_rows(b, m, n_m, RP, width)[:, None] + offs[None, :]
                    acc += tl.sum(tl.load(rows, mask=hit[:, None] & mask[None, :], other=0.0), axis=0)
        if NEED_DA:
            tl.store(da_ptr + pid_r * stride_ar + offs * stride_ak, acc.to(da_ptr.dtype.element_ty), mask=offs < d_in)
        if NEED_DB:
            col = offs - d_in
            tl.store(db_ptr + col * stride_bn + pid_r * stride_br, acc.to(db_ptr.dtype.element_ty),
                     mask=mask & (offs >= d_in))  # fmt: skip
    elif NEED_DG:
        if pid_c == 0:
            b = pid_r - ranks
            acc = tl.zeros((RP,), dtype=tl.float32)
            for m in range(n_m):
                acc += tl.load(gpart_ptr + (b * n_m + m) * RP + p)
            rank, active = _rank_list(idx_ptr, gate_ptr, stride_ib, b, num_shared, num_routed, TOP_K, RP, False)
            slot = p - num_shared
            is_slot = (p >= num_shared) & (slot < TOP_K)
            tl.store(dgate_ptr + b * TOP_K + tl.where(is_slot, slot, 0), tl.where(active, acc, 0.0), mask=is_slot)


# ---------------------------------------------------------------------------------------------
# launcher: check, allocate, launch


@on_tensor_device
def backward(dy, x, weight, lora_a, lora_b, u, idx, gate, num_shared: int, scaling: float, needs, dx_out=None):
    """The MoR linear backward in two launches. ``needs = (dx, dA, dB, dgate)``. Returns ``(dx (B, T, d_in) in
    x's dtype (written into ``dx_out`` when given), dA (R, d_in) in lora_a's dtype, dB (d_out, R) in lora_b's
    dtype, dgate float32 of idx's shape)``, None for what is not needed; ``dx`` includes ``dy W`` when
    ``weight`` is given."""
    need_dx, need_da, need_db, need_dg = needs
    _same_dtype(dy=dy, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    batch, tokens, d_out = dy.shape
    ranks, d_in = lora_a.shape
    rp = u.shape[-1]
    stride_ib, stride_it, token = _routing_strides(idx)
    dev = dy.device
    dx = None
    if need_dx:
        dx = like_tokens(x, d_in) if dx_out is None else dx_out
    da = torch.empty((ranks, d_in), dtype=lora_a.dtype, device=dev) if need_da else None
    db = torch.empty((d_out, ranks), dtype=lora_b.dtype, device=dev) if need_db else None
    dgate = torch.empty(idx.shape, dtype=torch.float32, device=dev) if need_dg else None
    if batch * tokens == 0 or u.numel() == 0:
        for t in (dx, da, db, dgate):
            if t is not None:
                t.zero_()
        return dx, da, db, dgate
    cfg = bwd_config(dev, dy.dtype, batch, tokens, d_in, d_out, rp)
    n_m = cdiv(tokens, cfg["BLOCK_M"])
    partials = need_da or need_db
    part = torch.empty((batch, n_m, rp, d_in + d_out) if partials else (0,), dtype=torch.float32, device=dev)
    sample_dg = need_dg and not token
    gpart = torch.empty((batch, n_m, rp) if sample_dg else (0,), dtype=torch.float32, device=dev)
    n_k = max(1, cdiv(d_in, cfg["BLOCK_N"])) if (need_dx or need_da) else 1
    has_w = weight is not None and need_dx
    dxs = dx.stride() if dx is not None else (0, 0, 0)
    split = cfg["SPLIT_K"]
    ws_acc, ws_dh, lock = split_buffers(u, n_m * n_k * batch, split, cfg["BLOCK_M"], cfg["BLOCK_N"], rp)
    _bwd_kernel[(n_m, n_k * split, batch)](
        dy, weight if has_w else lora_b, lora_a, lora_b, x, u, idx, gate, dx if dx is not None else u, part, gpart,
        dgate if dgate is not None else u, ws_acc, ws_dh, lock,
        tokens, d_in, d_out, num_shared, ranks - num_shared, scaling,
        *dy.stride(), *(weight.stride() if has_w else (0, 0)), *lora_a.stride(), *lora_b.stride(), *x.stride(),
        *dxs, stride_ib, stride_it,
        TOP_K=idx.shape[-1], RP=rp, TOKEN_ROUTING=token, HAS_W=has_w, NEED_DX=need_dx, NEED_DA=need_da,
        NEED_DB=need_db, NEED_DG=need_dg, **cfg,
    )  # fmt: skip
    reduce(part, gpart, idx, gate, num_shared, ranks, rp, n_m, d_in, d_out, da, db, dgate if sample_dg else None)
    return dx, da, db, dgate


@on_tensor_device
def reduce(part, gpart, idx, gate, num_shared: int, ranks: int, rp: int, n_m: int, d_in: int, d_out: int, da, db,
           dgate):  # fmt: skip
    """One launch of ``_bwd_reduce_kernel``: ``da (R, d_in)`` and ``db (d_out, R)`` (either may be None) from
    ``part (B, n_m, RP, d_in + d_out)``, and the sample-routing gate gradient ``dgate (B, k)`` (or None) from
    ``gpart (B, n_m, RP)``."""
    batch = idx.shape[0]
    _, _, token = _routing_strides(idx)
    rows = ranks if (da is not None or db is not None) else 0
    gates = batch if dgate is not None else 0
    if rows + gates == 0:
        return
    stride_ib = idx.stride(0)
    _bwd_reduce_kernel[(rows + gates, cdiv(max(d_in + d_out, 1), REDUCE_BLOCK))](
        part, gpart, idx, gate, da if da is not None else part, db if db is not None else part,
        dgate if dgate is not None else part,
        batch, n_m, d_in, d_out, rows, num_shared, ranks - num_shared,
        *(da.stride() if da is not None else (0, 0)), *(db.stride() if db is not None else (0, 0)), stride_ib,
        TOP_K=idx.shape[-1], RP=rp, TOKEN_ROUTING=token, NEED_DA=da is not None, NEED_DB=db is not None,
        NEED_DG=dgate is not None, BLOCK=REDUCE_BLOCK,
    )  # fmt: skip
