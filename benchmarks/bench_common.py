"""Shared pieces of the benchmarks: timers, the copy ceiling, run metadata and the CSV/JSON writers.

Timers return :class:`Timing` (median and 20/80 percentiles in milliseconds per call):

- CPU: warm-up, then repeated ``time.perf_counter`` samples (several calls per sample when a call
  is shorter than ~1 ms) until a time budget is spent; ``torch.set_num_threads`` is respected (the
  thread count is recorded in the metadata).
- CUDA: CUDA events around every call, the L2 cache flushed (a 256 MiB buffer zeroed) before each
  call, gradients set to None between calls (``grad_to_none``), and the call replayed from a CUDA
  graph when asked (microsecond kernels: launch overhead out of the measurement); a capture that
  fails falls back to eager timing, and the timer name in the row says which ran.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    timer: str
    raw: list[float] = field(default_factory=list, repr=False)


def merge(timings: Sequence[Timing]) -> Timing:
    """One :class:`Timing` from the raw samples of several (interleaved) measurements."""
    raw = [v for t in timings for v in t.raw]
    med, p20, p80 = _quantiles(raw)
    return Timing(
        med, p20, p80, len(raw), timings[0].timer + (f", {len(timings)} rounds" if len(timings) > 1 else ""), raw
    )


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    vals = sorted(values)
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q = statistics.quantiles(vals, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(vals), q[1], q[7]


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def time_cpu(
    fn: Callable[[], object], *, grad_to_none=(), budget_s: float = 0.25, min_samples: int = 5, warm: bool = False
) -> Timing:
    """Median/p20/p80 milliseconds per call of ``fn`` on CPU (see the module docstring); ``warm``: ``fn``
    was just timed (a later interleaved round), so one call of warm-up is enough."""
    # Warm-up: at least 2 calls and ~10% of the budget (allocator, lazy init, oneDNN primitives).
    t0 = time.perf_counter()
    calls = 0
    while calls < (1 if warm else 2) or (not warm and time.perf_counter() - t0 < 0.1 * budget_s):
        _clear_grads(grad_to_none)
        fn()
        calls += 1
    per_call = (time.perf_counter() - t0) / calls
    inner = max(1, int(1e-3 / max(per_call, 1e-9)))  # one sample lasts at least ~1 ms
    samples: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(samples) < min_samples or (time.perf_counter() < t_end and len(samples) < 1000):
        start = time.perf_counter()
        for _ in range(inner):
            _clear_grads(grad_to_none)
            fn()
        samples.append((time.perf_counter() - start) * 1e3 / inner)
    med, p20, p80 = _quantiles(samples)
    return Timing(med, p20, p80, len(samples), f"cpu perf_counter x{inner}", samples)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def time_cuda(fn: Callable[[], object], *, grad_to_none=(), use_graph: bool = False, rep_ms: float = 100.0) -> Timing:
    """Median/p20/p80 milliseconds per call of ``fn`` on the current CUDA device (L2 flushed)."""
    device = torch.device("cuda", torch.cuda.current_device())
    flush = _L2_FLUSH.get(device)
    if flush is None:
        flush = _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    run, timer = fn, "cuda events"
    # Warm-up on a side stream (autotuning, cuBLAS handles), as torch.cuda.graph requires.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            _clear_grads(grad_to_none)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, timer = graph.replay, "cuda graph + events"
        except Exception as err:  # e.g. an op that syncs with the host: time it eagerly, say so
            torch.cuda.synchronize()
            timer = f"cuda events (graph capture failed: {type(err).__name__})"
    # Estimate the call time, then pick the repetition count for ~rep_ms of measurement.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    n = int(min(max(rep_ms / est, 10), 1000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        if not use_graph or timer.startswith("cuda events"):
            _clear_grads(grad_to_none)
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    raw = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    med, p20, p80 = _quantiles(raw)
    return Timing(med, p20, p80, n, timer, raw)


def time_fn(fn, device: torch.device, *, grad_to_none=(), use_graph=False, budget_s=0.25, warm=False, min_samples=5):
    """:func:`time_cuda` on a CUDA device (about ``budget_s`` of measurement), else :func:`time_cpu`."""
    if device.type == "cuda":
        return time_cuda(fn, grad_to_none=grad_to_none, use_graph=use_graph, rep_ms=budget_s * 400)
    return time_cpu(fn, grad_to_none=grad_to_none, budget_s=budget_s, warm=warm, min_samples=min_samples)


def copy_ceiling(device: torch.device, *, budget_s: float = 0.3) -> dict:
    """Bandwidth of a large tensor copy (read + write bytes / time) on ``device``, in GB/s."""
    nbytes = 1 << 30 if device.type == "cuda" else 64 << 20
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, budget_s=budget_s)
    moved = 2 * nbytes
    return {"copy_bytes": moved, "copy_ms": t.median_ms, "copy_GBps": moved / (t.median_ms * 1e-3) / 1e9}


def _git(*args: str) -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    """Device name, library versions, thread count, commit and time, for every output file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        cap = f"{props.major}.{props.minor}"
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
        cap = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device.type,
        "device_name": name,
        "compute_capability": cap,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_dirty": bool(dirty),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def write_outputs(out_dir: str, stem: str, meta: dict, rows: list[dict], fields: Sequence[str]) -> dict:
    """Writes ``<stem>.csv`` (one row per measurement, metadata repeated in every row) and
    ``<stem>.json`` (``{"meta": ..., "rows": [...]}``); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    json_path = os.path.join(out_dir, f"{stem}.json")
    meta_keys = list(meta)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields) + meta_keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k) for k in fields}, **meta})
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "fields": list(fields), "rows": rows}, f, indent=1, default=str)
    return {"csv": csv_path, "json": json_path}
