"""benchmarks/bench_mor_lora.py: a tiny sweep runs and writes valid CSV/JSON with every field (no timed
assertions), routing construction, flags, and failing/missing providers reported instead of crashing."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mor_kernels import dispatch

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
TINY = [
    "--device",
    "cpu",
    "--token-scale",
    "0.25",
    "--budget",
    "0.004",
    "--rounds",
    "1",
    "--batch",
    "2",
    "--threads",
    "1",
]
META_KEYS = ("device", "device_name", "torch", "triton", "cuda", "git_commit", "time_utc", "torch_threads", "copy_GBps")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = TINY + [
        "--shapes",
        "lin64x1280,conv1x1-8x8x1280",
        "--sweep",
        "zero",
        "--sweep-shape",
        "lin64x1280",
        "--out",
        str(out),
        "--plot",
    ]
    return bench.main(argv), out


def test_tiny_sweep_writes_valid_csv_and_json(bench, tiny_run):
    result, out = tiny_run
    rows, meta = result["rows"], result["meta"]
    # 2 shapes x 2 modes + zero sweep (k=8: 0, 2, 4, 6, 8 zero slots) x fwd, every provider listed
    cases = {r["case"] for r in rows}
    assert len(cases) == 2 * 2 + 5
    assert len(rows) == len(cases) * len(bench.PROVIDERS)
    for key in META_KEYS:
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["token_scale"] == 0.25
    with open(result["paths"]["json"]) as f:
        data = json.load(f)
    assert data["fields"] == list(bench.FIELDS) and len(data["rows"]) == len(rows)
    assert {k: data["meta"][k] for k in META_KEYS} == {k: meta[k] for k in META_KEYS}
    with open(result["paths"]["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert set(bench.FIELDS) | set(META_KEYS) <= set(table[0])
    for r in table:  # metadata repeated in every CSV row
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["dtype"] == "fp32"
    for r in data["rows"]:
        assert r["status"] in ("ok", "unavailable", "error"), r
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        for key in ("median_ms", "p20_ms", "p80_ms", "ratio_to_base", "useful_gflop", "executed_gflop",
                    "min_mb", "achieved_gbps", "copy_fraction", "useful_tflops"):  # fmt: skip
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["useful_gflop"] <= r["executed_gflop"] + 1e-12
        assert r["samples"] >= 2 and r["timer"]
    base = [r for r in data["rows"] if r["provider"] == "base"]
    assert base and all(r["status"] == "ok" and r["ratio_to_base"] == 1.0 for r in base)
    ref = [r for r in data["rows"] if r["provider"] == "mor:reference"]
    assert ref and all(r["status"] == "ok" for r in ref)
    if "png" in result["paths"] and result["paths"]["png"]:
        assert os.path.getsize(result["paths"]["png"]) > 0


def test_rows_carry_routing_and_flops(bench, tiny_run):
    rows = tiny_run[0]["rows"]
    sweep = [r for r in rows if r["sweep"] == "zero" and r["provider"] == "mor:reference"]
    assert [r["zero_picked"] for r in sweep] == [0, 2, 4, 6, 8]
    assert [r["active_ranks"] for r in sweep] == [16, 14, 12, 10, 8]  # S + k - zero slots picked
    assert [r["lora_rank"] for r in sweep] == [16, 14, 12, 10, 8]
    # the reference gathers each sample's active ranks: executed work falls with them, equal to the useful
    # work (every rank picked once, one sample)
    useful = [r["useful_gflop"] for r in sweep]
    assert useful == sorted(useful, reverse=True) and useful[0] > useful[-1]
    assert [r["executed_gflop"] for r in sweep] == pytest.approx(useful)
    # mor:auto: per-sample merged weights where the cost model says so (lin64x1280 has 16 tokens: low-rank
    # in the forward, and never merged with a gradient), so it executes what the reference does
    auto = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "mor:auto"}
    for r in rows:
        if r["provider"] == "mor:reference" and r["kind"] == "linear":
            assert auto[(r["case"], r["mode"])]["executed_gflop"] == pytest.approx(r["executed_gflop"])
    lora = [r for r in rows if r["sweep"] == "zero" and r["provider"] == "lora"]
    assert [r["useful_gflop"] for r in lora] == pytest.approx(useful)


def test_merged_provider_times_the_forced_merge_forward_only(bench, tiny_run):
    """mor:merged runs every sample-routed forward with per-sample merged weights (the merge's GEMM counted:
    more executed work than mor:auto's low-rank path at lin64x1280's 16 tokens) and says why it skips fwd+bwd."""
    rows = tiny_run[0]["rows"]
    merged = [r for r in rows if r["provider"] == "mor:merged"]
    assert merged
    auto = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "mor:auto"}
    for r in merged:
        if r["mode"] == "fwd+bwd":
            assert r["status"] == "unavailable" and "inference" in r["reason"]
            continue
        assert r["status"] == "ok", r
        if r["layer"] == "lin64x1280" and r["sweep"] == "main":
            assert r["executed_gflop"] > auto[(r["case"], r["mode"])]["executed_gflop"]


def test_unavailable_providers_say_why(bench, tiny_run):
    rows = tiny_run[0]["rows"]
    cpu = torch.device("cpu")
    seen = 0
    for r in rows:
        if r["provider"] == "mor:cuda":  # never runs on CPU tensors; the reason comes from dispatch
            op = "mor_linear" if r["kind"] == "linear" else "mor_conv2d"
            assert r["status"] == "unavailable"
            assert r["reason"] == dispatch.unavailable_reason("cuda", op, cpu, torch.float32)
            seen += 1
        if r["provider"] == "mor:triton":  # not named in --providers: never timed on CPU
            assert r["status"] == "unavailable" and r["reason"]
    assert seen == len({r["case"] for r in rows})


def test_routing_construction(bench, bench_cases):
    s = dataclasses.replace(bench.SHAPES["lin64x1280"], tokens=7)
    gen = torch.Generator().manual_seed(0)
    for routing, lead in (("sample", (3,)), ("token", (3, 7))):
        case = bench.Case(s, 3, 8, 32, 4, 8, 3, routing, "fwd", "fp32")
        idx, gate = bench_cases.make_routing(case, "cpu", gen)
        assert idx.dtype == torch.int32 and idx.shape == (*lead, 8) and gate.shape == (*lead, 8)
        assert ((idx == -1).sum(-1) == 3).all()
        assert ((idx >= -1) & (idx < 32)).all()
        real = idx.reshape(-1, 8)
        for row in real:
            picked = row[row >= 0].tolist()
            assert len(picked) == len(set(picked)) == 5
        torch.testing.assert_close(gate.sum(-1), torch.ones(lead))


def test_build_cases_flags(bench):
    args = bench.parse_args(["--device", "cpu", "--shapes", "conv", "--routing", "sample,token", "--sweep", "ranks,k"])
    cases = bench.build_cases(args)
    main = [c for c in cases if c.sweep == "main"]
    assert main and all(c.shape.kind == "conv2d" and c.routing == "sample" for c in main)  # no token-routed conv
    assert {c.num_shared + c.num_routed for c in cases if c.sweep == "ranks"} == {20, 40, 72, 80}
    assert {c.top_k for c in cases if c.sweep == "k"} == {2, 4, 8, 16}
    full = bench.parse_args(["--device", "cpu", "--full"])
    assert full.token_scale == 1.0 and full.dtypes == ["fp32", "fp16", "bf16"] and full.batch == [1, 2, 8]
    for bad in (["--dtypes", "fp8"], ["--shapes", "nope"], ["--providers", "mor:nope"], ["--zero-picked", "9"]):
        with pytest.raises(SystemExit):
            bench.build_cases(bench.parse_args(["--device", "cpu", *bad]))


def test_failing_provider_is_reported_not_fatal(bench, monkeypatch, tmp_path):
    real = bench.provider_fn

    def broken(case, provider, t):
        if provider == "mor:reference":
            raise RuntimeError("kernel exploded")
        return real(case, provider, t)

    monkeypatch.setattr(bench, "provider_fn", broken)
    result = bench.main(TINY + ["--shapes", "lin64x1280", "--modes", "fwd", "--sweep", "none", "--out", str(tmp_path)])
    by = {r["provider"]: r for r in result["rows"]}
    assert by["mor:reference"]["status"] == "error" and "kernel exploded" in by["mor:reference"]["reason"]
    assert by["base"]["status"] == "ok" and by["lora"]["status"] == "ok"


def test_script_runs_as_a_command(tmp_path):
    cmd = [sys.executable, os.path.join(BENCH_DIR, "bench_mor_lora.py"), *TINY, "--shapes", "lin64x1280"]
    cmd += ["--modes", "fwd", "--sweep", "none", "--providers", "base,lora,mor:reference", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "REDUCED SIZES" in proc.stdout and "mor:ref" in proc.stdout
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json"]


def test_zero_sweep_is_labelled_with_its_own_z(bench, tiny_run, capsys):
    """The zero sweep raises Z to k (every zero-slot count up to k reachable): its heading, its rows and
    its case labels say Z=8, not the header's Z=4."""
    result, _ = tiny_run
    rows, meta = result["rows"], result["meta"]
    sweep = [r for r in rows if r["sweep"] == "zero"]
    assert meta["zero"] == 4 and {r["num_zero"] for r in sweep} == {8}
    assert all(" Z8 " in r["case"] for r in sweep) and all(" Z4 " in r["case"] for r in rows if r["sweep"] == "main")
    bench.print_table(rows, list(bench.PROVIDERS), meta)
    heading = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("-- zero sweep")]
    assert len(heading) == 1 and "Z=8" in heading[0] and "not the header's Z=4" in heading[0]


def test_cpu_default_is_one_thread_and_says_so(bench, tmp_path, capsys):
    i = TINY.index("--threads")
    argv = TINY[:i] + TINY[i + 2 :] + ["--shapes", "lin64x1280", "--modes", "fwd"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = bench.main(argv + ["--sweep", "none", "--providers", "base,lora", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 2  # restored for the caller
    finally:
        torch.set_num_threads(before)
    meta = result["meta"]
    assert meta["torch_threads"] == 1 and meta["threads_note"].startswith("1 thread (CPU default")
    out = capsys.readouterr().out
    assert "1 thread (CPU default" in out and "timer: process CPU time (1 thread)" in out
    assert all(r["timer"].startswith("cpu process time") for r in result["rows"] if r["status"] == "ok")


def test_faster_than_base_is_flagged_unreliable(bench, monkeypatch, tmp_path, capsys):
    """A provider that does strictly more work than base cannot beat it: a timing that says so is flagged
    in the row, the CSV and the table (the 0.05x dense LoRA seen on a loaded 2-core machine)."""
    common = bench.common
    fake_ms = {
        "base": 10.0,
        "lora": 0.5,
        "mor:auto": 10.5,
        "mor:merged": 11.0,
        "mor:reference": 9.5,
        "mor:cpp": 12.0,
        "mor:blas": 10.2,
    }

    def fake_timer(fns, **_):
        ms = {p: fake_ms.get(p, 1.0) for p in fns}  # "fn": the copy ceiling
        return {p: common.Timing(v, v, v, 10, "fake", [v]) for p, v in ms.items()}

    monkeypatch.setattr(common, "time_cpu_interleaved", fake_timer)
    argv = TINY + ["--shapes", "lin64x1280", "--modes", "fwd", "--sweep", "none", "--out", str(tmp_path)]
    result = bench.main(argv)
    by = {r["provider"]: r for r in result["rows"]}
    assert by["lora"]["ratio_to_base"] == pytest.approx(0.05) and by["lora"]["timing_flag"].startswith("unreliable")
    assert by["mor:reference"]["timing_flag"] == ""  # 0.95x: within the floor
    assert by["base"]["timing_flag"] == ""
    if "cpp" in bench.mor_kernels.available_backends("cpu", "mor_linear"):
        assert by["mor:cpp"]["timing_flag"] == ""
    else:  # no compiled extension in the mor_kernels pytest imported (say, the source tree after `pip install .`)
        assert by["mor:cpp"]["status"] == "unavailable" and "extension" in by["mor:cpp"]["reason"]
    with open(result["paths"]["csv"], newline="") as f:
        table = {r["provider"]: r for r in csv.DictReader(f)}
    assert table["lora"]["timing_flag"].startswith("unreliable") and table["base"]["timing_flag"] == ""
    out = capsys.readouterr().out
    assert "0.05x!" in out and "! unreliable (1 rows" in out
    assert bench.timing_flag("lora", 0.89) and not bench.timing_flag("lora", 0.9) and not bench.timing_flag("base", 0.5)


def test_cpu_ratios_pair_the_samples_of_a_round(bench, monkeypatch, tmp_path, capsys):
    """On a CPU each row carries the median over the interleaved rounds of its sample over base's (and the dense
    LoRA's) sample of the same round. Here the machine runs 3x slower in some rounds, and base's median sample
    falls in a slow one while the others' fall in fast ones: the ratio of the medians is off by 3x, the paired
    ratio is the per-call ratio. The table shows the paired one and the run ends with the targets."""
    common = bench.common
    per_call = {"base": 10.0, "lora": 11.0, "mor:auto": 10.3, "mor:merged": 10.2, "mor:reference": 12.0}
    slow = {"base": [1.0] * 3 + [3.0] * 8}  # base: slow from round 3; the others from round 6

    def fake_timer(fns, **_):
        out = {}
        for p in fns:
            raw = [per_call.get(p, 1.0) * d for d in slow.get(p, [1.0] * 6 + [3.0] * 5)]
            med = sorted(raw)[len(raw) // 2]
            out[p] = common.Timing(med, min(raw), max(raw), len(raw), "fake", raw)
        return out

    monkeypatch.setattr(common, "time_cpu_interleaved", fake_timer)
    argv = TINY + ["--shapes", "lin64x1280", "--modes", "fwd", "--sweep", "none", "--out", str(tmp_path),
                   "--providers", "base,lora,mor:auto,mor:reference"]  # fmt: skip
    rows = {r["provider"]: r for r in bench.main(argv)["rows"]}
    assert rows["lora"]["ratio_to_base"] == pytest.approx(11.0 / 30.0)  # base's median from a slow round
    assert rows["lora"]["paired_to_base"] == pytest.approx(1.1)  # 8 of the 11 rounds pair like with like
    assert rows["mor:auto"]["paired_to_base"] == pytest.approx(1.03)
    assert rows["mor:auto"]["paired_to_lora"] == pytest.approx(10.3 / 11.0)
    assert rows["mor:reference"]["paired_to_base"] == pytest.approx(1.2)
    assert rows["base"]["paired_to_base"] == pytest.approx(1.0) and rows["lora"]["paired_to_lora"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("lin64x1280"))
    assert "1.03x" in line and "1.20x" in line
    assert "targets on this CPU" in out and "MET    fwd: mor:auto <= 1.03x the dense LoRA" in out


def _target_row(layer, provider, mode="fwd", sweep="main", **ratios):
    row = dict(layer=layer, provider=provider, mode=mode, sweep=sweep, status="ok", routing="sample", batch=1,
               dtype="fp32", zero_picked=0, top_k=8, lora_rank=16)  # fmt: skip
    row.update(ratios)
    return row


def test_cpu_targets_judge_each_target_on_its_worst_row(bench):
    report = importlib.import_module("bench_mor_lora_report")  # on the path once ``bench`` is imported
    rows = [
        _target_row("lin4096x320", "mor:auto", paired_to_base=1.04, paired_to_lora=0.80),
        _target_row("lin64x1280", "mor:auto", paired_to_base=1.10, paired_to_lora=1.031),  # over 1.03
        _target_row("conv1x1-64x64x320", "mor:auto", paired_to_base=1.06, paired_to_lora=0.9),  # over 1.05
        _target_row("lin64x1280", "mor:auto", mode="fwd+bwd", paired_to_base=1.2, paired_to_lora=1.09),
        _target_row("lin64x1280", "mor:reference", paired_to_base=2.0, paired_to_lora=1.9),  # not judged
        _target_row("lin64x1280", "mor:auto", routing="token", paired_to_lora=5.0),  # not judged
    ]
    for z, ratio in ((0, 1.06), (4, 1.07), (8, 1.03)):  # rises on the way, falls overall
        rows.append(_target_row("lin1024x640", "mor:auto", sweep="zero", zero_picked=z, lora_rank=16 - z,
                                paired_to_base=ratio, paired_to_lora=0.99 if z == 8 else 0.95))  # fmt: skip
    verdicts = {text.split(":")[0] + (" base" if "bare" in text else ""): (v, m) for text, v, m in
                report.cpu_targets(rows)}  # fmt: skip
    assert verdicts["fwd"][0] == "missed" and "1.031x at lin64x1280" in verdicts["fwd"][1]
    assert verdicts["fwd+bwd"][0] == "met"
    assert verdicts["fwd base"][0] == "missed" and "conv1x1-64x64x320 b1 fp32 1.060x" in verdicts["fwd base"][1]
    assert verdicts["zero sweep"][0] == "met" and "0.990x the rank-8 LoRA" in verdicts["zero sweep"][1]
    rows[-1]["paired_to_lora"] = 1.01  # 8 zero slots slower than the rank-8 LoRA
    assert dict((t.split(":")[0], v) for t, v, _ in report.cpu_targets(rows))["zero sweep"] == "missed"
    rows[-1]["paired_to_base"] = 1.07  # no lower than with 0 zero slots
    rows[-1]["paired_to_lora"] = 0.9
    assert dict((t.split(":")[0], v) for t, v, _ in report.cpu_targets(rows))["zero sweep"] == "missed"
    assert report.cpu_targets([r for r in rows if r["provider"] == "mor:reference"]) == []  # nothing to judge
