"""The training log: ``train_log.jsonl`` (one JSON object per logged step) and ``routing_layers.json``
(the layer names of the per-layer active-rank lists). Only the main process writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The run's peak memory so far in MiB and what it measures: on CUDA the peak of
    ``torch.cuda.max_memory_allocated`` (tensors; the caching allocator reserves more), elsewhere the
    process's peak resident set size (everything the process holds, Python and libraries included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


__all__ = ["LAYERS_NAME", "LOG_NAME", "TrainLog", "peak_memory_mb"]

LOG_NAME = "train_log.jsonl"
LAYERS_NAME = "routing_layers.json"


class TrainLog:
    """``output_dir``'s log files; ``is_main``: whether this process writes them."""

    def __init__(self, output_dir: Path, is_main: bool):
        self.out, self.is_main = Path(output_dir), is_main

    def write(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, after_step: int) -> None:
        """Drops log records of steps after the resumed checkpoint (they will be run again)."""
        path = self.out / LOG_NAME
        if not self.is_main or not path.is_file():
            return
        keep = [
            line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def routing_record(self, unet: nn.Module, with_layers: bool) -> dict:
        """Mean active ranks of the last forward (and per layer when ``with_layers``)."""
        from ..stats import routing_stats

        stats = routing_stats(unet)
        per_layer = stats.active_ranks.mean(dim=1)  # (L,)
        rec = {"active_ranks_mean": float(per_layer.mean())}
        if with_layers:
            names_file = self.out / LAYERS_NAME
            if self.is_main and not names_file.exists():
                names_file.write_text(json.dumps(stats.layers) + "\n")
            rec["active_ranks_per_layer"] = [round(float(v), 4) for v in per_layer]
        return rec
