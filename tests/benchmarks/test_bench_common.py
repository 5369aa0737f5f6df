"""benchmarks/bench_common.py: percentiles, merged rounds, gradients cleared between calls, metadata and
the CSV/JSON writer (no timed assertions)."""

from __future__ import annotations

import csv
import importlib
import json

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
