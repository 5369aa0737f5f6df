"""Data parallelism without DDP: every process holds the whole model, and at each optimiser step the
gradients of one optimiser's parameters are averaged over the processes in one collective.

Why not ``DistributedDataParallel``: one training step runs three backward passes (generator, fake
score, discriminator heads) over different parameter groups that share one frozen UNet. DDP expects one
backward per forward of the wrapped module and every wrapped parameter to get a gradient; here each
backward leaves the other groups' parameters without one, so DDP would need ``find_unused_parameters``
(a graph traversal after every forward, and known trouble with gradient checkpointing that recomputes
blocks in backward). Averaging explicitly is simpler and exact:

- every trainable parameter of the group takes part in every all-reduce; a parameter without a local
  gradient (a routed rank no sample of this process picked has an exact zero gradient; a layer a
  process skipped has none) contributes zeros, so the collectives always match across processes and
  routing can never desynchronise them;
- a parameter that has no gradient on any process keeps ``grad = None`` (the optimiser skips it, as it
  would in one process and as DDP leaves globally unused parameters);
- the sum is divided by the number of processes, as DDP does, so N processes with batch B step exactly
  like one process with batch N*B (every loss term is a per-sample mean, and the balance loss counts
  its selections over all processes, :func:`mor_model.train.losses.balance_term`).

The price against DDP: the all-reduce runs after the backward instead of overlapping with it.
Gradient accumulation needs no ``no_sync``: gradients sum locally and are averaged once, at the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["average_gradients", "broadcast_parameters", "is_distributed"]

#: elements per all-reduce bucket (64 MiB of float32)
BUCKET_NUMEL = 1 << 24


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _buckets(params: list[torch.Tensor]):
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() > BUCKET_NUMEL:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(params) -> None:
    """Averages ``p.grad`` over the processes for every ``p`` in ``params`` (same list, same order on all)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    params = list(params)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in groups.items():
        for bucket in _buckets(group):
            grads = [
                p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
                for p in bucket
            ]
            has_grad = torch.tensor([p.grad is not None for p in bucket], dtype=dtype, device=device)
            flat = torch.cat([*grads, has_grad])
            dist.all_reduce(flat)
            flat[: flat.numel() - len(bucket)].div_(world)
            anywhere = flat[flat.numel() - len(bucket) :].tolist()  # one device sync per bucket
            offset = 0
            for p, present in zip(bucket, anywhere, strict=True):
                n = p.numel()
                if present == 0:
                    p.grad = None  # no process had a gradient for it
                elif p.grad is None:
                    p.grad = flat[offset : offset + n].view_as(p).clone()
                else:
                    p.grad.copy_(flat[offset : offset + n].view_as(p))
                offset += n


@torch.no_grad()
def broadcast_parameters(params, src: int = 0) -> None:
    """Copies process ``src``'s values of ``params`` to every process (the start of a run)."""
    if not is_distributed():
        return
    for p in params:
        dist.broadcast(p.data, src)
