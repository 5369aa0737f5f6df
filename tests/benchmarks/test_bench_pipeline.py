"""benchmarks/bench_pipeline.py on a tiny CPU run: every variant runs and the CSV/JSON rows are complete
(no timed assertions)."""

from __future__ import annotations

import csv
import importlib
import json
import math

import pytest

pytest.importorskip("diffusers", reason="bench_pipeline needs diffusers (pip install diffusers)")


def test_tiny_pipeline_run(bench, tmp_path):  # the bench fixture puts benchmarks/ on sys.path
    pipeline = importlib.import_module("bench_pipeline")
    argv = ["--device", "cpu", "--reduced", "--resolution", "64", "--budget", "0.01", "--rounds", "1"]
    argv += ["--threads", "1", "--variants", "lora,mor:reference,folded", "--out", str(tmp_path)]
    result = pipeline.main(argv)
    rows = {(r["variant"], r["part"]): r for r in result["rows"]}
    for variant in ("none", "lora-r4", "mor:reference", "mor-folded:reference"):
        for part in ("unet", "pipeline"):
            r = rows[(variant, part)]
            assert r["status"] == "ok", r
            assert math.isfinite(r["median_ms"]) and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["ratio_to_none"] > 0
    assert rows[("none", "unet")]["ratio_to_none"] == 1.0
    assert "layers" in rows[("lora-r4", "unet")]["note"] and "layers" in rows[("mor:reference", "unet")]["note"]
    with open(result["paths"]["json"]) as f:
        data = json.load(f)
    assert data["fields"] == list(pipeline.FIELDS) and data["meta"]["device"] == "cpu"
    with open(result["paths"]["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result["rows"]) and {"torch", "git_commit", "device_name"} <= set(table[0])


def test_lora_wrapper_matches_base_plus_low_rank(bench):
    import torch
    from torch import nn

    pipeline = importlib.import_module("bench_pipeline")
    torch.manual_seed(0)
    root = nn.Module()
    root.conv1 = nn.Conv2d(4, 6, 3, padding=1)
    root.to_q = nn.Linear(6, 6)
    root.norm = nn.GroupNorm(2, 6)
    assert pipeline.add_lora(root, 2) == 2  # conv1 and to_q match the OSEDiff targets; norm does not
    x = torch.randn(1, 4, 5, 5)
    m = root.conv1
    want = m.base(x) + m.lora_B(m.lora_A(x))
    torch.testing.assert_close(m(x), want)
    assert m.lora_A.weight.shape == (2, 4, 3, 3) and m.lora_B.weight.shape == (6, 2, 1, 1)
