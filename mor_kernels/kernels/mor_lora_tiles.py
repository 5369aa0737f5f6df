"""The fixed tile tables of the fused MoR linear kernels (:mod:`.mor_lora`, :mod:`.mor_lora_bwd`), in plain
Python (no triton import), so that the FLOP accounting (:mod:`mor_kernels.flops`) can say what a launch runs.

No autotuning: nothing is ever tuned inside a CUDA-graph capture, and the answer is a pure function of the
device kind, the dtype and the shapes.

Forward, 16-bit inputs on a GPU (``BLOCK_K = 64``):

1. ``BLOCK_N``: every output-column tile recomputes the rank projection ``u = x A^T`` (``RP`` columns), so a
   row costs ``cdiv(d_out, BLOCK_N) * (BLOCK_N + RP)`` MMA columns (padding included); take the cheaper of 64
   and 128. With ``RP = 16``: 64 at ``d_out = 320`` (400 columns against 432), 128 at 640 and 1280 (720
   against 800, 1440 against 1600). ``BLOCK_M`` = 128, or 64 below 128 tokens.
2. Fill the GPU: while the grid ``cdiv(T, BLOCK_M) * cdiv(d_out, BLOCK_N) * B`` has fewer programs than an
   H100/H200 has SMs (132), halve ``BLOCK_N`` (only while ``RP <= 32``: at ``RP = 64`` a 64-wide tile would
   double the MMA work), then ``BLOCK_M`` (not below 64: wgmma's M).
3. Still short of 132 programs: split the ``d_in`` loop (``SPLIT_K``, a power of two up to 8, while every
   split keeps at least 4 of the 64-wide K steps). The splits write float32 partial tiles of ``acc`` and
   ``u`` (``BLOCK_M x (BLOCK_N + RP)``) to a persistent workspace; the last split of a tile to finish sums
   all of them in split order (a fixed-order reduction: bitwise repeatable for one shape; the split depends on
   the batch and the tokens, so another batch can change the low bits) and runs the epilogue.

Why 4 steps and not more splits: per program, a split reads ``2 (BLOCK_M + BLOCK_N + RP) d_in / S`` bytes of
``x``, ``W`` and ``A`` and the reducing one then reads the ``S`` partials, ``4 S BLOCK_M (BLOCK_N + RP)``
bytes; past ``S = d_in / 256`` the partials outweigh the ``d_in`` slice. Per program at batch 1, ``RP = 16``
(``x``/``W``/``A`` slice + partials written + partials read by the reducer; in L2 or HBM):

===========  ===================  ========  ========================================
T x d_in     tiles (M x N, S)     programs  bytes per program
===========  ===================  ========  ========================================
4096x320     128x64, 1            160       133 KB
1024x640     64x64, 1             160       184 KB
256x1280     64x64, 2             160       184 KB + 20 KB + 41 KB (was 64x64, 80: 369 KB)
64x1280      64x64, 4             80        92 KB + 20 KB + 82 KB (was 64x64, 20: 369 KB)
64x5120      64x64, 8 (d_out      160       184 KB + 20 KB + 164 KB
  ->1280       1280, ff.net.2)
===========  ===================  ========  ========================================

At 64x1280, 4 splits stop at 80 programs: 8 would give 160 but the reducer's 8 partials (164 KB) would cost
what the split saves (a GPU measurement decides; ``benchmarks/gpu_check.sh``). At batch 8 no shape splits.

float32 (IEEE dots, no tensor cores) and the interpreter use small 32-row tiles with the same ``BLOCK_N`` and
no split, so the executed work (``u`` once per column tile) is a function of the shapes alone.

Backward (:func:`bwd_config`): one program per (token block, ``d_in`` tile, sample) reads ``dy`` once for
``dy W`` and ``dy B`` (``dh``, recomputed per ``d_in`` tile like the forward's ``u``): the forward mirrored,
with the same rule for the tiles and the split (of the ``d_out`` loop), ``d_in`` and ``d_out`` exchanged.
At batch 1, ``RP = 16``: 64 tokens x 1280 -> 64x64 tiles, 4 splits (80 programs; the former ``dh`` pass had
one); 256 x 1280 -> 64x64, 2 splits (160).
"""

from __future__ import annotations

import functools

import torch

#: SMs of an H100 SXM / H200 (the GPUs the speed targets name): the grid size the fill step aims at.
NUM_SMS = 132
#: fewest 64-wide K steps per split of the forward's d_in loop
MIN_SPLIT_STEPS = 4
MAX_SPLIT_K = 8


def rank_pad(n: int) -> int:
    """Ranks padded to a power of two (``tl.arange``) of at least 16 (``tl.dot``)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def padded_ranks(ranks: int, num_shared: int, top_k: int, token_routing: bool) -> int:
    """``RP``, the rank-list width: ``pad(R)`` under token routing, ``pad(S + k)`` under sample routing."""
    return rank_pad(ranks if token_routing else num_shared + top_k)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` is a JIT function: ~2 us per call outside a kernel)."""
    return -(-a // b)


def fill_tiles(batch: int, tokens: int, d_out: int, rp: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of a token x output-column GEMM on a GPU with 16-bit inputs (steps 1-2 of the
    module docstring)."""
    bn = 64 if cdiv(d_out, 64) * (64 + rp) < cdiv(d_out, 128) * (128 + rp) else 128
    bm = 128 if tokens >= 128 else 64

    def programs() -> int:
        return cdiv(tokens, bm) * cdiv(d_out, bn) * batch

    if programs() < NUM_SMS and bn == 128 and rp <= 32:
        bn = 64
    if programs() < NUM_SMS and bm == 128:
        bm = 64
    return bm, bn


def fwd_tiles(batch: int, tokens: int, d_in: int, d_out: int, rp: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, SPLIT_K)`` of the forward on a GPU with 16-bit inputs (see the module docstring)."""
    bm, bn = fill_tiles(batch, tokens, d_out, rp)
    programs = cdiv(tokens, bm) * max(1, cdiv(d_out, bn)) * batch
    split = 1
    while programs * split < NUM_SMS and split < MAX_SPLIT_K and d_in >= 2 * split * 64 * MIN_SPLIT_STEPS:
        split *= 2
    return bm, bn, split


@functools.lru_cache(maxsize=4096)  # per launch: the same few shapes every image (~5 us of Python each)
def fwd_config(
    device: torch.device, dtype: torch.dtype, batch: int, tokens: int, d_in: int, d_out: int, rp: int
) -> dict:
    """Tiles and launch options of ``_fwd_kernel`` for ``x (batch, tokens, d_in)``, ``d_out`` outputs and ``RP``
    listed ranks. ``BLOCK_N`` is :func:`fwd_tiles`' on every device and dtype, so the work a launch executes
    (:func:`fwd_column_tiles`) depends on the shapes alone."""
    bm, bn, split = fwd_tiles(batch, tokens, d_in, d_out, rp)
    if torch.device(device).type != "cuda" or dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=bn, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=2)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=split, num_warps=warps, num_stages=3)


def fwd_column_tiles(batch: int, tokens: int, d_out: int, rp: int) -> int:
    """Programs per token block along ``d_out``, each of which computes ``u = x A^T`` (at least one, which
    computes ``u`` even when ``d_out = 0``); a split of ``d_in`` does not change the work."""
    return max(1, cdiv(d_out, fill_tiles(batch, tokens, d_out, rp)[1]))


@functools.lru_cache(maxsize=4096)
def bwd_config(
    device: torch.device, dtype: torch.dtype, batch: int, tokens: int, d_in: int, d_out: int, rp: int
) -> dict:
    """Tiles of ``_bwd_kernel`` (token block ``BLOCK_M``, ``d_in`` tile ``BLOCK_N``, ``d_out`` step ``BLOCK_K``,
    ``SPLIT_K`` of the ``d_out`` loop): the forward's rule with the roles of ``d_in`` and ``d_out`` exchanged (the
    ``dx`` GEMM's output is ``(T, d_in)``, its reduction ``d_out``); small tiles and no split for float32 and the
    interpreter, with the same ``BLOCK_N`` (so the executed work, :func:`bwd_column_tiles`, depends on the shapes
    alone)."""
    bm, bn, split = fwd_tiles(batch, tokens, d_out, d_in, rp)
    if torch.device(device).type != "cuda" or dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=bn, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=2)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=split, num_warps=warps, num_stages=3)


def bwd_column_tiles(batch: int, tokens: int, d_in: int, d_out: int, rp: int) -> int:
    """Programs per token block along ``d_in`` in the backward, each of which computes ``dh = dy B``."""
    return max(1, cdiv(d_in, fill_tiles(batch, tokens, d_in, rp)[1]))
