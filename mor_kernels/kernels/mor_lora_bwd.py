"""Triton kernels of the fused MoR linear / LoRA backward (MOR_SPEC 2.2); the rank list, the gates and
the forward are in :mod:`.mor_lora`.

Backward: ``_bwd_dh_kernel`` reads ``dy`` once for both ``dh = dy B`` and ``dB^T = h^T dy``: it
rebuilds ``h = scaling g u`` from the saved ``u`` before its loop over ``d_out`` and, per ``dy`` tile,
accumulates ``dh`` and writes that token block's float32 partial of ``h^T dy``; it also produces
``du = g * dh`` and the gate gradient. ``_bwd_dx_kernel`` computes ``du A`` (+ ``dy W``);
``_rank_grad_kernel`` reduces ``du^T x`` (``dA``) over tokens into per-(sample, token chunk) float32
partials. All partials are summed by the launchers' callers in a fixed order: no atomics, so results
are bitwise repeatable.

Why the dB partials are per ``DH_BLOCK_M = 128`` tokens (the dy pass's token tile): per element of
``dy``, they cost ``2 * 4 * RP / 128`` bytes (float32, written once, read once by the reduction),
where a separate ``h^T dy`` pass would re-read ``dy`` (2 bytes in 16 bits) and write and re-read ``h``
(``8 RP / d_out``) and its own chunk partials. For one bf16 sample:

- T = 4096, d_out = 320, RP = 16: partials 2 x 32 x 16 x 320 x 4 B = 1.3 MB, against 3.5 MB for the
  separate pass (dy 2.6 MB + h 0.5 MB + 512-token partials 0.3 MB);
- T = 64, d_out = 1280, RP = 16: partials 2 x 1 x 16 x 1280 x 4 B = 0.16 MB against 0.34 MB;
- token routing with R = 40 (RP = 64) is about even: at T = 1024, d_out = 640, 2.6 MB against 2.5 MB
  (+5%), at T = 4096, d_out = 320, 5.2 MB against 6.0 MB;

and one launch fewer. Larger ``RP`` (token routing with R > 64) would need a larger token tile to
stay ahead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mor_lora import _dot, _gates, _rank_list, _routing_strides, _same_dtype

BLOCK_M = 32  # tokens per program (rank_grad; dx's CPU/float32 tile)
BLOCK_N = 64  # output features per program (rank_grad; dx's CPU/float32 tile)
BLOCK_K = 32  # reduction step (dx's CPU/float32 tile)
TOKEN_CHUNK = 512  # tokens per partial sum in the dA reduction
DH_BLOCK_M = 128  # tokens per program of the dy pass, and per dB partial


def gemm_config(device: torch.device, dtype: torch.dtype, tokens: int, n: int) -> dict:
    """Tiles of the backward's dx launch from a fixed table (no autotuning, so nothing is
    ever tuned inside a CUDA-graph capture): small tiles under the interpreter and for float32 (IEEE
    dots); tensor-core tiles for 16-bit inputs on a GPU, larger at SD-sized shapes."""
    if device.type != "cuda" or dtype == torch.float32:
        return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=2)
    if tokens >= 512 and n >= 256:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_dh_kernel(
    dy_ptr, b_ptr, u_ptr, idx_ptr, gate_ptr, du_ptr, dgate_ptr, dbt_ptr,
    T, d_out, num_shared, num_routed, scaling,
    stride_yb, stride_yt, stride_yn, stride_bn, stride_br, stride_ib, stride_it,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One pass over ``dy``: dh = dy B over the rank list and, when ``NEED_DB``, this token block's
    float32 partial of ``dB^T = h^T dy`` with ``h = scaling g u``, ``dbt (B, cdiv(T, BLOCK_M), RP, d_out)``.
    Writes du = scaling g dh (B, T, RP) and the gate gradient: token routing ``(B, T, k)``; sample
    routing per-block partials ``(B, cdiv(T, BLOCK_M), RP)``. Grid ``(cdiv(T, BLOCK_M), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < T
    p = tl.arange(0, RP)
    n_blocks = tl.cdiv(T, BLOCK_M)
    rank, active = _rank_list(idx_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, TOKEN_ROUTING)
    out = (pid_b * T + offs_m[:, None]) * RP + p[None, :]
    u = tl.load(u_ptr + out, mask=mask_m[:, None], other=0.0)
    g = _gates(idx_ptr, gate_ptr, stride_ib, stride_it, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, TOKEN_ROUTING, BLOCK_M)  # fmt: skip
    ht = tl.trans(u * g)  # (RP, BLOCK_M) float32; zero on padded tokens
    dbt_row = dbt_ptr + ((pid_b * n_blocks + pid_m) * RP + p[:, None]) * d_out
    dh = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    dy_row = dy_ptr + pid_b * stride_yb + offs_m[:, None] * stride_yt
    for n0 in range(0, d_out, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < d_out
        dyt = tl.load(dy_row + offs_n[None, :] * stride_yn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        bt = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + rank[None, :] * stride_br,
            mask=mask_n[:, None] & active[None, :],
            other=0.0,
        )
        dh = _dot(dyt, bt, dh)
        if NEED_DB:
            # float32 operands: dB sums over every token, and rounding h to 16 bits would cost more
            # than the float16 tolerance allows (a small GEMM next to the base layer's).
            part = _dot(ht, dyt.to(tl.float32), tl.zeros((RP, BLOCK_N), dtype=tl.float32))
            tl.store(dbt_row + offs_n[None, :], part, mask=mask_n[None, :])
    tl.store(du_ptr + out, dh * g, mask=mask_m[:, None])
    c = dh * u * scaling  # d(loss)/d(gate of rank p), per token
    if TOKEN_ROUTING:
        base = pid_b * stride_ib + offs_m * stride_it
        for j in range(TOP_K):
            sel = tl.load(idx_ptr + base + j, mask=mask_m, other=-1)
            ok = (sel >= 0) & (sel < num_routed)
            dg = tl.sum(tl.where(p[None, :] == (num_shared + sel)[:, None], c, 0.0), axis=1)
            tl.store(dgate_ptr + (pid_b * T + offs_m) * TOP_K + j, tl.where(ok, dg, 0.0), mask=mask_m)
    else:
        tl.store(dgate_ptr + (pid_b * n_blocks + pid_m) * RP + p, tl.sum(c, axis=0))


@triton.jit
def _bwd_dx_kernel(
    du_ptr, a_ptr, idx_ptr, dy_ptr, w_ptr, dx_ptr,
    T, d_in, d_out, num_shared, num_routed,
    stride_ar, stride_ak, stride_ib, stride_yb, stride_yt, stride_yn, stride_wn, stride_wk,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx ``(B, T, d_in)`` (contiguous) = du A (+ dy W). Grid ``(cdiv(T, BLOCK_M), cdiv(d_in, BLOCK_K), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < T
    mask_k = offs_k < d_in
    p = tl.arange(0, RP)
    rank, active = _rank_list(idx_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, TOKEN_ROUTING)
    du = tl.load(du_ptr + (pid_b * T + offs_m[:, None]) * RP + p[None, :], mask=mask_m[:, None], other=0.0)
    at = tl.load(
        a_ptr + rank[:, None] * stride_ar + offs_k[None, :] * stride_ak,
        mask=active[:, None] & mask_k[None, :],
        other=0.0,
    )
    acc = _dot(du.to(at.dtype), at, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32))
    if HAS_W:
        dy_row = dy_ptr + pid_b * stride_yb + offs_m[:, None] * stride_yt
        for n0 in range(0, d_out, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            mask_n = offs_n < d_out
            dyt = tl.load(dy_row + offs_n[None, :] * stride_yn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            wt = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
            acc = _dot(dyt, wt, acc)
    dx_ptrs = dx_ptr + (pid_b * T + offs_m[:, None]) * d_in + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _rank_grad_kernel(
    l_ptr, r_ptr, out_ptr,
    T, N, n_chunks, chunk, stride_rb, stride_rt, stride_rn,
    RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[b, c] ``(RP, N)`` f32 = sum over tokens t of chunk c of ``L[b, t]^T R[b, t]``; L ``(B, T, RP)`` f32
    contiguous, R ``(B, T, N)``. Grid ``(cdiv(N, BLOCK_N), n_chunks, B)``."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    p = tl.arange(0, RP)
    acc = tl.zeros((RP, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, chunk, BLOCK_M):  # a runtime chunk (a multiple of BLOCK_M): no recompile per T
        offs_m = pid_c * chunk + m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < T
        lt = tl.load(l_ptr + (pid_b * T + offs_m[None, :]) * RP + p[:, None], mask=mask_m[None, :], other=0.0)
        rt = tl.load(
            r_ptr + pid_b * stride_rb + offs_m[:, None] * stride_rt + offs_n[None, :] * stride_rn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        # float32 operands: these sums run over every token, so rounding ``L`` to 16 bits would cost
        # more than the float16 tolerance allows (a small GEMM next to the base layer's).
        acc = _dot(lt, rt.to(tl.float32), acc)
    out = ((pid_b * n_chunks + pid_c) * RP + p[:, None]) * N + offs_n[None, :]
    tl.store(out_ptr + out, acc, mask=mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# launchers: check, allocate, launch


def dh_config(dtype: torch.dtype, rp: int) -> dict:
    """Tiles of the ``dy``-reading backward pass. The token block is also the granularity of the dB
    partials, so it is large: at ``RP`` ranks, ``BLOCK_M`` tokens and 4-byte partials, the partials
    cost ``8 RP / BLOCK_M`` bytes (written and read back) per element of ``dy`` against the ``2``
    (16-bit) a second pass over ``dy`` would read, plus that pass's ``h`` (``8 RP / d_out``)."""
    return dict(
        BLOCK_M=DH_BLOCK_M,
        BLOCK_N=64 if dtype != torch.float32 else 32,
        num_warps=4 if rp <= 32 else 8,
    )


def backward_dh(dy, lora_b, u, idx, gate, num_shared: int, scaling: float, need_db: bool):
    """-> ``du`` float32 ``(B, T, RP)``, the gate gradient float32 (``(B, T, k)`` for token routing;
    ``(B, n_blocks, RP)`` partials for sample routing) and the ``dB^T = h^T dy`` partials float32
    ``(B, n_blocks, RP, d_out)`` (``(0,)`` unless ``need_db``), ``n_blocks = cdiv(T, BLOCK_M)``."""
    _same_dtype(dy=dy, lora_b=lora_b)
    batch, tokens, d_out = dy.shape
    ranks = lora_b.shape[1]
    rp = u.shape[-1]
    stride_ib, stride_it, token = _routing_strides(idx)
    cfg = dh_config(dy.dtype, rp)
    n_blocks = triton.cdiv(tokens, cfg["BLOCK_M"])
    du = torch.empty_like(u)
    shape = (batch, tokens, idx.shape[-1]) if token else (batch, n_blocks, rp)
    dgate = torch.empty(shape, dtype=torch.float32, device=dy.device)
    dbt = torch.empty((batch, n_blocks, rp, d_out) if need_db else (0,), dtype=torch.float32, device=dy.device)
    if u.numel() == 0:
        return du, dgate.zero_(), dbt.zero_()
    _bwd_dh_kernel[(n_blocks, batch)](
        dy, lora_b, u, idx, gate, du, dgate, dbt if need_db else du,
        tokens, d_out, num_shared, ranks - num_shared, scaling,
        *dy.stride(), *lora_b.stride(), stride_ib, stride_it,
        TOP_K=idx.shape[-1], RP=rp, TOKEN_ROUTING=token, NEED_DB=need_db, **cfg,
    )  # fmt: skip
    return du, dgate, dbt


def backward_dx(du, lora_a, idx, num_shared: int, dy, weight, dtype: torch.dtype):
    """dx ``(B, T, d_in)`` contiguous in ``dtype`` = du A (+ dy W when ``weight`` is given)."""
    if weight is not None:
        _same_dtype(dy=dy, weight=weight)
    batch, tokens, rp = du.shape
    ranks, d_in = lora_a.shape
    stride_ib, _, token = _routing_strides(idx)
    dx = torch.empty((batch, tokens, d_in), dtype=dtype, device=du.device)
    if dx.numel() == 0:
        return dx
    has_w = weight is not None
    d_out = weight.shape[0] if has_w else 0
    ys = dy.stride() if has_w else (0, 0, 0)
    ws = weight.stride() if has_w else (0, 0)
    cfg = gemm_config(du.device, dtype, tokens, d_in)
    grid = (triton.cdiv(tokens, cfg["BLOCK_M"]), triton.cdiv(d_in, cfg["BLOCK_N"]), batch)
    _bwd_dx_kernel[grid](
        du, lora_a, idx, dy if has_w else du, weight if has_w else lora_a, dx,
        tokens, d_in, d_out, num_shared, ranks - num_shared,
        *lora_a.stride(), stride_ib, *ys, *ws,
        TOP_K=idx.shape[-1], RP=rp, TOKEN_ROUTING=token, HAS_W=has_w,
        # the kernel reduces over d_out in BLOCK_N steps and tiles d_in with BLOCK_K
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_K"], BLOCK_K=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return dx


def rank_grad_partials(lhs, rhs):
    """Partials ``(B, n_chunks, RP, N)`` float32 of ``lhs^T rhs`` per sample and token chunk;
    lhs ``(B, T, RP)`` float32 contiguous, rhs ``(B, T, N)`` any strides."""
    batch, tokens, rp = lhs.shape
    n = rhs.shape[-1]
    chunk = min(TOKEN_CHUNK, triton.cdiv(max(tokens, 1), BLOCK_M) * BLOCK_M)
    n_chunks = triton.cdiv(tokens, chunk)
    out = torch.empty((batch, n_chunks, rp, n), dtype=torch.float32, device=lhs.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_N), n_chunks, batch)
    _rank_grad_kernel[grid](
        lhs, rhs, out, tokens, n, n_chunks, chunk, *rhs.stride(),
        RP=rp, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return out
