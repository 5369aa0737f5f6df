"""A deliberately naive, independent MoR implementation: loops over routing units and ranks.

Written from MOR_SPEC sections 2.1-2.2 without sharing code with ``mor_kernels.reference``; slow, so
only for small shapes. Built from differentiable torch ops so gradients can be compared too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_route(logits: torch.Tensor, top_k: int, num_zero: int, renormalize: bool = True):
    """Row by row: softmax, then pick the max k times (first index wins a tie)."""
    rows = logits.reshape(-1, logits.shape[-1]).double()
    num_real = rows.shape[-1] - num_zero
    idx, gate = [], []
    for row in rows:
        p = torch.exp(row - row.max())
        p = p / p.sum()
        remaining = list(range(len(p)))
        chosen = []
        for _ in range(top_k):
            best = remaining[0]
            for j in remaining[1:]:
                if p[j] > p[best]:
                    best = j
            chosen.append(best)
            remaining.remove(best)
        w = torch.stack([p[j] for j in chosen])
        if renormalize:
            w = w / w.sum()
        idx.append([j if j < num_real else -1 for j in chosen])
        gate.append(w)
    shape = logits.shape[:-1] + (top_k,)
    return torch.tensor(idx, dtype=torch.int32).reshape(shape), torch.stack(gate).reshape(shape)


def _unit_gates(idx_row, gate_row, num_shared):
    """(rank, weight) pairs for one routing unit: shared ranks with weight 1, then the routed picks (a pick
    with a gate of exactly 0 has g_r = 0: the unit does not use that rank, MOR_SPEC 2.2)."""
    pairs = [(r, None) for r in range(num_shared)]
    for j in range(idx_row.shape[0]):
        slot = int(idx_row[j])
        if slot >= 0 and float(gate_row[j]) != 0:
            pairs.append((num_shared + slot, gate_row[j]))
    return pairs


def naive_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling):
    """``x (B, T, d_in)``; idx/gate ``(B, k)`` or ``(B, T, k)``; returns the delta ``(B, T, d_out)``."""
    batch, tokens, _ = x.shape
    rows = []
    for b in range(batch):
        for t in range(tokens):
            sel_idx, sel_gate = (idx[b], gate[b]) if idx.dim() == 2 else (idx[b, t], gate[b, t])
            acc = torch.zeros(lora_b.shape[0], dtype=x.dtype)
            for r, w in _unit_gates(sel_idx, sel_gate, num_shared):
                act = torch.dot(lora_a[r], x[b, t])
                if w is not None:
                    act = act * w.to(x.dtype)
                acc = acc + scaling * act * lora_b[:, r]
            rows.append(acc)
    return torch.stack(rows).reshape(batch, tokens, -1)


def naive_conv(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    """Per sample, per rank: one single-filter convolution, weighted and spread by column r of B."""
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    outs = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        y = F.conv2d(xb, weight, bias, **conv)[0]
        for r, w in _unit_gates(idx[b], gate[b], num_shared):
            act = F.conv2d(xb, lora_a[r : r + 1], None, **conv)[0, 0]  # (H_out, W_out)
            if w is not None:
                act = act * w.to(x.dtype)
            y = y + scaling * lora_b[:, r, None, None] * act
        outs.append(y)
    return torch.stack(outs)
