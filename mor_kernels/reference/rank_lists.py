"""The active ranks of each sample under sample routing, gathered (a segment per sample).

With sample routing every sample uses ``S`` shared ranks plus the routed ranks its ``k`` slots picked;
a zero slot (``idx = -1``, or any index outside ``[0, E)``) picks nothing, and neither does a slot whose gate
is exactly 0 (``g_r = 0``: MOR_SPEC 2.2 says the rank then adds exactly nothing, whatever its weights hold;
like every rank the sample does not use, the slot's gate gets no gradient). Instead of computing all
``R`` ranks and multiplying the unused ones by a zero gate, the reference gathers each sample's ranks
(Punica/S-LoRA's segment idea, one segment per sample): the work follows the active ranks, so a
picked zero slot saves time, and a rank nobody picked is never read, so a NaN or inf in it cannot
reach the output (MOR_SPEC 2.2).

Rows of the batch with fewer picks than the longest are padded with masked slots: their ``lora_a``
rows and ``lora_b`` columns are replaced by exact zeros (``torch.where``, never a multiplication, so
the padding cannot turn a non-finite weight into a NaN, forward or backward).

On CPU the lists are built on the host (reading ``idx`` there is free), from the picked slots only and
with as few tensor ops as possible: on a CPU each op costs microseconds of dispatch next to the GEMMs,
which is what a dense LoRA of the same rank pays too. Elsewhere (CUDA, ``torch.compile``) they are built
with tensor ops, without a sync, every slot kept and masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def host_sync_allowed(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` on the host is free and allowed: a plain CPU tensor outside
    ``torch.compile`` tracing (a CUDA tensor would synchronise the device)."""
    return t.device.type == "cpu" and type(t) is torch.Tensor and not torch.compiler.is_compiling()


@dataclass
class RankLists:
    """``batch`` lists of ``width`` slots: ``ranks (B * n,)`` int64 rank indices, sample after sample (``0`` on
    masked slots); ``weight (B, n)`` the gate times ``scaling`` in the compute dtype (``scaling`` for the
    shared ranks, 0 on masked slots; differentiable w.r.t. ``gate``); ``valid (B, n)`` bool, None when
    every slot is valid (``all_valid``, known on the host)."""

    batch: int
    width: int
    ranks: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor | None

    @property
    def all_valid(self) -> bool:
        return self.valid is None


def sample_rank_lists(
    idx: torch.Tensor, gate: torch.Tensor, num_shared: int, num_ranks: int, scaling: float, dtype: torch.dtype
) -> RankLists:
    """The rank lists of ``idx``/``gate (B, k)``: ``S`` shared ranks, then the picked routed ranks. A rank
    picked by two slots appears twice, each with its own gate (their contributions add up, as in every
    backend)."""
    if host_sync_allowed(idx) and host_sync_allowed(gate):
        return _host_rank_lists(idx, gate, num_shared, num_ranks, scaling, dtype)
    batch, k = idx.shape
    idx = idx.long()
    real = (idx >= 0) & (idx < num_ranks - num_shared) & (gate != 0)
    shared = torch.arange(num_shared, device=idx.device).expand(batch, num_shared)
    ranks = torch.cat([shared, torch.where(real, idx + num_shared, 0)], dim=1)
    routed_w = torch.where(real, gate.to(dtype), 0) * scaling
    weight = torch.cat([torch.full((batch, num_shared), float(scaling), dtype=dtype, device=idx.device), routed_w], 1)
    valid = torch.cat([torch.ones_like(shared, dtype=torch.bool), real], dim=1)
    return RankLists(batch, num_shared + k, ranks.reshape(-1), weight, valid)


def _host_rank_lists(idx, gate, num_shared, num_ranks, scaling, dtype) -> RankLists:
    num_routed = num_ranks - num_shared
    rows, gates = idx.tolist(), gate.tolist()
    picks = [
        [j for j, r in enumerate(row) if 0 <= r < num_routed and g[j] != 0] for row, g in zip(rows, gates, strict=True)
    ]
    most = max((len(p) for p in picks), default=0)
    batch, width = len(rows), num_shared + most
    ranks = []
    for row, p in zip(rows, picks, strict=True):
        ranks += list(range(num_shared)) + [row[j] + num_shared for j in p] + [0] * (most - len(p))
    ranks = torch.tensor(ranks, dtype=torch.long)
    s = float(scaling)
    if torch.is_grad_enabled() and gate.requires_grad:  # the gate stays in the autograd graph
        k = gate.shape[1]
        if most == k and all(len(p) == k for p in picks):  # every slot picked a rank: the gates in slot order
            routed = gate.to(dtype) * s
        else:
            slots = torch.tensor([p + [k] * (most - len(p)) for p in picks], dtype=torch.long).view(batch, most)
            routed = torch.nn.functional.pad(gate.to(dtype), (0, 1)).gather(1, slots) * s  # slot k: 0
        shared = torch.full((batch, num_shared), s, dtype=dtype)
        weight = torch.cat([shared, routed], dim=1) if num_shared else routed
    else:
        weight = []
        for g, p in zip(gates, picks, strict=True):
            weight += [s] * num_shared + [g[j] * s for j in p] + [0.0] * (most - len(p))
        weight = torch.tensor(weight, dtype=dtype).view(batch, width)
    valid = None
    if any(len(p) < most for p in picks):
        valid = torch.tensor([[True] * (num_shared + len(p)) + [False] * (most - len(p)) for p in picks])
    return RankLists(batch, width, ranks, weight, valid)


def gather_a(lora_a: torch.Tensor, lists: RankLists) -> torch.Tensor:
    """``lora_a (R, ...)`` -> ``(B, n, ...)``: each sample's rank rows (masked slots exact zeros)."""
    a = lora_a.index_select(0, lists.ranks).view(lists.batch, lists.width, *lora_a.shape[1:])
    if lists.valid is None:
        return a
    return torch.where(lists.valid.view(*lists.valid.shape, *([1] * (lora_a.dim() - 1))), a, 0)


def gather_b(lora_b: torch.Tensor, lists: RankLists) -> torch.Tensor:
    """``lora_b (d_out, R)`` -> ``(B, d_out, n)``: each sample's rank columns (masked slots exact zeros)."""
    b = lora_b.index_select(1, lists.ranks).view(lora_b.shape[0], lists.batch, lists.width).transpose(0, 1)
    if lists.valid is None:
        return b
    return torch.where(lists.valid[:, None, :], b, 0)
