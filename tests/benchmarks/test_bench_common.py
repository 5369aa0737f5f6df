"""benchmarks/bench_common.py: percentiles, merged rounds, gradients cleared between calls, the interleaved
CPU timer on a fake clock, thread defaults, metadata and the CSV/JSON writer (no timed assertions)."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import statistics
import time

import pytest
import torch


def common(bench):  # the bench fixture puts benchmarks/ on sys.path
    return importlib.import_module("bench_common")


def test_quantiles_and_merge(bench):
    c = common(bench)
    med, p20, p80 = c._quantiles([float(v) for v in range(1, 12)])  # 1..11
    assert (med, p20, p80) == (6.0, 3.0, 9.0)
    assert c._quantiles([4.0]) == (4.0, 4.0, 4.0)
    a = c.Timing(0, 0, 0, 3, "cpu", [1.0, 2.0, 3.0])
    b = c.Timing(0, 0, 0, 2, "cpu", [4.0, 5.0])
    m = c.merge([a, b])
    assert m.samples == 5 and m.median_ms == 3.0 and m.raw == [1.0, 2.0, 3.0, 4.0, 5.0] and "2 rounds" in m.timer


def test_time_cpu_clears_gradients_and_counts_calls(bench):
    c = common(bench)
    w = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(w.grad is None)
        (w * 2).sum().backward()

    t = c.time_cpu(step, grad_to_none=[w], budget_s=0.01, min_samples=4)
    assert all(seen) and len(seen) >= 4 + 2  # warm-up + samples, grads None before every call
    assert t.samples >= 4 and len(t.raw) == t.samples and t.p20_ms <= t.median_ms <= t.p80_ms


def test_environment_and_writer(bench, tmp_path):
    c = common(bench)
    meta = c.environment(torch.device("cpu"))
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "time_utc", "torch_threads", "command"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    rows = [{"a": 1, "b": "x"}, {"a": 2}]
    paths = c.write_outputs(str(tmp_path), "t", meta, rows, ("a", "b"))
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["a"] for r in table] == ["1", "2"] and table[1]["b"] == "" and table[0]["torch"] == torch.__version__
    with open(paths["json"]) as f:
        data = json.load(f)
    assert data["rows"] == rows and data["fields"] == ["a", "b"] and data["meta"]["device"] == "cpu"


def test_writer_metadata_never_overwrites_a_row_column(bench, tmp_path):
    """A metadata key that is also a row field goes to ``meta_<key>``; the row's value stays in its column."""
    c = common(bench)
    rows = [{"device": "row-device", "shape": "s1"}, {"device": "other", "shape": "s2"}]
    meta = {"device": "cpu", "meta_device": "taken", "torch": "v"}
    paths = c.write_outputs(str(tmp_path), "t", meta, rows, ("device", "shape"))
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["device"] for r in table] == ["row-device", "other"]
    assert table[0]["meta_device"] == "cpu" and table[0]["meta_meta_device"] == "taken" and table[1]["torch"] == "v"
    assert sorted(os.listdir(tmp_path)) == ["t.csv", "t.json"]  # no temporary file left behind


class FakeClock:
    """A clock that only moves when a fake call does work; between ``slow`` = (start, end) every call is
    ``factor`` times slower (another process taking the core)."""

    def __init__(self):
        self.t = 0.0
        self.slow, self.factor = (float("inf"), float("inf")), 1.0

    def __call__(self) -> float:
        return self.t

    def work(self, ms: float):
        self.t += ms * 1e-3 * (self.factor if self.slow[0] <= self.t < self.slow[1] else 1.0)


def test_time_cpu_interleaved_alternates_and_measures_the_work(bench):
    c = common(bench)
    clock, log = FakeClock(), []

    def fake(name, ms):
        def fn():
            log.append(name)
            clock.work(ms)

        return fn

    fns = {"base": (fake("base", 0.4), ()), "lora": (fake("lora", 0.7), ()), "slow": (fake("slow", 3.0), ())}
    out = c.time_cpu_interleaved(fns, budget_s=0.05, min_samples=6, sample_ms=1.0, clock=clock, wall=clock)
    assert [out[n].median_ms for n in fns] == pytest.approx([0.4, 0.7, 3.0])
    assert len({out[n].samples for n in fns}) == 1 and out["base"].samples >= 6  # one sample each per round
    assert "x3" in out["base"].timer and "x2" in out["lora"].timer and "x1" in out["slow"].timer  # >= 1 ms a sample
    # after the warm-up, no function runs more than one sample (1 untimed + its timed calls) in a row
    timed = log[len(log) - sum(out[n].samples * (int(out[n].timer.split(" x")[1][0]) + 1) for n in fns) :]
    runs, prev, longest = 0, None, {}
    for name in timed:
        runs = runs + 1 if name == prev else 1
        prev, longest[name] = name, max(longest.get(name, 0), runs)
    assert longest == {"base": 4, "lora": 3, "slow": 2}


def test_a_ticking_clock_sizes_its_samples_by_the_wall_clock(bench):
    """A clock that advances in 10 ms ticks (cpu_user_time) reads 0 for most 3 ms calls: the calls per sample
    come from the wall clock then (ceil(29 / 3) = 10 calls per sample), not from a zero estimate (100000)."""
    c = common(bench)
    wall = FakeClock()

    def ticks():
        return math.floor(wall.t / 0.01 + 1e-9) * 0.01

    out = c.time_cpu_interleaved({"fn": (lambda: wall.work(3.0), ())}, budget_s=0.5, min_samples=5, sample_ms=29.0,
                                 clock=ticks, wall=wall)["fn"]  # fmt: skip
    assert out.timer.startswith("ticks x10,") and out.samples >= 5
    assert out.median_ms == pytest.approx(3.0, abs=1.0)  # 10 calls read on a 10 ms tick


def test_paired_ratio_follows_the_rounds_not_the_drift(bench):
    """Two providers timed in the same rounds while the machine slows down 3x from round 4 on, the second
    one's fourth sample still fast: the medians' ratio lands on different sides of the slowdown (0.4 instead
    of 1.2), the median of the per-round ratios does not; a round whose reference read 0 (a ticking clock) is
    left out."""
    c = common(bench)
    base = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    assert c.paired_ratio([1.2 * v for v in base], base) == pytest.approx(1.2)
    lora = [1.2, 1.2, 1.2, 1.2, 3.6, 3.6, 3.6]
    assert c.paired_ratio(lora, base) == pytest.approx(1.2)
    assert statistics.median(lora) / statistics.median(base) == pytest.approx(0.4)
    assert c.paired_ratio([1.0, 2.0], [0.0, 1.0]) == 2.0 and c.paired_ratio([1.0], [0.0]) is None


def test_interleaving_keeps_ratios_right_under_load(bench):
    """A burst of load (another process takes the core for a while): interleaved, both providers see it
    in a few samples and the medians hold; timed one after the other, the burst lands on one provider and
    the ratio comes out 10x wrong."""
    c = common(bench)
    clock = FakeClock()
    fns = {"base": (lambda: clock.work(1.0), ()), "lora": (lambda: clock.work(1.2), ())}
    kw = dict(budget_s=0.05, min_samples=10, clock=clock, wall=clock)
    clock.slow, clock.factor = (0.01, 0.04), 10.0
    out = c.time_cpu_interleaved(fns, **kw)
    assert out["lora"].median_ms / out["base"].median_ms == pytest.approx(1.2, rel=1e-6)
    assert any(max(t.raw) >= 5 * t.median_ms for t in out.values())  # the burst hit some samples
    clock.t, clock.slow = 0.0, (float("inf"), float("inf"))
    base = c.time_cpu_interleaved({"base": fns["base"]}, **kw)["base"]
    clock.slow = (clock.t, clock.t + 0.2)  # the burst arrives after base was timed
    lora = c.time_cpu_interleaved({"lora": fns["lora"]}, **kw)["lora"]
    assert lora.median_ms / base.median_ms == pytest.approx(12.0)


def test_time_cpu_interleaved_reports_a_failing_function(bench):
    c = common(bench)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("kernel exploded")

    out = c.time_cpu_interleaved({"ok": (lambda: None, ()), "bad": (flaky, ())}, budget_s=0.002, min_samples=3)
    assert isinstance(out["bad"], RuntimeError) and isinstance(out["ok"], c.Timing) and out["ok"].samples >= 3
    with pytest.raises(ValueError, match="budget_s"):
        c.time_cpu_interleaved({"ok": (lambda: None, ())}, budget_s=0)


def test_cpu_threads_default_to_one(bench):
    c = common(bench)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert "1 thread" in c.set_cpu_threads(None) and torch.get_num_threads() == 1
        assert c.cpu_clock() is time.process_time  # one thread: CPU time, descheduled time left out
        torch.set_num_threads(2)
        assert "2 threads" in c.set_cpu_threads(0) and torch.get_num_threads() == 2
        assert c.cpu_clock() is time.perf_counter
        assert "--threads 3" in c.set_cpu_threads(3) and torch.get_num_threads() == 3
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="threads"):
                c.set_cpu_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_merge_refuses_mixed_timers(bench):
    c = common(bench)
    a = c.Timing(1, 1, 1, 1, "cuda graph", [1.0], graphed=True)
    b = c.Timing(2, 2, 2, 1, "cuda events", [2.0])
    with pytest.raises(c.MixedTimers):
        c.merge([a, b])
    assert c.merge([a, a]).graphed


def test_l2_flush_buffer_is_cuda_only(bench):
    assert common(bench).l2_flush_buffer(torch.device("cpu")) is None
