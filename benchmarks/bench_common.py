"""Shared pieces of the benchmarks: timers, the copy ceiling, run metadata and the CSV/JSON writers.

Timers return :class:`Timing` (median and 20/80 percentiles in milliseconds per call):

- CPU (:func:`time_cpu_interleaved`): the functions of one case take turns **sample by sample**
  (a rotating order), so a burst of load from another process hits every provider alike; each sample
  is one untimed call then enough calls to last at least ``sample_ms`` (1 ms), and every provider gets
  at least ``min_samples`` (10) samples and about ``budget_s`` of measurement. The benchmarks run on
  one thread by default (:func:`set_cpu_threads`): with all threads on a loaded machine a call waits
  for its slowest, descheduled thread, and timings came out 10x too slow and quantised to the 4 ms
  scheduler tick. On one thread the samples are timed in process CPU time (:func:`cpu_clock`), which
  leaves out the time other processes hold the core.
- CUDA (:func:`time_cuda`): eagerly, CUDA events around every call, the L2 cache flushed (a 256 MiB
  buffer zeroed, allocated once by :func:`l2_flush_buffer` before anything is measured) before each
  call and gradients set to None (``grad_to_none``); or, when asked (``use_graph``, forward only), as
  ``triton.testing.do_bench_cudagraph`` does: one CUDA graph of ``n`` calls (each after an L2 flush)
  replayed between two events, minus a graph of the ``n`` flushes alone, divided by ``n``, so neither
  the launch overhead nor the flush is in the per-call time. A capture that fails falls back to eager
  timing; ``Timing.graphed`` says which ran, so a caller can time every provider of a case alike.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

CPU_MIN_SAMPLES = 10
CPU_SAMPLE_MS = 1.0


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    timer: str
    raw: list[float] = field(default_factory=list, repr=False)
    graphed: bool = False  # replayed from a CUDA graph (False: eager calls)


class MixedTimers(ValueError):
    """Raised by :func:`merge` for rounds timed partly from CUDA graphs and partly eagerly."""


def merge(timings: Sequence[Timing]) -> Timing:
    """One :class:`Timing` from the raw samples of several (interleaved) measurements of one timer."""
    if len({t.graphed for t in timings}) > 1:
        raise MixedTimers("merge: timings mix graph replay and eager calls; time every round alike")
    raw = [v for t in timings for v in t.raw]
    med, p20, p80 = _quantiles(raw)
    timer = timings[0].timer + (f", {len(timings)} rounds" if len(timings) > 1 else "")
    return Timing(med, p20, p80, len(raw), timer, raw, timings[0].graphed)


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    vals = sorted(values)
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    q = statistics.quantiles(vals, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(vals), q[1], q[7]


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


# ----------------------------------------------------------------------------------------------
# CPU


def set_cpu_threads(requested: int | None) -> str:
    """Sets torch's CPU thread count for a benchmark run and returns a note for the header:
    ``None`` (the default) = 1 thread, ``0`` = leave torch's default, ``n`` = ``n`` threads."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 0):
        raise ValueError(f"threads must be None or an int >= 0, got {requested!r}")
    if requested is None:
        torch.set_num_threads(1)
        return (
            "1 thread (CPU default: all threads on a shared machine time the slowest descheduled thread; "
            "--threads N to change, 0 for torch's default)"
        )
    if requested == 0:
        return f"{torch.get_num_threads()} threads (torch's default, --threads 0)"
    torch.set_num_threads(requested)
    return f"{requested} threads (--threads {requested})"


def threads_note(threads: int | None, gpu: bool) -> str:
    """Applies a benchmark's ``--threads`` and returns the header note: on a GPU run only an explicit
    ``n`` changes torch's host threads; on CPU see :func:`set_cpu_threads`."""
    if threads is not None and threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {threads}")
    if not gpu:
        return set_cpu_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    return f"{torch.get_num_threads()} host threads"


def time_cpu_interleaved(
    fns: Mapping[str, tuple[Callable[[], object], Sequence[torch.Tensor]]],
    *,
    budget_s: float = 0.25,
    min_samples: int = CPU_MIN_SAMPLES,
    sample_ms: float = CPU_SAMPLE_MS,
    max_rounds: int = 5000,
    clock: Callable[[], float] | None = None,
    wall: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing | Exception]:
    """Times ``{name: (fn, grad_to_none)}`` on CPU, the functions taking turns sample by sample.

    Warm-up: at least 2 calls of each and ~5% of the budget; the per-call estimate (median of the
    warm-up calls after the first) sets the calls per sample (``ceil(sample_ms / estimate)``). Then
    rounds of one sample per function, in an order that rotates every round, until every function
    has ``min_samples`` samples and ``budget_s`` per function has passed on the ``wall`` clock (or
    ``max_rounds``). A sample is one untimed call (the previous function evicted this one's data from
    the caches) and then the timed calls. A function that raises is dropped from the rotation and its
    exception returned in its place.

    ``clock`` times the samples; default :func:`cpu_clock`: the process CPU time on one thread (time
    another process holds the core is not counted), the wall clock on several threads.
    """
    if not fns:
        return {}
    if budget_s <= 0 or min_samples < 1 or sample_ms <= 0:
        raise ValueError(f"budget_s, min_samples and sample_ms must be > 0, got {budget_s}, {min_samples}, {sample_ms}")
    clock = clock or cpu_clock()
    names = {time.process_time: "cpu process time", time.perf_counter: "wall perf_counter",
             cpu_user_time: "cpu user time"}  # fmt: skip
    clock_name = names.get(clock, getattr(clock, "__name__", "clock"))
    out: dict[str, Timing | Exception] = {}
    inner: dict[str, int] = {}
    warm_s = 0.05 * budget_s
    for name, (fn, grads) in fns.items():
        try:
            calls: list[float] = []
            walls: list[float] = []
            t0 = wall()
            while len(calls) < 2 or wall() - t0 < warm_s:
                _clear_grads(grads)
                start, start_wall = clock(), wall()
                fn()
                calls.append(clock() - start)
                walls.append(wall() - start_wall)
            # a clock that ticks (cpu_user_time: 10 ms) can read 0 for a short call: then the wall clock
            per_call = statistics.median(calls[1:]) or statistics.median(walls[1:])
            inner[name] = max(1, min(100_000, math.ceil(sample_ms * 1e-3 / max(per_call, 1e-9))))
        except Exception as err:  # reported per function, the others go on
            out[name] = err
    samples: dict[str, list[float]] = {name: [] for name in inner}
    live = list(inner)
    t_end = wall() + budget_s * len(live)
    rnd = 0
    while live and rnd < max_rounds and (min(len(samples[n]) for n in live) < min_samples or wall() < t_end):
        shift = rnd % len(live)
        for name in live[shift:] + live[:shift]:
            fn, grads = fns[name]
            k = inner[name]
            try:
                _clear_grads(grads)
                fn()  # untimed: the caches hold this function's data again, not the previous one's
                start = clock()
                for _ in range(k):
                    _clear_grads(grads)
                    fn()
                samples[name].append((clock() - start) * 1e3 / k)
            except Exception as err:  # the same
                out[name] = err
        live = [n for n in live if n not in out]
        rnd += 1
    for name in inner:
        if name in out:
            continue
        med, p20, p80 = _quantiles(samples[name])
        out[name] = Timing(med, p20, p80, len(samples[name]), f"{clock_name} x{inner[name]}, interleaved",
                           samples[name])  # fmt: skip
    return {name: out[name] for name in fns}


def paired_ratio(raw: Sequence[float], ref: Sequence[float]) -> float | None:
    """The median over rounds of ``raw[i] / ref[i]``, for CPU samples taken in the same interleaved rounds
    (:func:`time_cpu_interleaved` gives every live function one sample per round, in round order): a slow
    drift of the machine (load, clock, memory) moves both samples of a round alike, so this ratio spreads less
    than the ratio of the medians. Rounds where ``ref`` read 0 (a ticking clock) are left out; None without a
    pair."""
    pairs = [a / b for a, b in zip(raw, ref, strict=False) if b > 0]
    return statistics.median(pairs) if pairs else None


def cpu_clock() -> Callable[[], float]:
    """The CPU sample clock: ``time.process_time`` when torch runs on one thread (every op of a call
    runs on the calling thread, so the process CPU time is the call's time without the time other
    processes held the core), else ``time.perf_counter`` (CPU time would add up the threads)."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def cpu_user_time() -> float:
    """The process's user CPU time (``os.times().user``): :func:`cpu_clock` without the kernel's time. For
    model-sized calls whose kernel time is not theirs to control: the SD 2.1 UNet on this project's CPU
    takes ~300k minor page faults per forward (oneDNN reorders every conv weight into fresh memory each call),
    0.4-1.2 s of system time varying with the host's memory management, the same work in every variant.
    It advances in clock ticks (10 ms here): for calls of a second or more."""
    return os.times().user


def time_cpu(
    fn: Callable[[], object], *, grad_to_none=(), budget_s: float = 0.25, min_samples: int = CPU_MIN_SAMPLES
) -> Timing:
    """:func:`time_cpu_interleaved` of one function; raises what ``fn`` raises."""
    t = time_cpu_interleaved({"fn": (fn, grad_to_none)}, budget_s=budget_s, min_samples=min_samples)["fn"]
    if isinstance(t, Exception):
        raise t
    return t


# ----------------------------------------------------------------------------------------------
# CUDA

_L2_FLUSH: dict[torch.device, torch.Tensor] = {}
_DEFAULT = object()


def l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    """The 256 MiB buffer zeroed to flush the L2 cache on a CUDA ``device`` (allocated on the first call,
    so call it before measuring memory); None on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return _L2_FLUSH[device]


def _elapsed(cuda, run: Callable[[], object], reps: int = 1) -> float:
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    cuda.synchronize()
    return start.elapsed_time(end)


def _capture(cuda, body: Callable[[], object]):
    graph = cuda.CUDAGraph()
    with cuda.graph(graph):
        body()
    return graph


def time_cuda(
    fn: Callable[[], object],
    *,
    grad_to_none=(),
    use_graph: bool = False,
    rep_ms: float = 100.0,
    graph_replays: int = 10,
    max_graph_calls: int = 500,
    flush=_DEFAULT,
    cuda=torch.cuda,
) -> Timing:
    """Median/p20/p80 milliseconds per call of ``fn`` on the current CUDA device (see the module
    docstring). ``flush``: the tensor zeroed to flush the L2 (default :func:`l2_flush_buffer`; None:
    no flush); ``cuda``: the ``torch.cuda`` module (a fake in CPU tests)."""
    if flush is _DEFAULT:
        flush = l2_flush_buffer(torch.device("cuda", cuda.current_device()))

    def flush_l2():
        if flush is not None:
            flush.zero_()

    # Warm-up on a side stream (autotuning, cuBLAS handles), as graph capture requires.
    stream = cuda.Stream()
    stream.wait_stream(cuda.current_stream())
    with cuda.stream(stream):
        for _ in range(3):
            _clear_grads(grad_to_none)
            fn()
    cuda.current_stream().wait_stream(stream)
    cuda.synchronize()

    def step():
        _clear_grads(grad_to_none)
        fn()

    est = max(_elapsed(cuda, step, 5) / 5, 1e-4)  # eager, launch overhead included: an upper bound
    note = ""
    if use_graph:
        flush_ms = _elapsed(cuda, flush_l2, 3) / 3 if flush is not None else 0.0
        n = int(min(max(rep_ms / graph_replays / (est + flush_ms), 1), max_graph_calls))

        def calls():
            for _ in range(n):
                flush_l2()
                fn()

        def flushes():
            for _ in range(n):
                flush_l2()

        try:
            graph = _capture(cuda, calls)
            flush_graph = _capture(cuda, flushes) if flush is not None else None
        except Exception as err:  # e.g. an op that syncs with the host: time it eagerly, say so
            cuda.synchronize()
            note = f" (graph capture failed: {type(err).__name__})"
        else:
            graph.replay()  # the first replay uploads the graph
            if flush_graph is not None:
                flush_graph.replay()
            cuda.synchronize()
            raw = []
            for _ in range(graph_replays):  # graph and flush graph alternate: both see the same clocks
                ms = _elapsed(cuda, graph.replay)
                if flush_graph is not None:
                    ms -= _elapsed(cuda, flush_graph.replay)
                raw.append(ms / n)
            med, p20, p80 = _quantiles(raw)
            what = "L2 flushed, flush subtracted" if flush is not None else "L2 not flushed"
            return Timing(med, p20, p80, len(raw), f"cuda graph of {n} calls ({what})", raw, graphed=True)
    n = int(min(max(rep_ms / est, 10), 1000))
    starts = [cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush_l2()
        _clear_grads(grad_to_none)
        starts[i].record()
        fn()
        ends[i].record()
    cuda.synchronize()
    raw = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    med, p20, p80 = _quantiles(raw)
    flushed = ", L2 flushed" if flush is not None else ""
    return Timing(med, p20, p80, n, f"cuda events{flushed}{note}", raw)


def time_fn(fn, device: torch.device, *, grad_to_none=(), use_graph=False, budget_s=0.25, min_samples=CPU_MIN_SAMPLES):
    """:func:`time_cuda` on a CUDA device (about ``budget_s`` of measurement), else :func:`time_cpu`."""
    if device.type == "cuda":
        return time_cuda(fn, grad_to_none=grad_to_none, use_graph=use_graph, rep_ms=budget_s * 400)
    return time_cpu(fn, grad_to_none=grad_to_none, budget_s=budget_s, min_samples=min_samples)


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


def meta_columns(meta: Mapping, fields: Sequence[str]) -> dict:
    """``meta`` as CSV columns beside the row ``fields``: a key that is also a field is written as
    ``meta_<key>`` (prefixed again while it still collides), so a row's own value is never overwritten."""
    taken, out = set(fields), {}
    for key, value in meta.items():
        name = key
        while name in taken:
            name = f"meta_{name}"
        taken.add(name)
        out[name] = value
    return out


def write_outputs(out_dir: str, stem: str, meta: dict, rows: list[dict], fields: Sequence[str]) -> dict:
    """Writes ``<stem>.csv`` (one row per measurement, metadata repeated in every row, under
    :func:`meta_columns`' names) and ``<stem>.json`` (``{"meta": ..., "rows": [...]}``), each atomically;
    returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    json_path = os.path.join(out_dir, f"{stem}.json")
    columns = meta_columns(meta, fields)
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields) + list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k) for k in fields}, **columns})
    os.replace(csv_path + ".tmp", csv_path)
    with open(json_path + ".tmp", "w") as f:
        json.dump({"meta": meta, "fields": list(fields), "rows": rows}, f, indent=1, default=str)
    os.replace(json_path + ".tmp", json_path)
    return {"csv": csv_path, "json": json_path}
