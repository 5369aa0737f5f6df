"""benchmarks/bench_unet_layers.py on the reduced UNet config (standing in for SD 2.1's): every MoR layer timed
three ways on the input it sees in the model, the timed calls computing the layer's output, the totals and the
cost model's picks consistent (no timed assertions)."""

from __future__ import annotations

import importlib
import json
import math
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="bench_unet_layers needs diffusers (pip install diffusers)")


@pytest.fixture()
def tool(bench, monkeypatch):  # the bench fixture puts benchmarks/ on sys.path
    mod = importlib.import_module("bench_unet_layers")
    monkeypatch.setattr(mod.bench_pipeline, "UNET_SD21", mod.bench_pipeline.UNET_SMALL)
    return mod


def test_every_mor_layer_timed_three_ways_with_consistent_totals(tool, tmp_path):
    import mor_model
    from mor_kernels import dispatch

    argv = ["--latent", "8", "--repeats", "2", "--evict-mb", "0.5", "--release-memory", "--out", str(tmp_path)]
    result = tool.main(argv)
    rows, summary = result["rows"], result["summary"]
    unet, _, layers = tool.model_and_inputs(tool.parse_args(argv), torch.device("cpu"))
    assert len(rows) == len(layers) == len(mor_model.mor_layers(unet)) > 0
    assert {r["kind"] for r in rows} == {"linear", "conv", "conv1x1"}
    for r in rows:
        assert all(math.isfinite(r[f"{p}_ms"]) and r[f"{p}_ms"] > 0 for p in tool.PATHS), r
        assert r["lowrank_over_base"] == pytest.approx(r["lowrank_ms"] / r["base_ms"])
        assert r["auto_path"] in ("merged", "lowrank")
    base = sum(r["base_ms"] for r in rows)
    assert summary["base_ms"] == pytest.approx(base)
    best = sum(min(r["lowrank_ms"], r["merged_ms"]) for r in rows)
    assert summary["best per layer_ms"] == pytest.approx(best)
    assert best <= min(summary["lowrank_ms"], summary["merged_ms"], summary["cost model_ms"]) + 1e-9
    assert summary["cost model_over_base"] == pytest.approx(summary["cost model_ms"] / base)
    # the cost model's pick is merge_plan's, from the layer's tokens and weight
    big = max(rows, key=lambda r: r["rho"])
    limit = dispatch.MERGE_CROSSOVER.get(("cpu", big["kind"]))
    assert big["auto_path"] == ("merged" if limit is not None and big["rho"] > limit else "lowrank")
    saved = json.loads(open(result["paths"]["json"]).read())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["summary"]["base_ms"] == pytest.approx(base)


def test_the_timed_calls_compute_the_layers_output(tool):
    """What is timed is the layer: the low-rank and the merged call both give the layer's own forward (MOR_SPEC 7
    tolerances), the base call the bare layer."""
    from mor_kernels.testing import TOLERANCES

    args = tool.parse_args(["--latent", "8"])
    _, scores, layers = tool.model_and_inputs(args, torch.device("cpu"))
    atol, rtol = TOLERANCES[torch.float32]
    with torch.no_grad():
        for name, (layer, x) in list(layers.items())[::7]:
            fns, *_ = tool.layer_calls(layer, x, scores, "auto")
            import mor_model

            with mor_model.degradation(layer, scores):
                want = layer(x)
            torch.testing.assert_close(fns["lowrank"](), want, atol=atol, rtol=rtol, msg=name)
            torch.testing.assert_close(fns["merged"](), want, atol=atol, rtol=rtol, msg=name)
            torch.testing.assert_close(fns["base"](), layer.base_layer(x), atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("argv", [["--latent", "12"], ["--latent", "0"], ["--repeats", "0"], ["--evict-mb", "-1"]])
def test_bad_arguments_exit_with_a_message(tool, argv):
    with pytest.raises(SystemExit, match="must be"):
        tool.parse_args(argv)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_the_tool_keeps_freed_memory_through_the_library(bench, monkeypatch):
    """The per-layer tool's allocator setting is ``mor_model.cpu_memory.keep_freed_memory`` (tested in
    tests/model/test_cpu_memory.py), what the CLI sets on CPU runs."""
    import mor_model.cpu_memory

    monkeypatch.setattr(mor_model.cpu_memory, "keep_freed_memory", lambda: "set")
    assert importlib.import_module("bench_unet_layers").keep_freed_memory() == "set"
