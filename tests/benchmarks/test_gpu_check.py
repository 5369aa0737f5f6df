"""benchmarks/gpu_check.sh: the command line, the time caps, OUT_DIR's files, the JUnit and goal reports, the
kernel-table reader and the exit code. The whole ``--dry-run`` (every stage, ~4 minutes) runs in .ci/run; here
only the env stage runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import types

import pytest
from conftest import BENCH_DIR, _import

REPO = os.path.dirname(BENCH_DIR)
SCRIPT = os.path.join(BENCH_DIR, "gpu_check.sh")


@pytest.fixture(scope="module")
def gc():
    return _import("gpu_check")


@pytest.fixture(scope="module")
def rep():
    return _import("gpu_check_report")


def _sh(*args, **kw):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_help_says_how_to_run_it_on_a_gpu_in_one_call():
    proc = _sh("--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needed in ("--wheels .whl OUT_DIR", "--fetch-wheels", "pip download", "--python-version 3.12", "--no-deps",
                   "--dry-run", "benchmarks/results/<gpu>-<date>/", "Exit code", "diffusers==", "open_clip_torch=="):  # fmt: skip
        assert needed in text, needed


def test_refuses_a_non_empty_out_dir_and_bad_options(tmp_path):
    keep = tmp_path / "out" / "mine.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    proc = _sh(str(keep.parent))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert keep.read_text() == "precious"
    assert _sh("--stages", "parity,nope", str(tmp_path / "new")).returncode == 2
    assert _sh("--wheels", str(tmp_path / "missing"), str(tmp_path / "new")).returncode == 2
    assert _sh().returncode == 2  # OUT_DIR is required


def test_env_stage_end_to_end(tmp_path):
    """--dry-run --stages env: the env stage runs for real; every other stage says it was not selected."""
    out = tmp_path / "out"
    proc = _sh("--dry-run", "--stages", "env", "--work", str(tmp_path / "work"), str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["env.json", "logs.tar.gz", "stages.json", "summary.md"]
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and "packages" in env and env["cpu_count"] >= 1
    state = json.loads((out / "stages.json").read_text())
    by = {s["name"]: s for s in state["stages"]}
    assert by["env"]["status"] == "dry-run"
    assert all(by[n]["status"] == "skipped" and "not selected" in by[n]["summary"] for n in by if n != "env")
    assert state["info"]["exit_code"] == 0
    summary = (out / "summary.md").read_text()
    assert "CPU, not a GPU result" in summary and "not selected (--stages)" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/env.log" in tar.getnames()


def _runner(gc, tmp_path, **kw):
    args = types.SimpleNamespace(dry_run=True, out_dir=str(tmp_path / "out"), work=str(tmp_path / "work"), budget=60.0,
                                 stages=list(gc.STAGE_NAMES), wheels=None, no_build=False, **kw)  # fmt: skip
    os.makedirs(args.out_dir, exist_ok=True)
    return gc.Runner(args)


def test_a_command_past_its_cap_is_stopped_with_its_process_group(gc, tmp_path):
    run = _runner(gc, tmp_path)
    marker = tmp_path / "child-survived"
    code = f"import subprocess, sys, time; subprocess.Popen(['sleep 4; touch {marker}'], shell=True); time.sleep(60)"
    start = time.monotonic()
    res = run.sh([sys.executable, "-c", code], "slow.log", cap=1.5)
    assert res["timed_out"] and res["rc"] != 0
    assert time.monotonic() - start < 30
    time.sleep(4.5)
    assert not marker.exists(), "the child of the stopped command kept running"
    fast = run.sh([sys.executable, "-c", "print('hello')"], "fast.log", cap=60)
    assert fast["rc"] == 0 and not fast["timed_out"] and "hello" in run.tail("fast.log")


def test_caps_keep_time_for_later_stages(gc, tmp_path):
    run = _runner(gc, tmp_path)
    assert run.cap(10) == pytest.approx(10, abs=0.5)
    assert run.cap(100) <= 60
    assert run.cap(100, reserve=50) <= 10.5
    assert run.cap(100, reserve=500) == 0.0


def test_out_dir_holds_at_most_eight_files_each_under_the_limit(gc, tmp_path):
    assert len(gc.OUT_FILES) <= 8 and gc.MAX_FILE_BYTES < 16 * 10**6
    run = _runner(gc, tmp_path)
    run.write("kernels.csv", b"x" * (gc.MAX_FILE_BYTES + 1))
    assert b"over the" in (tmp_path / "out" / "kernels.csv").read_bytes()
    with pytest.raises(AssertionError):
        run.write("extra.txt", b"a ninth file")
    big = tmp_path / "work" / "logs" / "big.log"
    big.write_bytes(b"a" * (gc.MAX_LOG_BYTES + 1000) + b"THE END")
    run.record()
    assert sorted(os.listdir(tmp_path / "out")) == ["kernels.csv", "logs.tar.gz", "stages.json", "summary.md"]
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        data = tar.extractfile("logs/big.log").read()
    assert len(data) == gc.MAX_LOG_BYTES and data.endswith(b"THE END")  # the end of a long log is kept


@pytest.mark.parametrize(
    "statuses,code",
    [
        ({"parity": "failed", "bench": "error"}, 1),
        ({"sanitize": "failed"}, 1),
        ({"bench": "error"}, 3),
        ({"sanitize": "skipped"}, 0),
        ({}, 0),
    ],
)
def test_exit_code(gc, tmp_path, statuses, code):
    stages = _import("gpu_check_stages")
    run = _runner(gc, tmp_path)
    for stage in run.stages.values():
        stage.status = "passed"
    for name, status in statuses.items():
        run.stages[name].status = status
    assert stages.finish(run) == code
    assert ("FAILED" in run.info["verdict"]) == (code == 1)
    assert ("INCOMPLETE" in run.info["verdict"]) == (code == 3)


# ------------------------------------------------------------------------------------------------
# reports


def _row(provider, ms, layer="lin4096x320", batch=1, mode="fwd", kind="linear", sweep="main", **kw):
    return dict(provider=provider, median_ms=ms, layer=layer, batch=batch, mode=mode, kind=kind, sweep=sweep,
                status="ok", **kw)  # fmt: skip


def test_goals_met_missed_and_not_measured(rep):
    rows = [
        _row("base", 1.0, ratio_to_base=1.0),
        _row("mor:triton", 1.1, ratio_to_base=1.1),
        _row("mor:cuda", 1.3, ratio_to_base=1.3),
        _row("base", 1.0, batch=8, ratio_to_base=1.0),
        _row("mor:triton", 1.12, batch=8, ratio_to_base=1.12),
        _row("mor:triton", 1.0, kind="conv2d", layer="conv3x3", ratio_to_base=1.2),
        # fwd+bwd: paired with the reference by layer and batch (b1: 3x, b8: 1.5x)
        _row("mor:reference", 3.0, mode="fwd+bwd"),
        _row("mor:triton", 1.0, mode="fwd+bwd"),
        _row("mor:reference", 3.0, mode="fwd+bwd", batch=8),
        _row("mor:triton", 2.0, mode="fwd+bwd", batch=8),
    ]
    sweep = [(16, 0.010), (14, 0.0101), (12, 0.008), (8, 0.006)]  # one rise within the 5% noise allowance
    rows += [_row("mor:cuda", 1, sweep="zero", active_ranks=a, overhead_ms=o) for a, o in sweep]
    rows += [_row("mor:triton", 1, sweep="zero", active_ranks=a, overhead_ms=0.01) for a, _ in sweep]  # flat
    pipeline = [dict(part="unet", variant="none", status="ok", ratio_to_none=1.0, median_ms=20),
                dict(part="unet", variant="mor:triton", status="ok", ratio_to_none=1.04, median_ms=20.8),
                dict(part="unet", variant="mor-folded:triton", status="ok", ratio_to_none=1.2, median_ms=24)]  # fmt: skip
    got = {(g["key"], g["backend"]): g for g in rep.goals(rows, pipeline, "", "")}
    assert (
        got[("linear", "mor:triton")]["verdict"] == "met"
        and "1.10x - 1.12x over 2" in got[("linear", "mor:triton")]["measured"]
    )
    assert got[("linear", "mor:cuda")]["verdict"] == "missed"
    assert got[("conv", "mor:triton")]["verdict"] == "missed"
    fb = got[("fwd_bwd", "mor:triton")]
    assert fb["verdict"] == "missed" and fb["measured"].startswith("1.50x - 3.00x") and "b8" in fb["detail"]
    assert got[("unet", "mor:triton")]["verdict"] == "met" and got[("unet", "mor-folded:triton")]["verdict"] == "missed"
    assert ("unet", "none") not in got
    assert got[("ranks", "mor:cuda")]["verdict"] == "met" and got[("ranks", "mor:triton")]["verdict"] == "missed"
    empty = rep.goals([], [], "bench did not run", "no wheels")
    assert {g["verdict"] for g in empty} == {"not measured"} and len(empty) == 5
    assert any(g["detail"] == "no wheels" for g in empty if g["key"] == "unet")


def test_rows_that_are_not_ok_or_lack_columns_are_left_out(rep):
    rows = [_row("base", 1.0, ratio_to_base=1.0), dict(_row("mor:triton", 9.0, ratio_to_base=9.0), status="error"),
            {"provider": "mor:cuda", "status": "ok", "kind": "linear", "mode": "fwd", "sweep": "main"}]  # fmt: skip
    got = [g for g in rep.goals(rows, [], "", "") if g["key"] == "linear"]
    assert [g["verdict"] for g in got] == ["not measured"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{errors}" tests="{n}">
{cases}</testsuite></testsuites>"""


def test_junit_merge_and_counts(rep, tmp_path):
    a = tmp_path / "a.xml"
    a.write_text(JUNIT.format(errors=0, n=4, cases="""
<testcase classname="tests.kernels.test_x" name="test_ok"/>
<testcase classname="tests.kernels.test_x" name="test_bad"><failure message="AssertionError: dx off by 3">tb</failure></testcase>
<testcase classname="tests.kernels.test_x" name="test_gpu"><skipped message="needs a CUDA device"/></testcase>
<testcase classname="tests.kernels.test_x" name="test_gpu2"><skipped message="needs a CUDA device"/></testcase>"""))  # fmt: skip
    b = tmp_path / "b.xml"
    b.write_text(JUNIT.format(errors=1, n=0, cases=""))  # a collection error: no testcase
    merged = tmp_path / "parity.xml"
    rep.merge_junit([("kernels", str(a)), ("model", str(b)), ("cut short", str(tmp_path / "missing.xml"))], str(merged))
    counts = rep.junit_counts(str(merged))
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 2)
    assert counts["errors"] == 2  # the collection error and the missing report
    assert counts["failures"][0] == ("tests.kernels.test_x::test_bad", "AssertionError: dx off by 3")
    assert counts["skip_reasons"]["needs a CUDA device"] == 2
    names = [s.get("name") for s in rep.ET.parse(merged).getroot()]
    assert names == ["kernels", "model", "cut short"]


def test_summary_marks_cpu_numbers(rep):
    goal_rows = rep.goals([_row("base", 1.0, ratio_to_base=1.0), _row("mor:cpp", 2.0, ratio_to_base=2.0)], [], "", "")
    info = {"dry_run": True, "device": "CPU", "date": "today", "command": "bash benchmarks/gpu_check.sh --dry-run o"}
    stages = [{"name": "bench", "status": "dry-run", "seconds": 3.0, "cap_s": 10, "summary": "a | b"}]
    text = rep.render(info, stages, goal_rows, [{"kernel": "_fwd_kernel", "spill_stores": "0"}], {})
    assert "2.00x - 2.00x over 1 cases (CPU, not a GPU result)" in text
    assert "not judged (CPU, not a GPU result)" in text and "**met**" not in text and "**missed**" not in text
    assert "| bench | dry-run | 3 (10) | a / b |" in text and "_fwd_kernel" in text
    gpu = rep.render(dict(info, dry_run=False), stages, goal_rows, [], {})
    assert "**missed**" in gpu and "CPU, not a GPU result" not in gpu


def test_kernel_table_reads_a_cache_entry(tmp_path):
    kernels = _import("gpu_check_kernels")
    entry = tmp_path / "HASH"
    entry.mkdir()
    (entry / "_fwd_kernel.json").write_text(json.dumps({"name": "_fwd_kernel", "num_warps": 8, "num_stages": 3,
                                                         "shared": 65536, "hash": "abcdef0123456789"}))  # fmt: skip
    (entry / "__grp___fwd_kernel.json").write_text(json.dumps({"child_paths": {}}))
    (entry / "_fwd_kernel.ttir").write_text("tt.func public @_fwd_kernel(%arg0: !tt.ptr<i32>, %arg1: !tt.ptr<bf16>) {")
    (entry / "_fwd_kernel.ptx").write_text(".version 8.8\n.target sm_90a\n wgmma.mma_async.sync.aligned.m64n64k16\n"
                                           " wgmma.mma_async.sync.aligned.m64n64k16\n mma.sync.aligned\n")  # fmt: skip
    row = kernels.analyse(str(entry), None, None)
    assert row["kernel"] == "_fwd_kernel" and row["dtype"] == "bf16" and row["arch"] == "sm_90a"
    assert (row["wgmma"], row["mma_sync"], row["num_warps"], row["shared_bytes"]) == (2, 1, 8, 65536)
    assert "no ptxas" in row["note"]
    empty = tmp_path / "EMPTY"
    empty.mkdir()
    assert kernels.analyse(str(empty), None, None) is None


def test_gpu_mark_selects_the_gpu_parity_tests():
    """``pytest -m gpu tests/kernels`` (the parity stage) collects the SD-shape, CUDA-graph and extension tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/kernels",
                           "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]
    ids = proc.stdout
    for needed in ("test_gpu_parity.py::test_sd_linear[cuda-4096x320", "test_gpu_parity.py::test_sd_conv[triton-",
                   "test_training_step_replays_in_a_cuda_graph", "test_extension_parity.py::test_parity",
                   "test_triton_ops.py::test_forward_captures_in_a_cuda_graph", "test_gpu_sd_shapes"):  # fmt: skip
        assert needed in ids, needed
    assert "test_triton_gpu_compile" not in ids and "test_reference_" not in ids


# ------------------------------------------------------------------------------------------------
# the GPU path, with every command stubbed (no GPU here): the commands it would run and how it reads them


class FakeCommands:
    """Stands in for ``Runner.sh``: records each command and writes what the real one would (JUnit, benchmark
    JSON, sanitizer output) into its log and output paths."""

    def __init__(self, run, sanitizer_text="========= ERROR SUMMARY: 0 errors\n"):
        self.run, self.sanitizer_text, self.calls = run, sanitizer_text, []

    def __call__(self, cmd, log, cap, env=None):
        self.calls.append((cmd, env or self.run.env))
        path = os.path.join(self.run.logs, log)
        text, rc = "ok\n", 0
        if "pytest" in cmd:
            junit = cmd[cmd.index("--junitxml") + 1]
            cases = '<testcase classname="t" name="a"/><testcase classname="t" name="b"/>'
            with open(junit, "w") as f:
                f.write(JUNIT.format(errors=0, n=2, cases=cases))
        elif cmd[1] == "-c" and "_extension" in cmd[2]:  # the extension check
            stages = _import("gpu_check_stages")
            text = json.dumps({"loaded": True, "why": None, "cuda_ops": list(stages.CUDA_OPS)}) + "\n"
        elif "--tool" in cmd:
            text = self.sanitizer_text
            rc = 86 if "ERROR SUMMARY: 0" not in text and "SUMMARY" in text else (0 if "SUMMARY" in text else 1)
        elif any(c.endswith(("bench_mor_lora.py", "bench_pipeline.py")) for c in cmd):
            out = cmd[cmd.index("--out") + 1]
            os.makedirs(out, exist_ok=True)
            stem = "bench_pipeline" if cmd[1].endswith("bench_pipeline.py") else "bench_mor_lora"
            rows = ([dict(part="unet", variant="none", status="ok", ratio_to_none=1.0),
                     dict(part="unet", variant="mor:triton", status="ok", ratio_to_none=1.03, median_ms=9.0)]
                    if stem == "bench_pipeline" else [_row("base", 1.0, ratio_to_base=1.0),
                                                     _row("mor:triton", 1.1, ratio_to_base=1.1)])  # fmt: skip
            with open(os.path.join(out, f"{stem}-cuda-T.json"), "w") as f:
                json.dump({"meta": {"device_name": "NVIDIA H200", "torch": "2.11"}, "rows": rows}, f)
        with open(path, "w") as f:
            f.write(text)
        return {"rc": rc, "timed_out": False, "seconds": 1.0, "log": path}


def _gpu_runner(gc, tmp_path, monkeypatch, **fake):
    stages = _import("gpu_check_stages")
    run = _runner(gc, tmp_path)
    run.dry, run.gpu = False, True
    run.args.dry_run = False
    run.envinfo = {"gpu": {"capability": "9.0"}}
    run.extension = {"loaded": True, "why": None, "cuda_ops": list(stages.CUDA_OPS)}
    run.have_model_deps = True
    run.sh = FakeCommands(run, **fake)
    monkeypatch.setattr(stages, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    return stages, run


def test_gpu_path_runs_the_gpu_commands_and_reads_their_outputs(gc, tmp_path, monkeypatch):
    stages, run = _gpu_runner(gc, tmp_path, monkeypatch)
    parts = stages.parity_triton_any_device(run)
    stages.parity_stage(run, parts)
    stages.sanitize_stage(run)
    stages.bench_stage(run)
    assert stages.finish(run) == 0
    cmds = [" ".join(c) for c, _ in run.sh.calls]
    parity = [(c, env) for c, env in run.sh.calls if "pytest" in c]
    assert "-m not gpu" in " ".join(parity[0][0]) and "test_triton_gpu_compile.py" not in " ".join(parity[0][0])
    assert "-m gpu tests/kernels" in " ".join(parity[1][0]) and parity[1][1]["MOR_REQUIRE_CUDA_BUILD"] == "1"
    assert "--ignore=tests/kernels" in " ".join(parity[2][0])
    assert sum("--tool memcheck" in c for c in cmds) == 1 and sum("--tool racecheck" in c for c in cmds) == 1
    memcheck_env = next(env for c, env in run.sh.calls if "memcheck" in c)
    assert memcheck_env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    bench = [c for c in cmds if "bench_mor_lora.py" in c]
    assert len(bench) == 3 and all("--device cuda" in c and "--dtypes bf16" in c for c in bench)
    assert "--shapes linear" in bench[0] and "--shapes conv" in bench[1] and "--sweep zero" in bench[2]
    assert any("bench_pipeline.py --device cuda --full-size" in c for c in cmds)
    by = {s.name: s for s in run.stages.values()}
    assert by["parity"].status == "passed" and by["parity"].summary.count("2 passed, 0 failed") == 3
    assert by["sanitize"].status == "passed" and by["bench"].status == "passed"
    goals = {(g["key"], g["backend"]): g["verdict"] for g in run.goal_rows}
    assert goals[("linear", "mor:triton")] == "met" and goals[("unet", "mor:triton")] == "met"
    out = sorted(os.listdir(run.out))
    assert {"parity.xml", "bench_mor_lora.csv", "bench_pipeline.csv", "summary.md"} <= set(out) and len(out) <= 8
    with open(os.path.join(run.out, "bench_mor_lora.csv")) as f:
        header = f.readline()
    assert header.startswith("run,") and "meta_device_name" in header


@pytest.mark.parametrize(
    "text,status",
    [
        ("========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: 2 errors\n", "failed"),
        ("========= Error: Device not supported\n", "skipped"),
        ("Traceback ... RuntimeError: CUDA error\n", "error"),
    ],
)
def test_sanitizer_outcomes(gc, tmp_path, monkeypatch, text, status):
    stages, run = _gpu_runner(gc, tmp_path, monkeypatch, sanitizer_text=text)
    stages.sanitize_stage(run)
    assert run.stages["sanitize"].status == status
    if status == "failed":
        assert "Invalid __global__ read" in run.stages["sanitize"].summary
        assert stages.finish(run) == 1


def test_install_on_a_gpu_installs_the_wheels_and_builds_for_the_device_arch(gc, tmp_path, monkeypatch):
    stages, run = _gpu_runner(gc, tmp_path, monkeypatch)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    run.args.wheels = str(wheels)
    started = []

    def start(cmd, log, env=None):
        started.append((cmd, env))
        return subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)

    run.start = start
    build = stages.install_stage(run)
    assert build is not None and run.stages["install"].status == "running"  # the build runs in the background
    stages.finish_build(run, *build)
    install = run.stages["install"]
    assert install.status == "passed", install.summary
    pip = next(c for c, _ in run.sh.calls if "pip" in c)
    assert pip[pip.index("install") :][:5] == ["install", "-q", "--no-index", "--no-deps", "--no-compile"]
    site = pip[pip.index("--target") + 1]
    assert site in run.env["PYTHONPATH"].split(os.pathsep) and run.env["PYTHONPATH"].startswith(REPO)
    ((cmd, env),) = started
    assert cmd[1:] == ["setup.py", "build_ext", "--inplace"]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["MAX_JOBS"] == str(os.cpu_count())
    assert "5/5 ops" in install.summary and "1 wheels installed (diffusers)" in install.summary
