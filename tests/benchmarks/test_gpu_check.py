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
    args = dict(dry_run=True, out_dir=str(tmp_path / "out"), work=str(tmp_path / "work"), budget=60.0,
                stages=list(gc.STAGE_NAMES), wheels=None, no_build=False)  # fmt: skip
    args = types.SimpleNamespace(**{**args, **kw})
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


def test_a_command_that_ignores_sigint_is_killed_by_its_cap(gc, tmp_path):
    """The cap includes the stop: SIGINT a grace before it, SIGKILL at it, so a cut command cannot eat the time
    of the commands after it."""
    run = _runner(gc, tmp_path)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    start = time.monotonic()
    res = run.sh([sys.executable, "-c", code], "stubborn.log", cap=4)
    took = time.monotonic() - start
    assert res["timed_out"] and res["rc"] == -9
    assert 3 <= took < 10, took  # the old stop (SIGINT at the cap, SIGKILL 20 s later) took 24 s


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
        _row("mor:merged", 1.05, ratio_to_base=1.05),  # the merge crossover's data, judged by no goal
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
                dict(part="unet", variant="mor-folded:triton", status="ok", ratio_to_none=1.2, median_ms=24),
                dict(part="unet-graph", variant="none", status="ok", ratio_to_none=1.0, median_ms=15),
                dict(part="unet-graph", variant="mor:triton", status="ok", ratio_to_none=1.07, median_ms=16),
                dict(part="unet-graph", variant="mor-folded:triton", status="error", reason="capture failed")]  # fmt: skip
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
    assert not any(k[1] == "mor:merged" for k in got)
    assert got[("unet", "mor:triton (CUDA graph)")]["verdict"] == "missed"  # the device time alone, judged too
    assert not any(k[1].startswith("mor-folded:triton (") for k in got)  # an error row makes no goal row
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
                   "test_gpu_parity.py::test_sd_projection[cuda-attn2.to_k-v-320-bfloat16-token]",
                   "test_gpu_parity.py::test_sd_conv_path[triton-downsampler.conv-64x64x320-",
                   "test_gpu_parity.py::test_sd_conv_path[cuda-up-resnet.conv_shortcut-2560-1280-",
                   "test_training_step_replays_in_a_cuda_graph", "test_extension_parity.py::test_parity",
                   "test_triton_ops.py::test_forward_captures_in_a_cuda_graph", "test_gpu_sd_shapes"):  # fmt: skip
        assert needed in ids, needed
    assert "test_triton_gpu_compile" not in ids and "test_reference_" not in ids


# ------------------------------------------------------------------------------------------------
# the GPU path, with every command stubbed (no GPU here): the commands it would run and how it reads them


class FakeCommands:
    """Stands in for ``Runner.sh``: records each command and writes what the real one would (JUnit, benchmark
    JSON, sanitizer output) into its log and output paths. ``clock``: a list ``[now]`` that each command moves on
    by its whole cap (and then succeeds): the worst case the time plan must survive. ``cuda_ops``: what the
    extension check reports."""

    def __init__(self, run, sanitizer_text="========= ERROR SUMMARY: 0 errors\n", clock=None, cuda_ops=None,
                 imports=True, outcomes=None):  # fmt: skip
        self.run, self.sanitizer_text, self.calls, self.clock = run, sanitizer_text, [], clock
        self.cuda_ops = list(_import("gpu_check_stages").CUDA_OPS) if cuda_ops is None else cuda_ops
        self.imports = imports  # whether "import diffusers, open_clip" works
        self.outcomes = outcomes or {}  # log name -> {rc, timed_out, cases (JUnit testcases; None: no report)}
        self.caps: list[tuple[str, float]] = []

    def __call__(self, cmd, log, cap, env=None):
        self.calls.append((cmd, env or self.run.env))
        self.caps.append((log, cap))
        path = os.path.join(self.run.logs, log)
        if cap < 1:
            return {"rc": None, "timed_out": True, "seconds": 0.0, "log": path}
        if self.clock is not None:
            self.clock[0] += cap
        text, rc = "ok\n", 0
        if cmd[1].endswith("gpu_check_env.py"):
            env_json = {"cuda_available": not self.run.dry, "torch": "2.11", "cpu_count": 16,
                        "gpu": {} if self.run.dry else {"name": "NVIDIA H200", "capability": "9.0", "sm_count": 132}}  # fmt: skip
            with open(cmd[2], "w") as f:
                json.dump(env_json, f)
        elif "pytest" in cmd:
            junit = cmd[cmd.index("--junitxml") + 1]
            cases = self.outcomes.get(log, {}).get("cases", '<testcase classname="t" name="a"/>'
                                                            '<testcase classname="t" name="b"/>')  # fmt: skip
            if cases is not None:
                with open(junit, "w") as f:
                    f.write(JUNIT.format(errors=0, n=2, cases=cases))
        elif cmd[1:] == ["-c", "import diffusers, open_clip"]:
            rc = 0 if self.imports else 1
        elif cmd[1] == "-c" and "_extension" in cmd[2]:  # the extension check
            text = json.dumps({"loaded": True, "why": None, "cuda_ops": self.cuda_ops}) + "\n"
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
        res = {"rc": rc, "timed_out": False, "seconds": cap if self.clock else 1.0, "log": path}
        res.update({k: v for k, v in self.outcomes.get(log, {}).items() if k in ("rc", "timed_out")})
        return res


def _gpu_runner(gc, tmp_path, monkeypatch, **fake):
    stages = _import("gpu_check_stages")
    run = _runner(gc, tmp_path, dry_run=False, budget=480.0)
    run.gpu = True
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
    stages.finish_build(run, build)
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


# ------------------------------------------------------------------------------------------------
# the time plan: the whole schedule on a fake clock


def _fake_run(gc, tmp_path, monkeypatch, *, dry=False, wheels=True, no_build=False, stages=None, **fake):
    """A whole run (``run_all``) with every command stubbed on a fake clock: each command, and the wait for the
    build, takes its whole cap and then succeeds."""
    mod = _import("gpu_check_stages")
    kw = dict(dry_run=dry, budget=1200.0 if dry else 480.0, no_build=no_build)
    if wheels:
        (tmp_path / "whl").mkdir()
        (tmp_path / "whl" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
        kw["wheels"] = str(tmp_path / "whl")
    if stages is not None:
        kw["stages"] = stages
    run = _runner(gc, tmp_path, **kw)
    clock = [1000.0]
    run.clock = lambda: clock[0]
    run.t0, run.deadline = clock[0], clock[0] + run.args.budget
    run.sh = FakeCommands(run, clock=clock, **fake)
    waits = []

    def wait(proc, cap):
        waits.append(cap)
        clock[0] += cap
        return 0, False

    run.start, run.wait = (lambda cmd, log, env=None: object()), wait
    monkeypatch.setattr(mod, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    code = mod.run_all(run)
    return run, code, clock[0], waits


ALL_GPU_STEPS = {("env", "env"), ("install", "wheels"), ("install", "imports"), ("kernels", "kernels"),
                 ("beside-build", "triton-any-device"), ("build", "build"), ("build", "extension"), ("parity", "kernels"), ("parity", "model"),
                 ("sanitize", "memcheck"), ("sanitize", "racecheck"), ("bench", "linear"), ("bench", "conv"),
                 ("bench", "sweep"), ("bench", "pipeline")}  # fmt: skip


@pytest.mark.parametrize(
    "case,options,expected",
    [
        ("gpu", {}, ALL_GPU_STEPS),
        ("gpu, no wheels", {"wheels": False, "imports": False},
         ALL_GPU_STEPS - {("install", "wheels"), ("bench", "pipeline")}),
        ("gpu, --no-build", {"no_build": True},
         ALL_GPU_STEPS - {("build", "build"), ("build", "extension")} | {("install", "extension")}),
        ("gpu, --stages parity,sanitize,bench", {"stages": ["parity", "sanitize", "bench"]},
         {("env", "env"), ("beside-build", "triton-any-device"), ("parity", "kernels"), ("parity", "model"),
          ("sanitize", "extension"),
          ("sanitize", "memcheck"), ("sanitize", "racecheck"), ("bench", "linear"), ("bench", "conv"),
          ("bench", "sweep"), ("bench", "imports"), ("bench", "pipeline")}),
        ("dry run", {"dry": True, "wheels": False},
         {("env", "env"), ("install", "imports"), ("install", "extension"), ("kernels", "kernels"),
          ("parity", "kernels"), ("parity", "model"), ("sanitize", "cpu"), ("bench", "linear"), ("bench", "conv"),
          ("bench", "sweep"), ("bench", "pipeline")}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_every_step_gets_its_least_when_every_command_uses_its_cap(gc, tmp_path, monkeypatch, case, options, expected):
    """The worst case of the default budget: every command before a step ran until its cap. Each step still
    gets at least its ``least`` (gpu_check_plan.STEPS), every command's cap is the plan's, and the run ends
    inside its budget. (Before the plan: memcheck got 30 s, racecheck 0 s and the linear benchmark 0 s.)"""
    plan = _import("gpu_check_plan")
    run, code, end, waits = _fake_run(gc, tmp_path, monkeypatch, **options)
    assert code == 0, run.info.get("verdict")
    issued = run.plan.issued
    assert {(phase, step) for phase, step, *_ in issued} == expected
    short = [(p, st, round(cap, 1), least) for p, st, cap, want, least in issued if cap < min(least, want) - 1e-6]
    assert not short, f"steps below their least: {short}"
    assert all(least > 0 for p, st, _, _, least in issued if (p, st) != ("beside-build", "triton-any-device"))
    # every command ran under the cap the plan gave it (the build's wait included), in order
    given = [cap for p, st, cap, *_ in issued if (p, st) != ("build", "build")]
    assert [cap for _, cap in run.sh.caps] == pytest.approx(given)
    assert waits == [cap for p, st, cap, *_ in issued if (p, st) == ("build", "build")]
    assert end <= run.deadline - plan.SUMMARY_RESERVE + 1e-6
    linear = next(cap for p, st, cap, *_ in issued if st == "linear")
    later = sum(least for p, st, _, _, least in issued if p == "bench" and st != "linear")
    assert linear >= plan.STEPS["bench"][0][3] and later <= 100  # the linear run keeps only the later leasts
    if case == "gpu":  # the default budget holds every floor with time to spare
        assert run.plan.total_floor() < run.args.budget - 60


def test_a_phase_started_at_its_floor_gives_each_command_its_least(gc, tmp_path):
    """Each phase started with exactly its floor (plus the later floors) left: every step gets its least."""
    plan = _import("gpu_check_plan")
    run = _runner(gc, tmp_path, dry_run=False, budget=480.0)
    run.extension, run.have_model_deps, run.build_started = {"loaded": True}, True, 0.0
    clock = [0.0]
    run.clock = lambda: clock[0]
    for phase in plan.PHASES:
        steps = run.plan.steps(phase)
        if not run.plan.selected(phase) or not steps:
            continue
        run.deadline = clock[0] + run.plan.floor(phase) + run.plan.reserve_after(phase)
        for step in steps:
            cap = run.plan.cap(phase, step.name)
            assert cap >= min(step.least, step.want) - 1e-6, (phase, step)
            clock[0] += cap
        run.plan.ends.clear()


def test_a_failed_build_skips_the_cuda_cases_and_exits_3(gc, tmp_path, monkeypatch):
    """The build made no CUDA kernel: parity runs without MOR_REQUIRE_CUDA_BUILD (the extension cases skip with
    the build's reason), its summary says the build failed, and the exit code is 3 (not 1: no check failed)."""
    monkeypatch.setenv("MOR_REQUIRE_CUDA_BUILD", "1")  # even when the caller's environment sets it
    run, code, _, _ = _fake_run(gc, tmp_path, monkeypatch, cuda_ops=[])
    assert code == 3 and "INCOMPLETE" in run.info["verdict"] and "install" in run.info["verdict"]
    assert run.stages["install"].status == "error" and "0/5 ops" in run.stages["install"].summary
    parity_envs = [env for cmd, env in run.sh.calls if "pytest" in cmd and "-m gpu" in " ".join(cmd)]
    assert parity_envs and all("MOR_REQUIRE_CUDA_BUILD" not in env for env in parity_envs)
    assert run.stages["parity"].status == "passed"
    assert "backend 'cuda' cases skip: the extension build failed" in run.stages["parity"].summary
    assert run.stages["sanitize"].status == "skipped"


@pytest.mark.parametrize(
    "outcome,status,code",
    [
        ({"timed_out": True, "rc": 2}, "passed", 0),  # cut after it wrote its report: a note
        ({"timed_out": True, "rc": -9, "cases": None}, "passed", 0),  # cut before any report: a note
        ({"timed_out": True, "rc": 2, "cases": '<testcase classname="t" name="x"><failure message="off"/></testcase>'},
         "failed", 1),  # what it did run still counts
        ({"rc": 3}, "error", 3),  # pytest broke by itself: not a cut
    ],
)  # fmt: skip
def test_the_triton_tests_beside_the_build_are_a_note_when_cut(gc, tmp_path, monkeypatch, outcome, status, code):
    stages, run = _gpu_runner(gc, tmp_path, monkeypatch, outcomes={"parity-triton-any-device.log": outcome})
    stages.parity_stage(run, stages.parity_triton_any_device(run))
    parity = run.stages["parity"]
    assert parity.status == status, parity.summary
    if status == "passed":
        assert "a note, not a failure" in parity.summary
    assert stages.finish(run) == code
    names = [s.get("name") for s in _import("gpu_check_report").ET.parse(os.path.join(run.out, "parity.xml")).getroot()]
    assert (stages.ANY_DEVICE in names) == (outcome.get("cases", "") is not None)


def test_sanitize_program_matches_the_op_schemas(tmp_path):
    """gpu_check_sanitize.py on the C++ kernels (what the dry run does): every call matches its op's schema."""
    from mor_kernels import _extension

    if _extension.load()[0] is None:
        if os.environ.get("MOR_REQUIRE_CUDA_BUILD", "0") not in ("", "0"):
            pytest.fail(f"MOR_REQUIRE_CUDA_BUILD=1 but the extension is not built: {_extension.load()[1]}")
        pytest.skip(f"the compiled extension is not built here: {_extension.load()[1]}")
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "gpu_check_sanitize.py"), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "op calls ran on cpu" in proc.stdout
