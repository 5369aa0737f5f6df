"""Triton kernels for the fused MoR linear / LoRA path (MOR_SPEC 2.2), forward and backward.

Ranks are handled as a "rank list" of ``RP`` positions (a constexpr power of two >= 16, as
``tl.arange`` and ``tl.dot`` need), computed in registers from the compact ``(idx, gate)`` pairs:

- sample routing: position ``p < S`` is shared rank ``p``; position ``S + j`` is the rank picked by
  slot ``j`` (``S + idx[b, j]``), inactive for a zero slot (any index outside ``[0, E)``); the rest
  is padding. Only active ranks of ``lora_a``/``lora_b`` are loaded (a Punica/S-LoRA-style segment per
  sample); ``RP = pad(S + k)``. A sample that picks zero slots saves those loads, not dot FLOPs: the
  rank tile keeps its constexpr width (16 in the paper's 8 shared + top-8 setting, one MMA tile).
- token routing: position ``p`` is rank ``p`` (``RP = pad(R)``), a dense tile over all ranks with the
  per-token gates expanded in registers from ``(idx, gate)``.

Forward: one kernel, ``_fwd_kernel`` (LoRAFusion's "[x | h] as one extended K", here as one extended
N over the same K loop). Grid ``(cdiv(T, BLOCK_M), max(1, cdiv(d_out, BLOCK_N)), B)``, fixed by the shapes (no
data-dependent grid, no atomics, no host sync: CUDA graphs can capture it). Each program loops once
over ``d_in``, loading each ``x`` tile once for both ``acc += x W^T`` (when there is a weight) and
``u += x A^T`` over its rank list (float32 accumulators); after the loop ``h = scaling g u`` (rounded
to x's dtype, the operand dtype of the up-projection's dot), ``acc += h B^T``, then bias and/or
``base``, and ``y`` is written once. With ``STORE_U`` (a backward will run) the ``pid_n == 0`` programs
also write ``u`` float32 ``(B, T, RP)``, from which the backward rebuilds ``h``; inference writes
nothing else. The price is that every output-column tile recomputes ``u``: ``RP / BLOCK_N`` more MMA
work than the base GEMM (25% at ``RP = 16``, ``BLOCK_N = 64``; 12.5% at 128), counted as executed
FLOPs in :mod:`mor_kernels.flops`; the tile table (:mod:`.mor_lora_tiles`) weighs it against padding
and grid fill. What it saves, against the former two launches (a shrink kernel writing ``h``, then an
expand kernel re-reading ``x`` and ``h``), is a second read of ``x``, the ``h`` round trip and one
launch: at batch 1, bf16, sample routing (``RP = 16``), HBM bytes per call in inference (x, W, y,
A/B rows; the re-reads of x by each column tile, in both designs, are served by L2):

==========  ========  ========  =====
T x d       before    now       ratio
==========  ========  ========  =====
4096x320    8.35 MB   5.47 MB   1.53
1024x640    4.86 MB   3.48 MB   1.40
256x1280    5.34 MB   4.67 MB   1.14
64x1280     3.86 MB   3.69 MB   1.05
==========  ========  ========  =====

(training adds the same ``u`` write to both: 0.26, 0.07, 0.02, 0.004 MB). Token routing (``RP = pad(R)``,
64 for the paper's R = 40) recomputes a wider ``u``: the tile table keeps ``BLOCK_N = 128`` there at
the SD widths.

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

All offsets are int64; every dot (``_dot``) accumulates in float32 with ``input_precision="ieee"`` (no
TF32 for float32 inputs, so float32 results meet the float32 tolerance).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .mor_lora_tiles import fwd_config, padded_ranks

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


#: Under ``TRITON_INTERPRET=1`` (CPU tests) triton 3.8's ``tl.dot`` returns garbage for bfloat16
#: operands; there they are widened to float32 first, which computes the same exact products with float32
#: accumulation that a GPU's bf16 MMA does. Compiled kernels never take this branch.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

# ---------------------------------------------------------------------------------------------
# shared @triton.jit helpers


@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` in float32, IEEE precision (no TF32 for float32 operands). The operands must
    share a dtype, as a compiled ``tl.dot`` requires; checked here too, so that the interpreter's
    widening below cannot hide a mixed-dtype dot that would fail to compile for a GPU."""
    tl.static_assert(a.dtype == b.dtype, "_dot: both operands must have the same dtype")
    if _INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _rank_list(
    idx_ptr,
    stride_ib,
    pid_b,
    num_shared,
    num_routed,
    TOP_K: tl.constexpr,
    RP: tl.constexpr,
    TOKEN_ROUTING: tl.constexpr,
):
    """``(rank, active)`` per position ``p < RP``: the rank of ``lora_a``/``lora_b`` that position
    ``p`` holds (int64, 0 where inactive) and whether it is live."""
    p = tl.arange(0, RP)
    if TOKEN_ROUTING:
        rank = p
        active = p < num_shared + num_routed
    else:
        slot = p - num_shared
        is_slot = (p >= num_shared) & (slot < TOP_K)
        sel = tl.load(idx_ptr + pid_b * stride_ib + tl.where(is_slot, slot, 0), mask=is_slot, other=-1)
        active = (p < num_shared) | (is_slot & (sel >= 0) & (sel < num_routed))
        rank = tl.where(p < num_shared, p, num_shared + sel)
        rank = tl.where(active, rank, 0)
    return rank.to(tl.int64), active


@triton.jit
def _gates(
    idx_ptr,
    gate_ptr,
    stride_ib,
    stride_it,
    pid_b,
    offs_m,
    mask_m,
    num_shared,
    num_routed,
    scaling,
    TOP_K: tl.constexpr,
    RP: tl.constexpr,
    TOKEN_ROUTING: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``scaling * g`` as a ``(BLOCK_M, RP)`` float32 tile (the same row for every token under sample
    routing). A rank picked by two slots gets the sum of both gates; zero slots contribute nothing."""
    p = tl.arange(0, RP)
    if TOKEN_ROUTING:
        g = tl.zeros((BLOCK_M, RP), dtype=tl.float32) + tl.where(p < num_shared, 1.0, 0.0)[None, :]
        base = pid_b * stride_ib + offs_m * stride_it
        for j in range(TOP_K):
            sel = tl.load(idx_ptr + base + j, mask=mask_m, other=-1)
            w = tl.load(gate_ptr + base + j, mask=mask_m, other=0.0).to(tl.float32)
            ok = (sel >= 0) & (sel < num_routed)
            hit = (p[None, :] == (num_shared + sel)[:, None]) & ok[:, None]
            g += tl.where(hit, w[:, None], 0.0)
    else:
        slot = p - num_shared
        is_slot = (p >= num_shared) & (slot < TOP_K)
        sel = tl.load(idx_ptr + pid_b * stride_ib + tl.where(is_slot, slot, 0), mask=is_slot, other=-1)
        w = tl.load(gate_ptr + pid_b * stride_ib + tl.where(is_slot, slot, 0), mask=is_slot, other=0.0)
        ok = is_slot & (sel >= 0) & (sel < num_routed)
        row = tl.where(p < num_shared, 1.0, tl.where(ok, w.to(tl.float32), 0.0))
        g = tl.zeros((BLOCK_M, RP), dtype=tl.float32) + row[None, :]
    return g * scaling


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, idx_ptr, gate_ptr, base_ptr, y_ptr, u_ptr,
    T, d_in, d_out, num_shared, num_routed, scaling,
    stride_xb, stride_xt, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ib, stride_it, stride_sb, stride_st, stride_sn, stride_yb, stride_yt, stride_yn,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, STORE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x ``(B, T, d_in)``, W ``(d_out, d_in)``, A ``(R, d_in)``, B ``(d_out, R)`` -> y ``(B, T, d_out)`` =
    (x W^T) + h B^T (+ bias) (+ base) with ``h = scaling g (x A^T)`` over the rank list; with ``STORE_U``
    the ``pid_n == 0`` programs also write ``u = x A^T`` float32 ``(B, T, RP)``.
    Grid ``(cdiv(T, BLOCK_M), max(1, cdiv(d_out, BLOCK_N)), B)``."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < T
    mask_n = offs_n < d_out
    p = tl.arange(0, RP)
    rank, active = _rank_list(idx_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, TOKEN_ROUTING)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    x_row = x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xt
    # One K loop, one read of each x tile for both products: the base GEMM and the rank projection
    # ([x W^T | x A^T] as one extended N). Each output-column tile recomputes u (RP extra columns).
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < d_in
        xt = tl.load(x_row + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_W:
            wt = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = _dot(xt, wt, acc)
        at = tl.load(
            a_ptr + rank[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_k[:, None] & active[None, :],
            other=0.0,
        )
        u = _dot(xt, at, u)
    if STORE_U:
        if pid_n == 0:  # one program per token block writes u for the backward
            tl.store(u_ptr + (pid_b * T + offs_m[:, None]) * RP + p[None, :], u, mask=mask_m[:, None])
    g = _gates(idx_ptr, gate_ptr, stride_ib, stride_it, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, TOKEN_ROUTING, BLOCK_M)  # fmt: skip
    # h in x's dtype: the up-projection's dot takes operands of one dtype (lora_b's, which is x's)
    h = (u * g).to(x_ptr.dtype.element_ty)
    bt = tl.load(
        b_ptr + offs_n[None, :] * stride_bn + rank[:, None] * stride_br,
        mask=active[:, None] & mask_n[None, :],
        other=0.0,
    )
    acc = _dot(h, bt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BASE:
        base = tl.load(
            base_ptr + pid_b * stride_sb + offs_m[:, None] * stride_st + offs_n[None, :] * stride_sn,
            mask=mask,
            other=0.0,
        )
        acc += base.to(tl.float32)
    y_ptrs = y_ptr + pid_b * stride_yb + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


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


def _same_dtype(**tensors) -> None:
    """The kernels' dots take operands of one dtype: a TypeError naming the tensors otherwise (the
    autograd wrappers cast first, so only a direct caller of a launcher or custom op can hit this)."""
    given = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in given.items())
        raise TypeError(f"the Triton MoR kernels need operands of one dtype, got {listed}")


def _routing_strides(idx: torch.Tensor) -> tuple[int, int, bool]:
    """(stride_ib, stride_it, token_routing) for a contiguous idx ``(B, k)`` or ``(B, T, k)``."""
    if idx.dim() == 2:
        return idx.shape[1], 0, False
    return idx.shape[1] * idx.shape[2], idx.shape[2], True


def forward(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared: int, scaling: float, store_u: bool):
    """One launch: y ``(B, T, d_out)`` in ``x.dtype`` = (x W^T + bias) + scaling B (g * (A x)) (+ base), and
    ``u = x A^T`` float32 ``(B, T, RP)`` over the rank list (``(0,)`` unless ``store_u``)."""
    assert idx.is_contiguous() and gate.is_contiguous() and idx.dtype == torch.int32
    _same_dtype(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    batch, tokens, d_in = x.shape
    d_out, ranks = lora_b.shape
    stride_ib, stride_it, token = _routing_strides(idx)
    rp = padded_ranks(ranks, num_shared, idx.shape[-1], token)
    y = torch.empty((batch, tokens, d_out), dtype=x.dtype, device=x.device)
    u = torch.empty((batch, tokens, rp) if store_u else (0,), dtype=torch.float32, device=x.device)
    if batch * tokens == 0:
        return y, u
    w = weight if weight is not None else lora_b
    s = base.stride() if base is not None else (0, 0, 0)
    cfg = fwd_config(x.device, x.dtype, batch, tokens, d_out, rp)
    # at least one column of programs, so that u is computed even when d_out = 0
    grid = (triton.cdiv(tokens, cfg["BLOCK_M"]), max(1, triton.cdiv(d_out, cfg["BLOCK_N"])), batch)
    _fwd_kernel[grid](
        x, w, bias if bias is not None else y, lora_a, lora_b, idx, gate, base if base is not None else y, y,
        u if store_u else y,
        tokens, d_in, d_out, num_shared, ranks - num_shared, scaling,
        *x.stride(), w.stride(0), w.stride(1), *lora_a.stride(), *lora_b.stride(), stride_ib, stride_it, *s,
        *y.stride(),
        TOP_K=idx.shape[-1], RP=rp, TOKEN_ROUTING=token, HAS_W=weight is not None, HAS_BIAS=bias is not None,
        HAS_BASE=base is not None, STORE_U=store_u, **cfg,
    )  # fmt: skip
    return y, u


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
