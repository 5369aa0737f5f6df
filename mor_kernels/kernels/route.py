"""Triton routing kernel (MOR_SPEC 2.1): softmax in float32, top-k with ties to the lower slot,
renormalisation over the selected slots (zero slots included), ``idx = -1`` for zero slots.

After vLLM's ``topk_softmax``: one program owns ``BLOCK_R`` whole rows of logits and does softmax,
max and top-k in registers; one launch for any number of rows.

``exp`` is libdevice's accurate ``expf`` on a GPU (``tl.exp`` compiles to the approximate ``ex2.approx``
path, which can reorder near-tied probabilities relative to torch's softmax); under the interpreter
``tl.exp`` is numpy's, accurate already.

Rows the softmax turns into NaN (a NaN or ``+inf`` logit, or every logit ``-inf``) follow the
reference (``torch.sort`` puts NaN above every number, stably): the selection treats NaN as larger
than any probability, so such a row selects slots ``0..k-1`` and its gates and probabilities are NaN.
Every stored slot is in ``[0, n_slots)``, so the backward's gathers stay in range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .mor_lora import _INTERPRETED, on_tensor_device
from .mor_lora_tiles import cdiv

try:  # where triton keeps libdevice has moved between versions
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed triton
    from triton.language.extra.cuda import libdevice


@triton.jit
def _exp(x):
    """Accurate float32 ``exp`` (libdevice ``__nv_expf`` when compiled; numpy's under the interpreter)."""
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _select(key, probs, cols, n_slots, BLOCK_S: tl.constexpr):
    """The largest ``key`` of each row (ties to the lower slot): ``(slot, probability there, key with
    that slot taken)``. ``key`` holds no NaN, so some slot always matches the maximum."""
    best = tl.max(key, axis=1)
    pos = tl.min(tl.where(key == best[:, None], cols[None, :], BLOCK_S), axis=1)
    pos = tl.minimum(pos, n_slots - 1)  # for memory safety only: some slot always matches
    hit = cols[None, :] == pos[:, None]
    val = tl.sum(tl.where(hit, probs, 0.0), axis=1)  # the probability itself (NaN stays NaN)
    return pos, val, tl.where(hit, -1.0, key)


@triton.jit
def _route_kernel(
    logits_ptr,
    idx_ptr,
    gate_ptr,
    probs_ptr,
    slot_ptr,
    n_rows,
    n_slots,
    num_real,
    stride_lr,
    stride_ls,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """logits ``(n_rows, n_slots)`` -> idx/gate/slot ``(n_rows, TOP_K)``, probs ``(n_rows, n_slots)``.

    ``slot`` keeps the selected slot (zero slots included) for the backward pass.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_S)
    row_ok = rows < n_rows
    col_ok = cols < n_slots
    mask = row_ok[:, None] & col_ok[None, :]
    logits = tl.load(
        logits_ptr + rows[:, None] * stride_lr + cols[None, :].to(tl.int64) * stride_ls, mask=mask, other=0.0
    ).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    e = tl.where(col_ok[None, :], _exp(logits - row_max[:, None]), 0.0)
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * n_slots + cols[None, :], probs, mask=mask)

    # Selection keys: probabilities are in [0, 1], NaN ranks above them (as in torch.sort) and -1
    # marks a padding column or a slot already taken.
    key0 = tl.where(col_ok[None, :], tl.where(probs != probs, 2.0, probs), -1.0)
    # Pass 1: the sum of the k selected probabilities.
    key = key0
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for _ in range(TOP_K):
        pos, val, key = _select(key, probs, cols, n_slots, BLOCK_S)
        total += val
    if not RENORMALIZE:
        total = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
    # Pass 2: the same selection again, now writing the outputs in descending order.
    key = key0
    for j in range(TOP_K):
        pos, val, key = _select(key, probs, cols, n_slots, BLOCK_S)
        out = rows * TOP_K + j
        tl.store(idx_ptr + out, tl.where(pos < num_real, pos, -1).to(tl.int32), mask=row_ok)
        tl.store(slot_ptr + out, pos.to(tl.int32), mask=row_ok)
        tl.store(gate_ptr + out, val / total, mask=row_ok)


@on_tensor_device
def route_forward(logits: torch.Tensor, top_k: int, num_zero: int, renormalize: bool):
    """logits ``(N, E + Z)`` -> ``(idx int32, gate f32, probs f32, slot int32)``, ``(N, k)`` each but probs."""
    n_rows, n_slots = logits.shape
    dev = logits.device
    idx = torch.empty((n_rows, top_k), dtype=torch.int32, device=dev)
    slot = torch.empty((n_rows, top_k), dtype=torch.int32, device=dev)
    gate = torch.empty((n_rows, top_k), dtype=torch.float32, device=dev)
    probs = torch.empty((n_rows, n_slots), dtype=torch.float32, device=dev)
    if n_rows == 0:
        return idx, gate, probs, slot
    block_s = max(16, triton.next_power_of_2(n_slots))
    block_r = max(1, min(16, 2048 // block_s))
    grid = (cdiv(n_rows, block_r),)
    _route_kernel[grid](
        logits,
        idx,
        gate,
        probs,
        slot,
        n_rows,
        n_slots,
        n_slots - num_zero,
        logits.stride(0),
        logits.stride(1),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
    )
    return idx, gate, probs, slot
