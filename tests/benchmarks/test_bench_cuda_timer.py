"""The CUDA timing logic of benchmarks/bench_common.py and bench_mor_lora.py on a simulated GPU clock (no
GPU needed): graphs of n calls take the launch overhead and the L2 flush out of the per-call time, a
failed capture falls back to events and says so, and a case never mixes graph and eager timers."""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

import pytest
import torch


class FakeCuda:
    """Just enough of ``torch.cuda`` for ``time_cuda``: a GPU clock that moves by ``launch_ms`` + the kernel's
    time for every eager launch, and by ``graph_launch_ms`` + the kernels' times for a graph replay."""

    def __init__(self, launch_ms=0.01, graph_launch_ms=0.02, fail_capture=False):
        self.now, self.capturing = 0.0, None
        self.launch_ms, self.graph_launch_ms, self.fail_capture = launch_ms, graph_launch_ms, fail_capture
        self.captures = 0

    def kernel(self, ms: float):
        if self.capturing is not None:
            self.capturing.kernels.append(ms)
        else:
            self.now += self.launch_ms + ms

    # the torch.cuda surface time_cuda uses
    def current_device(self):
        return 0

    def synchronize(self):
        pass

    def Stream(self):  # noqa: N802 - torch.cuda's name
        return SimpleNamespace(wait_stream=lambda other: None)

    def current_stream(self):
        return self.Stream()

    def stream(self, s):
        return contextlib.nullcontext()

    def Event(self, enable_timing=False):  # noqa: N802
        fake = self

        class Event:
            def record(self):
                assert fake.capturing is None, "no events inside a capture"
                self.t = fake.now

            def elapsed_time(self, end):
                return end.t - self.t

        return Event()

    def CUDAGraph(self):  # noqa: N802
        fake = self

        class Graph:
            kernels: list

            def replay(self):
                fake.now += fake.graph_launch_ms + sum(self.kernels)

        return Graph()

    @contextlib.contextmanager
    def graph(self, g):
        self.captures += 1
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        g.kernels, self.capturing = [], g
        try:
            yield
        finally:
            self.capturing = None


class FakeFlush:
    def __init__(self, cuda: FakeCuda, ms: float):
        self.cuda, self.ms = cuda, ms

    def zero_(self):
        self.cuda.kernel(self.ms)


def common(bench):
    return importlib.import_module("bench_common")


def test_graph_of_n_calls_takes_out_launch_overhead_and_flush(bench):
    c = common(bench)
    cuda = FakeCuda()
    t = c.time_cuda(lambda: cuda.kernel(0.005), use_graph=True, flush=FakeFlush(cuda, 0.05), cuda=cuda)
    assert t.graphed and "graph of" in t.timer and "flush subtracted" in t.timer
    # a 5 us kernel: one call per graph would read 0.025 ms (graph launch 0.02 + kernel); n calls and the
    # flush graph subtracted read the kernel alone
    assert t.median_ms == pytest.approx(0.005, rel=1e-6) and t.samples == 10
    n = int(t.timer.split("graph of ")[1].split()[0])
    assert 1 < n <= 500


def test_graph_without_flush_amortises_the_launch(bench):
    c = common(bench)
    cuda = FakeCuda()
    t = c.time_cuda(lambda: cuda.kernel(0.005), use_graph=True, flush=None, cuda=cuda)
    n = int(t.timer.split("graph of ")[1].split()[0])
    assert "L2 not flushed" in t.timer and t.median_ms == pytest.approx(0.005 + 0.02 / n)


def test_eager_events_and_failed_capture(bench):
    c = common(bench)
    cuda = FakeCuda()
    t = c.time_cuda(lambda: cuda.kernel(0.005), flush=FakeFlush(cuda, 0.05), cuda=cuda)
    assert not t.graphed and t.timer == "cuda events, L2 flushed"
    assert t.median_ms == pytest.approx(0.015)  # eager: the launch is in the time (hence graphs for tiny kernels)
    bad = FakeCuda(fail_capture=True)
    t = c.time_cuda(lambda: bad.kernel(0.005), use_graph=True, flush=FakeFlush(bad, 0.05), cuda=bad)
    assert bad.captures == 1 and not t.graphed and "graph capture failed: RuntimeError" in t.timer
    assert t.median_ms == pytest.approx(0.015)


def test_grads_cleared_before_every_eager_call(bench):
    c = common(bench)
    cuda = FakeCuda()
    w = torch.ones(2, requires_grad=True)
    seen = []

    def step():
        seen.append(w.grad is None)
        w.grad = torch.zeros(2)
        cuda.kernel(0.1)

    c.time_cuda(step, grad_to_none=[w], flush=None, cuda=cuda, rep_ms=2.0)
    assert len(seen) >= 10 + 8 and all(seen)


def _args(**kw):
    return SimpleNamespace(**{"rounds": 1, "budget": 0.01, "no_graphs": False, **kw})


def test_a_case_never_mixes_graph_and_eager_timers(bench, monkeypatch):
    """mor:x cannot be captured: every provider of the case is timed again eagerly, so its ratio compares
    like with like (a graph-timed base against an eager mor:x would flatter nothing and mean nothing)."""
    c = common(bench)
    fns = {"base": (lambda: None, (), True), "lora": (lambda: None, (), True), "mor:x": (lambda: None, (), True)}
    uncapturable = fns["mor:x"][0]
    calls = []

    def fake_time_fn(fn, device, *, grad_to_none=(), use_graph=False, budget_s=0.25, **_):
        name = next(p for p, v in fns.items() if v[0] is fn)
        calls.append((name, use_graph))
        graphed = use_graph and fn is not uncapturable
        timer = "cuda graph of 9 calls" if graphed else "cuda events" + (" (graph capture failed)" if use_graph else "")
        return c.Timing(1.0, 1.0, 1.0, 1, timer, [1.0], graphed=graphed)

    monkeypatch.setattr(c, "time_fn", fake_time_fn)
    timings, note = bench.time_providers(fns, torch.device("cuda"), _args(), grad=False)
    assert {t.graphed for t in timings.values()} == {False}
    assert "graph capture failed for mor:x" in note and "every provider" in note
    assert calls[:3] == [("base", True), ("lora", True), ("mor:x", True)]
    assert calls[3:] == [("base", False), ("lora", False), ("mor:x", False)]
    # every capture works: graphs kept, no second pass
    calls.clear()
    uncapturable = None
    timings, note = bench.time_providers(fns, torch.device("cuda"), _args(rounds=2), grad=False)
    assert note == "" and all(t.graphed for t in timings.values()) and len(calls) == 6
    # backward steps are never graphed: all eager, consistent, no second pass
    calls.clear()
    back = {p: (fn, g, False) for p, (fn, g, _) in fns.items()}
    fns.update(back)
    timings, note = bench.time_providers(fns, torch.device("cuda"), _args(), grad=True)
    assert note == "" and not any(t.graphed for t in timings.values()) and all(not g for _, g in calls)


def test_a_provider_that_fails_on_gpu_is_reported(bench, monkeypatch):
    c = common(bench)
    fns = {"base": (lambda: None, (), True), "mor:x": (lambda: None, (), True)}

    def fake_time_fn(fn, device, *, use_graph=False, **_):
        if fn is fns["mor:x"][0]:
            raise RuntimeError("illegal memory access")
        return c.Timing(1.0, 1.0, 1.0, 1, "cuda graph", [1.0], graphed=use_graph)

    monkeypatch.setattr(c, "time_fn", fake_time_fn)
    timings, note = bench.time_providers(fns, torch.device("cuda"), _args(), grad=False)
    assert isinstance(timings["mor:x"], RuntimeError) and timings["base"].graphed and note == ""
