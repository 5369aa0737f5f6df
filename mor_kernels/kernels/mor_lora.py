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
N over the same K loop). Grid ``(cdiv(T, BLOCK_M), max(1, cdiv(d_out, BLOCK_N)) * SPLIT_K, B)``, fixed by the
shapes (no data-dependent grid, no host sync: CUDA graphs can capture it). Each program loops once
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

Split-K (``SPLIT_K > 1``, where the table finds too few tiles to fill the GPU, see :mod:`.mor_lora_tiles`):
each split runs a slice of the ``d_in`` loop and writes float32 partials of ``acc`` and ``u`` to a workspace
(:func:`split_workspace`); then it counts itself in an int32 arrival counter of its tile with one atomic
increment (``acq_rel``, GPU scope). That atomic is what orders the splits: its release makes a split's
partials visible before its count, its acquire lets the split that counts last (the reducer) read every other
split's partials; relaxing it (or dropping the barrier before it) lets the reducer read stale partials, a
wrong result that no interpreter test can show. The reducer sums the partials in split order, never in arrival
order (:func:`_split_sum`: the same bits whichever split is last), resets the counter to zero and runs the
epilogue. The backward splits its ``d_out`` loop the same way. Results are bitwise repeatable for identical
shapes only: ``SPLIT_K`` depends on the batch and the token count, so the same image alone and in a batch can
differ in the low bits.

The workspace and the counters (:func:`split_workspace`), and CUDA graphs. The counters must be zero when a
launch starts; every launch leaves them zero (the reducer of each tile resets its own), so a buffer can serve
launch after launch, provided no two launches use it at once:

- eager launches take a buffer cached per (device, stream); the launches on one stream run in order, so they
  never overlap. A larger launch replaces the cached buffer; the old one is freed to the caching allocator,
  which hands its memory only to later allocations on the same stream (it was allocated on that stream), in
  stream order, after the launches that used it;
- a launch captured in a CUDA graph (``torch.cuda.is_current_stream_capturing()``) never touches that cache:
  it allocates its own workspace and counters, the counters zeroed by a memset recorded into the graph just
  before the kernel, from the graph's memory pool, which the graph holds until it is destroyed. So every
  replay starts from zeroed counters (and the kernel leaves them zero), graphs captured one after another on
  one stream replay in any order, two graphs replay at once on two streams, and no eager launch or later
  capture frees or shares a graph's buffers (within one capture, the pool reuses a freed block only after
  the kernel that used it, in capture order, as for any temporary).

MOR_SPEC 2.2: ``h = where(g != 0, scaling g u, 0)``, so an unpicked rank's ``u`` (NaN when its filter is) never
reaches ``y``. Under sample routing only picked ranks are loaded at all; under token routing the rank tile is
dense, and ``h B^T`` would multiply a token's zero by another token's NaN column of ``B``: :func:`_dot_picked`
checks the tile and, only when it holds a non-finite value, runs the dot on its finite part and gives NaN to
the tokens that use the bad entries.

The backward kernels are in :mod:`.mor_lora_bwd`.

All offsets are int64; every dot (``_dot``) accumulates in float32 with ``input_precision="ieee"`` (no
TF32 for float32 inputs, so float32 results meet the float32 tolerance).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from .mor_lora_tiles import cdiv, fwd_config, padded_ranks

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
    gate_ptr,
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
        w = tl.load(gate_ptr + pid_b * stride_ib + tl.where(is_slot, slot, 0), mask=is_slot, other=0.0)
        # a gate of exactly 0 is a zero slot: g_r = 0, the rank is not used (MOR_SPEC 2.2)
        active = (p < num_shared) | (is_slot & (sel >= 0) & (sel < num_routed) & (w != 0))
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


@triton.jit
def _finite(w):
    """Whether each element of ``w`` is finite."""
    wf = w.to(tl.float32)
    return (wf == wf) & (tl.abs(wf) < float("inf"))


@triton.jit
def _dot_picked(h, w, acc, GUARD: tl.constexpr):
    """``acc + h @ w`` where a zero of ``h`` contributes exactly zero even against a non-finite row of ``w``
    (MOR_SPEC 2.2; with ``GUARD``, for dense rank tiles whose rows some tokens do not pick). A tile with a
    non-finite value runs the dot on the finite part and gives NaN to the outputs of the rows of ``h``
    that do use a non-finite entry (a second, ``h != 0`` by ``!finite(w)`` counting dot); a finite tile, the
    normal case, costs one elementwise check."""
    if GUARD:
        finite = _finite(w)
        if tl.sum(tl.sum(tl.where(finite, 0, 1), axis=1), axis=0) > 0:
            picked = tl.where(h != 0, 1.0, 0.0).to(w.dtype)
            hits = _dot(picked, tl.where(finite, 0.0, 1.0).to(w.dtype), tl.zeros(acc.shape, dtype=tl.float32))
            acc = _dot(h, tl.where(finite, w, tl.zeros_like(w)), acc)
            acc = tl.where(hits > 0, float("nan"), acc)
        else:
            acc = _dot(h, w, acc)
    else:
        acc = _dot(h, w, acc)
    return acc


@triton.jit
def _split_arrive(acc, aux, ws_acc_ptr, ws_aux_ptr, lock_ptr, tile, pid_s,
                  SPLIT_K: tl.constexpr, HAS_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  AUX: tl.constexpr):  # fmt: skip
    """Split-K, first half: split ``pid_s`` of ``tile`` writes its float32 partials ``acc (BLOCK_M, BLOCK_N)``
    (unless not ``HAS_ACC``) and ``aux (BLOCK_M, AUX)`` to ``ws_acc (tiles, S, BLOCK_M, BLOCK_N)`` /
    ``ws_aux (tiles, S, BLOCK_M, AUX)`` and counts itself in ``lock[tile]``; true for the split that counts
    last, which then owns the tile (:func:`_split_sum`). The count is an ``acq_rel`` atomic: it publishes these
    partials before the count and makes the others' visible to the last split; a relaxed one would not."""
    i = tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    slot = tile * SPLIT_K + pid_s
    if HAS_ACC:
        tl.store(ws_acc_ptr + (slot * BLOCK_M + i) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], acc)
    tl.store(ws_aux_ptr + (slot * BLOCK_M + i) * AUX + tl.arange(0, AUX)[None, :], aux)
    tl.debug_barrier()  # every thread's partial is written before the count releases them
    return tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1


@triton.jit
def _split_sum(ws_acc_ptr, ws_aux_ptr, lock_ptr, tile,
               SPLIT_K: tl.constexpr, HAS_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               AUX: tl.constexpr):  # fmt: skip
    """Split-K, second half (the last split of ``tile`` only): the sums of the ``S`` partials in split order,
    whichever split came last (a fixed order: bitwise repeatable for one shape); resets ``lock[tile]`` to zero
    for the next launch (and a CUDA graph's next replay)."""
    i = tl.arange(0, BLOCK_M).to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    aux = tl.zeros((BLOCK_M, AUX), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        slot = tile * SPLIT_K + s
        if HAS_ACC:
            acc += tl.load(ws_acc_ptr + (slot * BLOCK_M + i) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :],
                           cache_modifier=".cg")  # fmt: skip
        aux += tl.load(ws_aux_ptr + (slot * BLOCK_M + i) * AUX + tl.arange(0, AUX)[None, :], cache_modifier=".cg")
    tl.store(lock_ptr + tile, 0)
    return acc, aux


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_epilogue(
    acc, u, x_ptr, bias_ptr, b_ptr, idx_ptr, gate_ptr, base_ptr, y_ptr, u_ptr,
    rank, active, offs_m, offs_n, mask_m, mask_n, pid_b, pid_n,
    T, num_shared, num_routed, scaling,
    stride_bn, stride_br, stride_ib, stride_it, stride_sb, stride_st, stride_sn, stride_yb, stride_yt, stride_yn,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BASE: tl.constexpr, STORE_U: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """After the K loop: u stored for the backward, ``h = scaling g u`` (zero where ``g = 0``, whatever ``u``
    holds), ``acc += h B^T``, bias, base, one store of ``y``."""
    p = tl.arange(0, RP)
    if STORE_U:
        if pid_n == 0:  # one program per token block writes u for the backward
            tl.store(u_ptr + (pid_b * T + offs_m[:, None]) * RP + p[None, :], u, mask=mask_m[:, None])
    g = _gates(idx_ptr, gate_ptr, stride_ib, stride_it, pid_b, offs_m, mask_m, num_shared, num_routed, scaling,
               TOP_K, RP, TOKEN_ROUTING, BLOCK_M)  # fmt: skip
    # h in x's dtype: the up-projection's dot takes operands of one dtype (lora_b's, which is x's)
    h = tl.where(g != 0, u * g, 0.0).to(x_ptr.dtype.element_ty)
    bt = tl.load(
        b_ptr + offs_n[None, :] * stride_bn + rank[:, None] * stride_br,
        mask=active[:, None] & mask_n[None, :],
        other=0.0,
    )
    acc = _dot_picked(h, bt, acc, TOKEN_ROUTING)
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


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, idx_ptr, gate_ptr, base_ptr, y_ptr, u_ptr, ws_acc_ptr, ws_u_ptr,
    lock_ptr,
    T, d_in, d_out, num_shared, num_routed, scaling,
    stride_xb, stride_xt, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ib, stride_it, stride_sb, stride_st, stride_sn, stride_yb, stride_yt, stride_yn,
    TOP_K: tl.constexpr, RP: tl.constexpr, TOKEN_ROUTING: tl.constexpr, HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, STORE_U: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x ``(B, T, d_in)``, W ``(d_out, d_in)``, A ``(R, d_in)``, B ``(d_out, R)`` -> y ``(B, T, d_out)`` =
    (x W^T) + h B^T (+ bias) (+ base) with ``h = scaling g (x A^T)`` over the rank list; with ``STORE_U``
    the ``pid_n == 0`` programs also write ``u = x A^T`` float32 ``(B, T, RP)``.
    Grid ``(cdiv(T, BLOCK_M), max(1, cdiv(d_out, BLOCK_N)) * SPLIT_K, B)``. With ``SPLIT_K > 1`` split ``s``
    of a tile runs the K steps ``[s n / S, (s + 1) n / S)``, writes its float32 partials of ``acc`` and ``u``
    to ``ws_acc (tiles, S, BLOCK_M, BLOCK_N)`` / ``ws_u (tiles, S, BLOCK_M, RP)`` and counts itself in
    ``lock[tile]`` (int32, zero between launches); the split that counts last sums the ``S`` partials in
    split order, resets the count and runs the epilogue."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_ns = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    pid_n = pid_ns // SPLIT_K
    pid_s = pid_ns % SPLIT_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < T
    mask_n = offs_n < d_out
    rank, active = _rank_list(idx_ptr, gate_ptr, stride_ib, pid_b, num_shared, num_routed, TOP_K, RP, TOKEN_ROUTING)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    x_row = x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xt
    n_steps = tl.cdiv(d_in, BLOCK_K)
    k_lo = (pid_s * n_steps // SPLIT_K) * BLOCK_K
    k_hi = ((pid_s + 1) * n_steps // SPLIT_K) * BLOCK_K
    # One K loop, one read of each x tile for both products: the base GEMM and the rank projection
    # ([x W^T | x A^T] as one extended N). Each output-column tile recomputes u (RP extra columns).
    for k0 in range(k_lo, k_hi, BLOCK_K):
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
    if SPLIT_K == 1:
        _fwd_epilogue(acc, u, x_ptr, bias_ptr, b_ptr, idx_ptr, gate_ptr, base_ptr, y_ptr, u_ptr,
                      rank, active, offs_m, offs_n, mask_m, mask_n, pid_b, pid_n, T, num_shared, num_routed, scaling,
                      stride_bn, stride_br, stride_ib, stride_it, stride_sb, stride_st, stride_sn,
                      stride_yb, stride_yt, stride_yn,
                      TOP_K, RP, TOKEN_ROUTING, HAS_BIAS, HAS_BASE, STORE_U, BLOCK_M)  # fmt: skip
    else:
        tile = (pid_b * tl.num_programs(0) + pid_m) * (tl.num_programs(1) // SPLIT_K) + pid_n
        if _split_arrive(acc, u, ws_acc_ptr, ws_u_ptr, lock_ptr, tile, pid_s, SPLIT_K, HAS_W, BLOCK_M, BLOCK_N, RP):
            acc, u = _split_sum(ws_acc_ptr, ws_u_ptr, lock_ptr, tile, SPLIT_K, HAS_W, BLOCK_M, BLOCK_N, RP)
            _fwd_epilogue(acc, u, x_ptr, bias_ptr, b_ptr, idx_ptr, gate_ptr, base_ptr, y_ptr, u_ptr,
                          rank, active, offs_m, offs_n, mask_m, mask_n, pid_b, pid_n, T, num_shared, num_routed,
                          scaling, stride_bn, stride_br, stride_ib, stride_it, stride_sb, stride_st, stride_sn,
                          stride_yb, stride_yt, stride_yn,
                          TOP_K, RP, TOKEN_ROUTING, HAS_BIAS, HAS_BASE, STORE_U, BLOCK_M)  # fmt: skip


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


def like_tokens(x: torch.Tensor, features: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new ``(B, T, features)`` tensor in ``x``'s layout: token-fastest (``(B, features, T)`` memory, as a
    channels-first convolution's pixels) when ``x`` is, else contiguous."""
    batch, tokens, _ = x.shape
    dtype = x.dtype if dtype is None else dtype
    if x.dim() == 3 and tokens > 1 and x.stride(1) == 1 and x.stride(2) != 1:
        return torch.empty((batch, features, tokens), dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty((batch, tokens, features), dtype=dtype, device=x.device)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


_NO_GUARD = contextlib.nullcontext()


def device_guard(device: torch.device):
    """``torch.cuda.device(device)``, or nothing to enter when ``device`` is not a GPU or is the current one (the
    usual case, one GPU: entering and leaving a guard is a few us of host time per launch)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def on_tensor_device(launcher):
    """Runs ``launcher`` with its first argument's CUDA device current. Triton launches on the current device
    and its current stream, not on the tensors' device: without this, tensors on ``cuda:1`` with device 0
    current would run on device 0's stream (or fail). A no-op when the device is current already, and for CPU
    tensors (the interpreter)."""

    @functools.wraps(launcher)
    def run(t, *args, **kwargs):
        with device_guard(t.device):
            return launcher(t, *args, **kwargs)

    return run


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    if device.type != "cuda":
        return False
    with device_guard(device):
        return torch.cuda.is_current_stream_capturing()


def split_workspace(device: torch.device, floats: int, locks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K partials (float32, at least ``floats``) and the tiles' arrival counters (int32, at least
    ``locks``, zero when a launch starts; each launch leaves them zero). Eager: kept per device and stream and
    reused by every later launch on that stream (no allocation per call), replaced by a larger pair when a
    launch needs more. Inside a CUDA-graph capture: a new pair for this launch only, the counters zeroed in the
    graph (see the module docstring)."""
    device = torch.device(device)
    if capturing(device):
        return (
            torch.empty(max(floats, 1), dtype=torch.float32, device=device),
            torch.zeros(max(locks, 1), dtype=torch.int32, device=device),
        )
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    ws, lock = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats:
        ws = torch.empty(max(floats, 1 << 16), dtype=torch.float32, device=device)
    if lock is None or lock.numel() < locks:
        lock = torch.zeros(max(locks, 1024), dtype=torch.int32, device=device)
    _WORKSPACES[key] = (ws, lock)
    return ws, lock


def split_buffers(placeholder, tiles: int, split: int, block_m: int, block_n: int, aux: int):
    """``(ws_acc, ws_aux, lock)`` views of :func:`split_workspace` for a split-K launch over ``tiles`` tiles, on
    ``placeholder``'s device (which stands in for all three when ``split == 1``: nothing is allocated)."""
    if split == 1:
        return placeholder, placeholder, placeholder
    device = placeholder.device
    n_acc = tiles * split * block_m * block_n
    ws, lock = split_workspace(device, n_acc + tiles * split * block_m * aux, tiles)
    return ws[:n_acc], ws[n_acc:], lock


@on_tensor_device
def forward(x, weight, bias, lora_a, lora_b, idx, gate, base, num_shared: int, scaling: float, store_u: bool, out=None):
    """One launch: y ``(B, T, d_out)`` in ``x.dtype`` = (x W^T + bias) + scaling B (g * (A x)) (+ base), and
    ``u = x A^T`` float32 ``(B, T, RP)`` over the rank list (``(0,)`` unless ``store_u``). ``y`` is allocated in
    ``x``'s layout (:func:`like_tokens`) unless ``out``, a ``(B, T, d_out)`` tensor of any strides, is given."""
    assert idx.is_contiguous() and gate.is_contiguous() and idx.dtype == torch.int32
    _same_dtype(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    batch, tokens, d_in = x.shape
    d_out, ranks = lora_b.shape
    stride_ib, stride_it, token = _routing_strides(idx)
    rp = padded_ranks(ranks, num_shared, idx.shape[-1], token)
    y = like_tokens(x, d_out) if out is None else out
    u = torch.empty((batch, tokens, rp) if store_u else (0,), dtype=torch.float32, device=x.device)
    if batch * tokens == 0:
        return y, u
    w = weight if weight is not None else lora_b
    s = base.stride() if base is not None else (0, 0, 0)
    cfg = dict(fwd_config(x.device, x.dtype, batch, tokens, d_in, d_out, rp))
    split = cfg["SPLIT_K"]
    # at least one column of programs, so that u is computed even when d_out = 0
    tiles = (cdiv(tokens, cfg["BLOCK_M"]), max(1, cdiv(d_out, cfg["BLOCK_N"])), batch)
    ws_acc, ws_u, lock = split_buffers(y, tiles[0] * tiles[1] * batch, split, cfg["BLOCK_M"], cfg["BLOCK_N"], rp)
    _fwd_kernel[(tiles[0], tiles[1] * split, batch)](
        x, w, bias if bias is not None else y, lora_a, lora_b, idx, gate, base if base is not None else y, y,
        u if store_u else y, ws_acc, ws_u, lock,
        tokens, d_in, d_out, num_shared, ranks - num_shared, scaling,
        *x.stride(), w.stride(0), w.stride(1), *lora_a.stride(), *lora_b.stride(), stride_ib, stride_it, *s,
        *y.stride(),
        TOP_K=idx.shape[-1], RP=rp, TOKEN_ROUTING=token, HAS_W=weight is not None, HAS_BIAS=bias is not None,
        HAS_BASE=base is not None, STORE_U=store_u, **cfg,
    )  # fmt: skip
    return y, u
