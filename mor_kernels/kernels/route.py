"""Triton routing kernel (MOR_SPEC 2.1): softmax in float32, top-k with ties to the lower slot,
renormalisation over the selected slots (zero slots included), ``idx = -1`` for zero slots.

After vLLM's ``topk_softmax``: one program owns ``BLOCK_R`` whole rows of logits and does softmax,
max and top-k in registers; one launch for any number of rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    e = tl.where(col_ok[None, :], tl.exp(logits - row_max[:, None]), 0.0)
    probs = e / tl.sum(e, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * n_slots + cols[None, :], probs, mask=mask)

    # Pass 1: the sum of the k largest probabilities. Probabilities are >= 0, so -1 marks "taken".
    work = tl.where(col_ok[None, :], probs, -1.0)
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for _ in range(TOP_K):
        best = tl.max(work, axis=1)
        pos = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_S), axis=1)  # ties -> lower slot
        total += best
        work = tl.where(cols[None, :] == pos[:, None], -1.0, work)
    if not RENORMALIZE:
        total = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
    # Pass 2: the same selection again, now writing the outputs in descending order.
    work = tl.where(col_ok[None, :], probs, -1.0)
    for j in range(TOP_K):
        best = tl.max(work, axis=1)
        pos = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_S), axis=1)
        work = tl.where(cols[None, :] == pos[:, None], -1.0, work)
        out = rows * TOP_K + j
        tl.store(idx_ptr + out, tl.where(pos < num_real, pos, -1).to(tl.int32), mask=row_ok)
        tl.store(slot_ptr + out, pos.to(tl.int32), mask=row_ok)
        tl.store(gate_ptr + out, best / total, mask=row_ok)


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
    grid = (triton.cdiv(n_rows, block_r),)
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
