"""benchmarks/bench_pipeline.py on a tiny CPU run: the real MoRSRPipeline call with every variant, the CSV/JSON
rows complete, the L2-flush buffer allocated before anything is measured, and the CUDA peak-memory
bookkeeping on a fake allocator (no timed assertions)."""

from __future__ import annotations

import csv
import importlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers", reason="bench_pipeline needs diffusers (pip install diffusers)")
pytest.importorskip("open_clip", reason="the degradation estimator needs open_clip (pip install open_clip_torch)")

TINY = [
    "--device",
    "cpu",
    "--reduced",
    "--resolution",
    "64",
    "--budget",
    "0.01",
    "--min-samples",
    "2",
    "--clip",
    "tiny",
    "--sd21-latent",
    "0",
]


def pipeline_module(bench):  # the bench fixture puts benchmarks/ on sys.path
    return importlib.import_module("bench_pipeline")


@pytest.fixture(scope="module")
def tiny_result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    argv = TINY + ["--variants", "lora,mor:reference,folded,estimator", "--out", str(out)]
    return pipeline_module(bench).main(argv)


def test_tiny_pipeline_run(bench, tiny_result):
    pipeline = pipeline_module(bench)
    result = tiny_result
    rows = {(r["variant"], r["part"]): r for r in result["rows"]}
    for variant in ("none", "lora-r4", "mor:reference", "mor-folded:reference"):
        for part in ("unet", "pipeline"):
            r = rows[(variant, part)]
            assert r["status"] == "ok", r
            assert math.isfinite(r["median_ms"]) and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["ratio_to_none"] > 0
    assert rows[("none", "unet")]["ratio_to_none"] == 1.0
    assert rows[("estimator", "estimator")]["status"] == "ok" and rows[("estimator", "estimator")]["dtype"] == "fp32"
    # the MoR pipeline rows include the estimator (and its weights); none and dense LoRA need none
    assert "estimator" in rows[("mor:reference", "pipeline")]["note"]
    assert "estimator" not in rows[("lora-r4", "pipeline")]["note"]
    est_mb = rows[("estimator", "estimator")]["weights_mb"]
    mor, none = rows[("mor:reference", "pipeline")]["weights_mb"], rows[("none", "pipeline")]["weights_mb"]
    assert mor > none + est_mb
    for variant in ("lora-r4", "mor:reference", "mor-folded:reference"):  # the VAE-encoder adapter is in the pipeline
        assert "VAE: " in rows[(variant, "pipeline")]["note"] and "VAE" not in rows[(variant, "unet")]["note"]
    assert "fold_shared_ranks" in rows[("mor-folded:reference", "pipeline")]["note"]
    assert result["meta"]["torch_threads"] == 1  # the CPU default
    with open(result["paths"]["json"]) as f:
        data = json.load(f)
    assert data["fields"] == list(pipeline.FIELDS) and data["meta"]["device"] == "cpu"
    with open(result["paths"]["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result["rows"]) and {"torch", "git_commit", "device_name"} <= set(table[0])


def test_variants_are_the_real_pipeline_models(bench):
    """MoR variants carry the VAE-encoder adapter; the folded one is what fold_shared_ranks makes (no shared
    ranks left, base weights changed), not a num_shared=0 imitation; all cast to the run's dtype."""
    import mor_model

    pipeline = pipeline_module(bench)
    args = pipeline.parse_args(TINY + ["--variants", "mor:reference,folded"])
    unet, vae, _ = pipeline.build(args, torch.device("cpu"))
    models, _ = pipeline.variants(args, unet, vae, torch.device("cpu"), torch.bfloat16)
    u, v, _ = models["mor:reference"]
    fu, fv, _ = models["mor-folded:reference"]
    layers, folded = mor_model.mor_layers(u), mor_model.mor_layers(fu)
    assert layers and mor_model.mor_layers(v) and mor_model.mor_layers(fv)
    assert all(m.num_shared == 8 for m in layers.values()) and all(m.num_shared == 0 for m in folded.values())
    assert all(m.folded_shared_ranks == 8 for m in folded.values())
    name = next(iter(layers))
    assert folded[name].lora_a.shape[0] == 32 and layers[name].lora_a.shape[0] == 40
    assert not torch.equal(folded[name].base_layer.weight, layers[name].base_layer.weight)
    assert all(m.num_shared == 0 and m.folded_shared_ranks == 3 for m in mor_model.mor_layers(fv).values())
    assert all(p.dtype == torch.bfloat16 for m in (u, v, fu, fv) for p in m.parameters())
    assert not mor_model.mor_layers(models["none"][0]) and not mor_model.mor_layers(models["none"][1])


def test_l2_flush_buffer_comes_before_any_measurement(bench, monkeypatch, tmp_path):
    pipeline = pipeline_module(bench)
    common = pipeline.common
    order = []
    real_flush, real_jobs = common.l2_flush_buffer, pipeline.time_jobs
    monkeypatch.setattr(common, "l2_flush_buffer", lambda d: order.append("flush") or real_flush(d))
    monkeypatch.setattr(pipeline, "time_jobs", lambda *a, **k: order.append("time") or real_jobs(*a, **k))
    pipeline.main(TINY + ["--variants", "estimator", "--out", str(tmp_path)])
    assert order[0] == "flush" and order.count("time") == 3  # pipeline, unet and estimator parts


def test_cuda_peak_memory_bookkeeping(bench, monkeypatch):
    """The CUDA branch of time_jobs with a fake allocator: the peak a call adds over what was allocated
    before it, per job, the largest over rounds; a failing job is reported, not fatal."""
    pipeline = pipeline_module(bench)
    common = pipeline.common
    mem = {"now": 1000.0, "peak": 1000.0}
    adds = {"a": 3e6, "b": 7e6}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: mem["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: mem["peak"])

    def fake_time_fn(fn, device, **_):
        name = fn()
        mem["peak"] = max(mem["peak"], mem["now"] + adds[name])
        return common.Timing(1.0, 1.0, 1.0, 1, "cuda events", [1.0])

    def boom():
        raise RuntimeError("out of memory")

    monkeypatch.setattr(common, "time_fn", fake_time_fn)
    jobs = {"a": lambda: "a", "b": lambda: "b", "c": boom}
    timings, peak = pipeline.time_jobs(jobs, torch.device("cuda"), SimpleNamespace(rounds=2, budget=0.1))
    assert peak == {"a": pytest.approx(3.0), "b": pytest.approx(7.0)}
    assert timings["a"].samples == 2 and isinstance(timings["c"], RuntimeError)


def test_cuda_graph_part_times_the_default_folded_and_floor_variants(bench):
    pipeline = pipeline_module(bench)
    names = ["none", "lora-r4", "mor:auto", "mor:reference", "mor:triton", "mor:cuda", "mor-folded:triton"]
    jobs = {n: (lambda n=n: n) for n in names}
    got = pipeline.graphed_jobs(jobs)
    assert list(got) == ["none", "lora-r4", "mor:auto", "mor-folded:triton"]
    assert all(got[n] is jobs[n] for n in got)


def test_cuda_graph_part_rejects_eager_fallbacks(bench, monkeypatch):
    """time_jobs with use_graph: graph timings pass through, and a job whose capture failed (time_cuda then times
    it eagerly) becomes an error naming the failure instead of an eager time in a graph row."""
    pipeline = pipeline_module(bench)
    common = pipeline.common
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: 0)
    asked = []

    def fake_time_fn(fn, device, use_graph=False, **_):
        asked.append(use_graph)
        if fn() == "syncs":
            return common.Timing(2.0, 2.0, 2.0, 2, "cuda events (graph capture failed: RuntimeError)", [2.0, 2.0])
        return common.Timing(1.0, 1.0, 1.0, 2, "cuda graph of 3 calls", [1.0, 1.0], graphed=True)

    monkeypatch.setattr(common, "time_fn", fake_time_fn)
    jobs = {"a": lambda: "a", "b": lambda: "syncs"}
    args = SimpleNamespace(rounds=1, budget=0.1)
    timings, _ = pipeline.time_jobs(jobs, torch.device("cuda"), args, use_graph=True)
    assert timings["a"].graphed and asked == [True, True]
    assert isinstance(timings["b"], RuntimeError) and "graph capture failed: RuntimeError" in str(timings["b"])
    timings, _ = pipeline.time_jobs(jobs, torch.device("cuda"), args)  # eager part: the fallback is the timing
    assert timings["b"].median_ms == 2.0 and asked[2:] == [False, False]


def test_rows_are_written_after_every_part(bench, monkeypatch, tmp_path):
    """A run stopped partway (gpu_check's time cap kills it) leaves the rows of the parts it finished: the JSON
    is rewritten after each part."""
    import glob
    import json

    pipeline = pipeline_module(bench)
    real, calls = pipeline.time_jobs, []

    def stopped_at_the_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill at the cap: nothing after this runs
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "time_jobs", stopped_at_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(TINY + ["--variants", "mor:reference", "--out", str(tmp_path)])
    (path,) = glob.glob(str(tmp_path / "bench_pipeline-*.json"))
    with open(path) as f:
        rows = json.load(f)["rows"]
    timed = [r for r in rows if r["status"] != "unavailable"]  # (plus a row per backend that cannot run here)
    assert {r["part"] for r in timed} == {"pipeline"} and {r["variant"] for r in timed} == {"none", "mor:reference"}
    assert all(r["status"] == "ok" and r["ratio_to_none"] > 0 for r in timed)


def test_lora_wrapper_matches_base_plus_low_rank(bench):
    from torch import nn

    pipeline = pipeline_module(bench)
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


def test_sd21_unet_part_times_every_variant_per_image(bench, monkeypatch, tmp_path):
    """The unet-sd21 part (here on the reduced UNet config standing in for SD 2.1's): every variant timed with
    its ratio to none, each MoR call setting the scores (one image per call), the latent in the rows."""
    import mor_model

    pipeline = pipeline_module(bench)
    monkeypatch.setattr(pipeline, "UNET_SD21", pipeline.UNET_SMALL)
    calls = []
    real = mor_model.set_degradation
    monkeypatch.setattr(mor_model, "set_degradation", lambda m, s: calls.append(s is not None) or real(m, s))
    argv = TINY[:-1] + ["8", "--variants", "lora,mor,folded", "--out", str(tmp_path)]
    rows = [r for r in pipeline.main(argv)["rows"] if r.get("part") == "unet-sd21"]
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"none", "lora-r4", "mor:auto", "mor-lowrank:auto", "mor-folded:auto"}
    for r in rows:
        assert r["status"] == "ok" and r["latent"] == 8 and r["resolution"] == 64 and r["samples"] >= 2
        assert math.isfinite(r["ratio_to_none"]) and r["ratio_to_none"] > 0
    assert by["none"]["ratio_to_none"] == 1.0 and "merge='never'" in by["mor-lowrank:auto"]["note"]
    assert by["none"]["paired_ratio"] == 1.0  # every round's none over itself
    assert all(math.isfinite(r["paired_ratio"]) and r["paired_ratio"] > 0 for r in rows)
    assert calls.count(True) >= 3 * 2  # the three MoR variants, at least two timed samples each
