"""``mor-sr upscale`` on several processes: ``accelerate launch --num_processes N -m mor_model upscale ...``
(or ``torchrun --nproc_per_node N -m mor_model upscale ...``).

- The main process alone checks the arguments and plans the outputs (one plan, made before anything is
  written, so no process can see another's fresh output as an earlier one); the plan is broadcast.
- :func:`shard_by_pixels` splits the images by pixel count, read from the file headers (nothing is
  decoded), largest first onto the least loaded process: every output belongs to exactly one process,
  so no two processes ever write the same file.
- Each process checks its device first (``cuda:LOCAL_RANK``, made its current CUDA device; ``--device cpu``
  keeps all on the CPU); a problem on any process is gathered, printed once by the main process, and every
  process exits with 2 before anything is planned. Each process then follows the rules of one process:
  existing outputs skipped, atomic writes, a failed image reported and skipped. A run stopped half-way
  and started again skips what was written and finishes the rest.
- One progress bar, on the main process, counts the images of all processes (a shared counter in the
  process group's key-value store); the main process prints the summary of all processes, and every
  process returns the same exit code (the worst one).

Without ``WORLD_SIZE`` > 1 in the environment :class:`Team` is one process and nothing here talks to
another.
"""

from __future__ import annotations

import datetime
import heapq
import os
import time
from collections.abc import Sequence

__all__ = ["Team", "is_main_process", "shard_by_pixels"]


def is_main_process() -> bool:
    """False only in a process that is not rank 0 of its team (so one line, such as ``mor-sr``'s closing
    "done in", is printed once for the whole team): the rank of the started process group, or, once the group
    is gone (:meth:`Team.leave`) or before it starts, the ``RANK`` a launcher (accelerate, torchrun) set."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def shard_by_pixels(pixels: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``pixels`` split into ``parts`` lists of about equal pixel sums (largest first onto the
    least loaded part; ties go to the lower part, so every process computes the same split); each list
    keeps the input order."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    heap = [(0, p) for p in range(parts)]
    shards: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(pixels)), key=lambda i: (-pixels[i], i)):
        load, p = heapq.heappop(heap)
        shards[p].append(i)
        heapq.heappush(heap, (load + max(int(pixels[i]), 1), p))
    return [sorted(s) for s in shards]


class Team:
    """The processes of one run (``rank``, ``size``, ``is_main``) and the few collectives it needs."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.is_main = rank == 0
        self._store = None
        self._key = "mor_upscale_done"

    @classmethod
    def from_env(cls) -> Team:
        """One process, or the process group a launcher (accelerate, torchrun) described in the environment;
        the group is set up here (gloo for the small messages; NCCL is not needed)."""
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():  # long timeout: the main process may be downloading the model meanwhile
            dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=12))
        team = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0))
        team._store = dist.distributed_c10d._get_default_store()
        return team

    def leave(self) -> None:
        """Takes this process out of the group (``destroy_process_group``) before the interpreter exits. Left to
        the interpreter's shutdown, the gloo and store threads of a process whose peers had already exited could
        be destroyed still running: ``std::terminate``, SIGABRT (seen under load on the usage error that every
        process returns at once: 3 runs in 20)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None

    def device(self, asked: str | None) -> tuple[str | None, str | None]:
        """``(device, problem)``: this process's device, or why ``--device`` cannot be shared by the team.

        With several processes on CUDA, ``cuda:LOCAL_RANK`` also becomes the process's current device
        (``torch.cuda.set_device``): Triton launches on the current device, so without it every process
        would run its kernels on GPU 0 against another GPU's memory."""
        if self.size == 1 or asked == "cpu":
            return asked, None
        if asked is not None:
            return (
                None,
                f"--device {asked} with {self.size} processes: each process takes its own GPU (leave --device out, or --device cpu)",
            )
        import torch

        if not torch.cuda.is_available():
            return "cpu", None
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            return None, f"process {self.rank} has local rank {self.local_rank} but there are only {count} CUDA devices"
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}", None

    def problems(self, problem: str | None) -> list[str]:
        """The distinct problems of every process (``problem`` is this one's, None if it has none), in rank
        order, on every process: a problem of any one process stops them all, and the main process can say
        why (only it prints)."""
        if self.size == 1:
            return [problem] if problem else []
        import torch.distributed as dist

        everyone: list[str | None] = [None] * self.size
        dist.all_gather_object(everyone, problem)
        return list(dict.fromkeys(p for p in everyone if p))

    def share(self, obj):
        """``obj`` of the main process, on every process."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sums over the processes."""
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t)
        return t.tolist()

    def worst(self, code: int) -> int:
        """The largest exit code of any process."""
        if self.size == 1:
            return code
        import torch
        import torch.distributed as dist

        t = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # -- one progress bar for everyone ------------------------------------------------------------
    def done(self, n: int) -> int:
        """Adds ``n`` finished images to the team's count; returns the count."""
        if self.size == 1 or self._store is None:
            return n
        return int(self._store.add(self._key, n))

    def follow(self, bar, total: int, poll_s: float = 0.2) -> None:
        """Main process: moves ``bar`` to the team's count until ``total`` images are done."""
        if self.size == 1 or self._store is None:
            return
        while True:
            count = int(self._store.add(self._key, 0))
            if count > bar.n:
                bar.update(count - bar.n)
            if count >= total:
                return
            time.sleep(poll_s)


class TeamBar:
    """The progress bar of a team: drawn by the main process, advanced by every process."""

    def __init__(self, team: Team, total: int, *, quiet: bool, desc: str):
        import sys

        from tqdm.auto import tqdm

        self.team, self.total = team, total
        self.bar = tqdm(total=total, unit="img", disable=quiet or not team.is_main, desc=desc, file=sys.stderr)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.bar.set_postfix_str(text, refresh=refresh)

    def write(self, text: str, file=None) -> None:
        self.bar.write(text, file=file)

    def update(self, n: int) -> None:
        count = self.team.done(n) if self.team.size > 1 else self.bar.n + n
        if count > self.bar.n:
            self.bar.update(count - self.bar.n)

    def close(self) -> None:
        """Main process: waits until every process's images are counted, then closes the bar."""
        if self.team.is_main:
            self.team.follow(self.bar, self.total)
        self.bar.close()
