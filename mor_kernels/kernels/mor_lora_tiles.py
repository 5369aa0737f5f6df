"""The fixed tile table of the fused MoR linear forward (:mod:`.mor_lora`), in plain Python (no
triton import), so that the FLOP accounting (:mod:`mor_kernels.flops`) can say what a launch runs.

No autotuning: nothing is ever tuned inside a CUDA-graph capture, and the answer is a pure function
of the device kind, the dtype and the shapes. The choice, for 16-bit inputs on a GPU:

1. ``BLOCK_N``: the forward recomputes the rank projection ``u = x A^T`` (``RP`` columns) in every
   output-column tile, so a row costs ``cdiv(d_out, BLOCK_N) * (BLOCK_N + RP)`` MMA columns (padding
   included); take the cheaper of 64 and 128. With ``RP = 16``: 64 at ``d_out = 320`` (400 columns
   against 432), 128 at 640 and 1280 (720 against 800, 1440 against 1600).
2. Fill the GPU: while the grid ``cdiv(T, BLOCK_M) * cdiv(d_out, BLOCK_N) * B`` has fewer programs than
   an H100/H200 has SMs (132), halve ``BLOCK_N`` (only while ``RP <= 32``: at ``RP = 64`` a 64-wide
   tile would double the MMA work) and then ``BLOCK_M``. At batch 1 and ``RP = 16``: 4096x320 ->
   128x64 (160 programs), 1024x640 -> 64x64 (160), 256x1280 -> 64x64 (80), 64x1280 -> 64x64 (20);
   at batch 8: 128x64, 128x128, 128x128, 64x64.

float32 (IEEE dots, no tensor cores) and the interpreter use small 32-row tiles with the same
``BLOCK_N``, so the executed work (``u`` once per column tile) is a function of the shapes alone.
"""

from __future__ import annotations

import torch

#: SMs of an H100 SXM / H200 (the GPUs the speed targets name): the grid size the fill step aims at.
NUM_SMS = 132


def rank_pad(n: int) -> int:
    """Ranks padded to a power of two (``tl.arange``) of at least 16 (``tl.dot``)."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def padded_ranks(ranks: int, num_shared: int, top_k: int, token_routing: bool) -> int:
    """``RP``, the rank-list width: ``pad(R)`` under token routing, ``pad(S + k)`` under sample routing."""
    return rank_pad(ranks if token_routing else num_shared + top_k)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fwd_tiles(batch: int, tokens: int, d_out: int, rp: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the forward on a GPU with 16-bit inputs (see the module docstring)."""
    bn = 64 if _cdiv(d_out, 64) * (64 + rp) < _cdiv(d_out, 128) * (128 + rp) else 128
    bm = 128 if tokens >= 128 else 64

    def programs() -> int:
        return _cdiv(tokens, bm) * _cdiv(d_out, bn) * batch

    if programs() < NUM_SMS and bn == 128 and rp <= 32:
        bn = 64
    if programs() < NUM_SMS and bm == 128:
        bm = 64
    return bm, bn


def fwd_config(device: torch.device, dtype: torch.dtype, batch: int, tokens: int, d_out: int, rp: int) -> dict:
    """Tiles and launch options of ``_fwd_kernel`` for ``x (batch, tokens, d_in)``, ``d_out`` outputs and
    ``RP`` listed ranks. ``BLOCK_N`` is :func:`fwd_tiles`' on every device and dtype, so the work a
    launch executes (:func:`fwd_column_tiles`) depends on the shapes alone."""
    bm, bn = fwd_tiles(batch, tokens, d_out, rp)
    if torch.device(device).type != "cuda" or dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=bn, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def fwd_column_tiles(batch: int, tokens: int, d_out: int, rp: int) -> int:
    """Programs per token block along ``d_out``, each of which computes ``u = x A^T`` (at least one, which
    computes ``u`` even when ``d_out = 0``)."""
    return max(1, _cdiv(d_out, fwd_tiles(batch, tokens, d_out, rp)[1]))
