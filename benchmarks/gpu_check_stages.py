"""The stages of gpu_check.sh, in the order they run on a GPU: env; install (wheels, then the extension build
started in the background); kernels and the device-agnostic Triton tests while the build runs; then parity,
sanitize and bench. Each stage fills in its :class:`gpu_check.Stage` and calls ``run.record`` so that OUT_DIR
holds everything measured so far. ``--dry-run`` gives every stage its CPU fallback (see each function).
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import re
import time

import gpu_check_report as report

#: seconds kept back for each later stage when an earlier one is capped (the stages' floors)
FLOORS = {"kernels": 20, "parity": 90, "sanitize": 30, "bench": 120}
SUMMARY_RESERVE = 5
NOT_SELECTED = "not selected (--stages)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_OPS = ("route", "dense_gate", "lora_fwd", "lora_bwd", "conv_up")
CHECK_EXTENSION = (
    "import json; from mor_kernels import _extension as e; m, why = e.load(); "
    f"ops = {CUDA_OPS!r}; "
    "print(json.dumps({'loaded': m is not None, 'why': why, "
    "'cuda_ops': [o for o in ops if m is not None and e.has_kernel(o, 'CUDA')]}))"
)


def reserve(run, after: str) -> float:
    """Seconds to keep for the selected stages that run after ``after``."""
    order = list(FLOORS)
    later = order[order.index(after) + 1 :] if after in order else order
    return SUMMARY_RESERVE + sum(FLOORS[s] for s in later if s in run.args.stages)


def run_all(run) -> int:
    for name in run.stages:
        if name not in run.args.stages and name != "env":
            run.stages[name].status, run.stages[name].summary = "skipped", NOT_SELECTED
    env_stage(run)
    if run.stages["env"].status == "error":
        for name in run.args.stages:
            if name != "env":
                run.stages[name].status, run.stages[name].summary = "skipped", "the env stage failed (see above)"
        return finish(run)
    build = install_stage(run) if "install" in run.args.stages else None
    if "kernels" in run.args.stages:
        kernels_stage(run)
    parts = parity_triton_any_device(run) if "parity" in run.args.stages else []
    if build is not None:
        finish_build(run, *build)
    if "parity" in run.args.stages:
        parity_stage(run, parts)
    if "sanitize" in run.args.stages:
        sanitize_stage(run)
    if "bench" in run.args.stages:
        bench_stage(run)
    return finish(run)


def _done(run, s, start: float, status: str, summary: str, seconds: float | None = None) -> None:
    s.status, s.summary = status, summary
    s.seconds = s.seconds + time.monotonic() - start if seconds is None else seconds
    run.record(s)


def _ok(res: dict) -> bool:
    return res["rc"] == 0 and not res["timed_out"]


def _why(run, res: dict) -> str:
    if res["rc"] is None:
        return "not run: no time left in the --budget"
    what = f"timed out after {res['seconds']:.0f} s" if res["timed_out"] else f"exited {res['rc']}"
    return f"{what}: {run.tail(res['log'], 4)}"


# ------------------------------------------------------------------------------------------------
# env


def env_stage(run) -> None:
    s, start = run.stages["env"], time.monotonic()
    s.cap_s = 60
    path = os.path.join(run.work, "env.json")
    res = run.sh([run.python, "benchmarks/gpu_check_env.py", path], "env.log", run.cap(60))
    if not _ok(res):
        return _done(run, s, start, "error", f"gpu_check_env.py {_why(run, res)}")
    run.copy_in("env.json", path)
    with open(path) as f:
        env = json.load(f)
    run.envinfo = env
    gpu, smi = env.get("gpu") or {}, env.get("nvidia_smi") or {}
    run.gpu = bool(env.get("cuda_available")) and not run.dry
    run.info["device"] = gpu.get("name") or f"CPU ({env.get('cpu_count')} cores)"
    run.info["commit"] = f"{(env.get('git_commit') or '?')[:10]}{' (dirty)' if env.get('git_dirty') else ''}"
    run.info["versions"] = (
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
        f"driver {smi.get('driver_version', '-')}, nvcc {env.get('nvcc', '-')}, Python {env.get('python')}"
    )
    if not run.dry and not env.get("cuda_available"):
        return _done(run, s, start, "error", "no CUDA device here (torch.cuda.is_available() is False); "
                                             "on a CPU, run with --dry-run")  # fmt: skip
    detail = (
        f"{run.info['device']}: {gpu.get('sm_count', '-')} SMs, sm_{gpu.get('capability', '-').replace('.', '')}, "
        f"{gpu.get('memory_free_gib', '-')}/{gpu.get('memory_total_gib', '-')} GiB free, clocks SM "
        f"{smi.get('clocks.sm', '-')} (max {smi.get('clocks.max.sm', '-')}), mem {smi.get('clocks.mem', '-')}; "
        if gpu
        else f"no GPU (dry run); {env.get('cpu_count')} CPU cores; "
    )
    _done(run, s, start, "passed" if run.gpu else "dry-run", detail + run.info["versions"])


# ------------------------------------------------------------------------------------------------
# install


def _extension_state(run, log: str) -> dict:
    res = run.sh([run.python, "-c", CHECK_EXTENSION], log, run.cap(120))
    try:
        with open(res["log"]) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {"loaded": False, "why": f"the extension check {_why(run, res)}", "cuda_ops": []}


def _describe(state: dict) -> str:
    if not state["loaded"]:
        return f"mor_kernels._C not loaded: {state['why']}"
    return f"mor_kernels._C loaded, CUDA kernels for {len(state['cuda_ops'])}/{len(CUDA_OPS)} ops"


def _model_deps(run) -> str:
    """Whether diffusers and open_clip import (the model/pipeline tests and bench_pipeline.py need them)."""
    probe = run.sh([run.python, "-c", "import diffusers, open_clip"], "install-imports.log", run.cap(60))
    run.have_model_deps = _ok(probe)
    if run.have_model_deps:
        return "diffusers and open_clip import"
    return f"diffusers/open_clip missing ({run.tail(probe['log'], 1)}): pass --wheels DIR"


def install_stage(run):
    """Wheels from ``--wheels`` into a scratch ``site`` folder (put on PYTHONPATH); then the extension built in
    place for this GPU's architecture only, in the background (returned as ``(proc, start, cap)``); or, with
    ``--no-build`` or ``--dry-run``, the extension already in the tree checked."""
    s, start = run.stages["install"], time.monotonic()
    s.cap_s, notes = 60, []
    if run.args.wheels:
        wheels = sorted(glob.glob(os.path.join(run.args.wheels, "*.whl")))
        if not wheels:
            return _done(run, s, start, "error", f"--wheels {run.args.wheels} holds no *.whl")
        site = os.path.join(run.work, "site")
        cmd = [run.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
               *wheels]  # fmt: skip
        res = run.sh(cmd, "install-wheels.log", run.cap(60, reserve(run, "install")))
        if not _ok(res):
            return _done(run, s, start, "error", f"pip install of {len(wheels)} wheels {_why(run, res)}")
        run.set_pythonpath([site])
        notes.append(f"{len(wheels)} wheels installed ({', '.join(os.path.basename(w).split('-')[0] for w in wheels)})")
    notes.append(_model_deps(run))
    if run.dry or run.args.no_build:
        state = _extension_state(run, "install-extension.log")
        run.extension = state
        why = "--dry-run: no build on the CPU" if run.dry else "--no-build"
        notes.append(f"{why}; {_describe(state)}")
        return _done(run, s, start, "dry-run" if run.dry else "passed", "; ".join(notes))
    cap = (run.envinfo.get("gpu") or {}).get("capability", "9.0")
    jobs = str(os.cpu_count() or 4)
    env = dict(run.env, TORCH_CUDA_ARCH_LIST=cap, MAX_JOBS=jobs)
    s.data["build"] = f"TORCH_CUDA_ARCH_LIST={cap} MAX_JOBS={jobs} python setup.py build_ext --inplace"
    run.say(f"  $ {s.data['build']}  (in the background, log build.log)")
    proc = run.start([run.python, "setup.py", "build_ext", "--inplace"], "build.log", env)
    s.status, s.summary = "running", "; ".join(notes) + "; building the extension in the background"
    s.seconds = time.monotonic() - start
    run.record(s)
    return proc, time.monotonic(), 300.0


def finish_build(run, proc, started: float, cap: float) -> None:
    s, start = run.stages["install"], time.monotonic()
    s.cap_s = cap
    rc, timed_out = run.wait(proc, run.cap(cap - (time.monotonic() - started), reserve(run, "kernels")))
    build_s = time.monotonic() - started
    state = _extension_state(run, "install-extension.log")
    run.extension = state
    notes = s.summary.replace("; building the extension in the background", "")
    seconds = s.seconds + time.monotonic() - started  # the build ran beside the kernels stage and Triton tests
    if rc != 0 or timed_out or len(state["cuda_ops"]) != len(CUDA_OPS):
        what = f"timed out after {build_s:.0f} s" if timed_out else f"exited {rc}"
        summary = f"{notes}; build {what}: {run.tail('build.log', 4)}; {_describe(state)}"
        return _done(run, s, start, "error", summary, seconds)
    _done(
        run, s, start, "passed", f"{notes}; built in {build_s:.0f} s ({s.data['build']}); {_describe(state)}", seconds
    )


# ------------------------------------------------------------------------------------------------
# kernels


def kernels_stage(run) -> None:
    s, start = run.stages["kernels"], time.monotonic()
    s.cap_s = 300 if run.dry else 120
    path = os.path.join(run.work, "kernels.csv")
    cmd = [run.python, "benchmarks/gpu_check_kernels.py", "--mode", "aot" if run.dry else "launch",
           "--cache", run.env["TRITON_CACHE_DIR"], "--csv", path]  # fmt: skip
    if run.dry:  # one Linear and one conv shape, batch 1, sample routing: the real compile, the smallest set
        cmd += ["--shapes", "lin64x1280,conv1x1-8x8x1280", "--batch", "1", "--routing", "sample"]
    res = run.sh(cmd, "kernels.log", run.cap(s.cap_s, reserve(run, "kernels")))
    run.kernels = report.read_csv(path)
    if run.kernels:
        run.copy_in("kernels.csv", path)
    spills = sorted({f"{k['kernel']} {k.get('dtype', '')} ({k['spill_stores']} B)" for k in run.kernels
                     if (report._num(k.get("spill_stores")) or 0) > 0})  # fmt: skip
    wgmma = sum(1 for k in run.kernels if (report._num(k.get("wgmma")) or 0) > 0)
    where = "compiled ahead of time for sm_90 on the CPU" if run.dry else "compiled by real launches"
    summary = (f"{len(run.kernels)} kernels {where}; {wgmma} use wgmma; "
               f"spills: {', '.join(spills) if spills else 'none'}")  # fmt: skip
    if not _ok(res):
        return _done(run, s, start, "error", f"{summary}; gpu_check_kernels.py {_why(run, res)}")
    _done(run, s, start, "dry-run" if run.dry else "passed", summary)


# ------------------------------------------------------------------------------------------------
# parity


def _pytest(run, args: list[str], junit: str, workers: bool = True) -> list[str]:
    cmd = [run.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", junit, *args]
    if workers and run.gpu and importlib.util.find_spec("xdist") is not None and (os.cpu_count() or 1) >= 8:
        cmd += ["-n", "6"]  # the Triton JIT compiles dominate: six workers compile side by side
    return cmd


def parity_triton_any_device(run) -> list[tuple]:
    """GPU only, while the extension builds: the device-agnostic Triton tests (tests/kernels/test_triton_*.py
    without the ``gpu`` mark: odd sizes, zero-slot corners, every gradient), which run on the GPU when there is
    one. On the CPU they are part of the ordinary test suite (interpreter), so the dry run leaves them out."""
    if not run.gpu:
        return []
    # test_triton_gpu_compile.py is left out: it compiles every kernel ahead of time, the kernels stage's job
    files = [f for f in sorted(glob.glob("tests/kernels/test_triton_*.py", root_dir=ROOT))
             if not f.endswith("test_triton_gpu_compile.py")]  # fmt: skip
    junit = os.path.join(run.work, "parity-triton-any-device.xml")
    res = run.sh(_pytest(run, ["-m", "not gpu", *files], junit), "parity-triton-any-device.log",
                 run.cap(60, reserve(run, "kernels")))  # fmt: skip
    return [("Triton tests on the GPU (-m 'not gpu' tests/kernels/test_triton_*.py)", junit, res)]


def parity_stage(run, parts: list[tuple]) -> None:
    s, start = run.stages["parity"], time.monotonic()
    s.cap_s = 180 if run.dry else 210
    env = dict(run.env)
    if run.gpu and not run.args.no_build and "install" in run.args.stages:
        env["MOR_REQUIRE_CUDA_BUILD"] = "1"  # a missing CUDA build fails the extension tests instead of skipping
    junit = os.path.join(run.work, "parity-kernels-gpu.xml")
    res = run.sh(_pytest(run, ["-m", "gpu", "tests/kernels"], junit), "parity-kernels-gpu.log",
                 run.cap(150 if run.gpu else 120, reserve(run, "parity") + 15), env)  # fmt: skip
    parts = [("kernels: pytest -m gpu tests/kernels", junit, res)] + parts
    junit = os.path.join(run.work, "parity-model-gpu.xml")
    res = run.sh(_pytest(run, ["-m", "gpu", "tests", "--ignore=tests/kernels"], junit, workers=False),
                 "parity-model-gpu.log", run.cap(60 if run.gpu else 120, reserve(run, "parity")), env)  # fmt: skip
    parts.append(("model/pipeline: pytest -m gpu tests --ignore=tests/kernels", junit, res))
    report.merge_junit([(label, path) for label, path, _ in parts], os.path.join(run.work, "parity.xml"))
    run.copy_in("parity.xml", os.path.join(run.work, "parity.xml"))
    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": None}
    lines, broken = [], []
    for label, path, r in parts:
        try:
            c = report.junit_counts(path)
        except (OSError, report.ET.ParseError):
            c = {"passed": 0, "failed": 0, "errors": 1, "skipped": 0, "failures": [(label, _why(run, r))],
                 "skip_reasons": report.collections.Counter()}  # fmt: skip
        for key in ("passed", "failed", "errors", "skipped", "failures"):
            total[key] += c[key]
        total["skip_reasons"] = (total["skip_reasons"] or report.collections.Counter()) + c["skip_reasons"]
        if r["timed_out"] or r["rc"] not in (0, 1):
            broken.append(f"{label} {_why(run, r)}")
        lines.append(f"{label}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped ({r['seconds']:.0f} s{', cut at its cap' if r['timed_out'] else ''})")  # fmt: skip
    run.parity = total
    if total["failed"] or total["errors"]:
        status = "failed"
    elif broken:
        status = "error"
    elif run.dry:
        status = "dry-run"
        lines.append("on the CPU every GPU test skips: this checks the selection and the reports, not the kernels")
    else:
        status = "passed" if total["passed"] else "error"
    _done(run, s, start, status, "; ".join(lines + broken), sum(r["seconds"] for _, _, r in parts))


# ------------------------------------------------------------------------------------------------
# sanitize


def find_sanitizer() -> str | None:
    import gpu_check_env

    try:
        return gpu_check_env._tool("compute-sanitizer")
    except FileNotFoundError:
        return None


def sanitize_stage(run) -> None:
    s, start = run.stages["sanitize"], time.monotonic()
    s.cap_s = 120
    tool = find_sanitizer()
    program = [run.python, "benchmarks/gpu_check_sanitize.py"]
    ext = run.extension or _extension_state(run, "sanitize-extension.log")
    if run.dry:
        res = run.sh([*program, "--device", "cpu"], "sanitize-cpu.log", run.cap(60, reserve(run, "sanitize")))
        why = f"compute-sanitizer {'found at ' + tool if tool else 'not found'}, but no GPU"
        if not ext["loaded"]:
            return _done(run, s, start, "skipped", f"{why}; {_describe(ext)}")
        if not _ok(res):
            return _done(run, s, start, "error", f"{why}; CPU fallback {_why(run, res)}")
        return _done(run, s, start, "dry-run", f"{why}; CPU fallback: {run.tail(res['log'], 1)} (C++ kernels)")
    if tool is None:
        return _done(run, s, start, "skipped", "compute-sanitizer not found on PATH, in $CUDA_HOME/bin or "
                                                "/usr/local/cuda/bin")  # fmt: skip
    if len(ext.get("cuda_ops", [])) != len(CUDA_OPS):
        return _done(run, s, start, "skipped", f"no CUDA kernels to check: {_describe(ext)}")
    lines, outcomes = [], []
    for name, extra_env in (("memcheck", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}), ("racecheck", {})):
        # API errors are left to the program (torch raises on a failed launch); the tools judge device accesses
        cmd = [tool, "--tool", name, "--error-exitcode", "86", "--report-api-errors", "no", "--print-limit", "30",
               *program, "--device", "cuda"]  # fmt: skip
        res = run.sh(cmd, f"sanitize-{name}.log", run.cap(60, reserve(run, "sanitize")), dict(run.env, **extra_env))
        try:
            with open(res["log"], errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        errors = re.search(r"ERROR SUMMARY: (\d+) error", text)
        hazards = re.search(r"RACECHECK SUMMARY: .*", text)
        found = int(errors.group(1)) if errors else None
        if res["rc"] == 86 or (found or 0) > 0:
            outcomes.append("failed")
            lines.append(f"{name}: {found} errors (first: {_first_error(text)})")
        elif _ok(res) and found == 0:
            outcomes.append("passed")
            lines.append(f"{name}: 0 errors{' (' + hazards.group(0) + ')' if hazards else ''} ({res['seconds']:.0f} s)")
        elif "not supported" in text.lower() and found is None:  # e.g. "Device not supported" under gVisor
            outcomes.append("skipped")
            lines.append(f"{name} cannot run on this machine: {run.tail(res['log'], 2)}")
        else:
            outcomes.append("error")
            lines.append(f"{name} could not finish: {_why(run, res)}")
    status = next((o for o in ("failed", "error", "passed") if o in outcomes), "skipped")
    _done(run, s, start, status, "; ".join(lines))


def _first_error(text: str) -> str:
    m = re.search(r"=========\s+(Invalid|Race|Error|Program hit|Uninitialized)[^\n]*", text)
    return m.group(0).replace("=========", "").strip()[:200] if m else "see logs.tar.gz"


# ------------------------------------------------------------------------------------------------
# bench


def bench_runs(run) -> list[tuple[str, list[str], float]]:
    """``[(label, argv, cap)]`` of bench_mor_lora.py: one call per group, so a call cut at its cap costs only its
    own rows. GPU: bf16, batch 1 and 8, fwd and fwd+bwd, every backend, CUDA graphs (the script's defaults on a
    GPU); then the zero sweep. Dry run: the smallest CPU settings."""
    if run.dry:
        cpu = ["--device", "cpu", "--batch", "1", "--dtypes", "fp32", "--token-scale", "0.25", "--budget", "0.02"]
        return [
            ("linear", [*cpu, "--shapes", "lin64x1280", "--modes", "fwd,fwd+bwd", "--sweep", "none"], 120),
            ("conv", [*cpu, "--shapes", "conv1x1-8x8x1280", "--modes", "fwd,fwd+bwd", "--sweep", "none"], 120),
            (
                "sweep",
                [*cpu, "--shapes", "lin64x1280", "--sweep-shape", "lin64x1280", "--modes", "fwd", "--sweep", "zero"],
                120,
            ),  # fmt: skip
        ]
    gpu = ["--device", "cuda", "--dtypes", "bf16", "--budget", "0.1"]  # 0.1 s of CUDA-graph replays per provider
    return [
        ("linear", [*gpu, "--batch", "1,8", "--shapes", "linear", "--modes", "fwd,fwd+bwd", "--sweep", "none"], 100),
        ("conv", [*gpu, "--batch", "1,8", "--shapes", "conv", "--modes", "fwd,fwd+bwd", "--sweep", "none"], 110),
        ("sweep", [*gpu, "--batch", "8", "--shapes", "lin1024x640", "--modes", "fwd", "--sweep", "zero"], 50),
    ]


#: run metadata copied into every row of OUT_DIR's CSVs (the rest stays in the JSON files in logs.tar.gz)
META_COLUMNS = ("device_name", "torch", "triton", "cuda", "git_commit", "time_utc", "copy_GBps", "timer")


def read_bench(folder: str, stem: str, label: str) -> list[dict]:
    """The rows of the newest ``<stem>-*.json`` in ``folder`` (the JSON, not the CSV: its rows are exactly the
    script's, whatever metadata columns the CSV repeats), each with ``run`` = ``label`` and the run metadata."""
    found = sorted(glob.glob(os.path.join(folder, f"{stem}-*.json")))
    if not found:
        return []
    with open(found[-1]) as f:
        data = json.load(f)
    meta = data.get("meta", {})
    extra = {f"meta_{k}": meta.get(k) for k in META_COLUMNS if k in meta}
    return [{"run": label, **row, **extra} for row in data.get("rows", [])]


def write_rows(rows: list[dict], path: str) -> None:
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def bench_stage(run) -> None:
    s, start = run.stages["bench"], time.monotonic()
    s.cap_s = 420 if run.dry else 380
    lines, broken, bench_rows = [], [], []
    runs = bench_runs(run)
    for i, (label, argv, cap) in enumerate(runs):
        out = os.path.join(run.work, "bench", label)
        later = sum(min(c, 40) for _, _, c in runs[i + 1 :]) + 45  # the rest of the runs and the pipeline
        res = run.sh([run.python, "benchmarks/bench_mor_lora.py", *argv, "--out", out], f"bench-{label}.log",
                     run.cap(cap, SUMMARY_RESERVE + later))  # fmt: skip
        rows = read_bench(out, "bench_mor_lora", label)
        bench_rows += rows
        ok = sum(1 for r in rows if r.get("status") == "ok")
        lines.append(f"bench_mor_lora {label}: {ok}/{len(rows)} rows ok ({res['seconds']:.0f} s)")
        if not _ok(res):
            broken.append(f"bench_mor_lora {label} {_why(run, res)}")
        if bench_rows:
            write_rows(bench_rows, os.path.join(run.work, "bench_mor_lora.csv"))
            run.copy_in("bench_mor_lora.csv", os.path.join(run.work, "bench_mor_lora.csv"))
    pipeline_rows, pipeline_note = [], ""
    if run.have_model_deps is None:  # the install stage did not run
        _model_deps(run)
    if not run.have_model_deps:
        pipeline_note = "bench_pipeline.py needs diffusers and open_clip_torch: pass --wheels DIR (see --help)"
        lines.append(f"bench_pipeline: not run ({pipeline_note})")
    else:
        out = os.path.join(run.work, "bench", "pipeline")
        argv = (["--device", "cpu", "--reduced", "--budget", "0.02", "--min-samples", "2", "--variants", "mor:reference"]
                if run.dry else ["--device", "cuda", "--full-size"])  # fmt: skip
        res = run.sh([run.python, "benchmarks/bench_pipeline.py", *argv, "--out", out], "bench-pipeline.log",
                     run.cap(240 if run.dry else 120, SUMMARY_RESERVE))  # fmt: skip
        pipeline_rows = read_bench(out, "bench_pipeline", "pipeline")
        if pipeline_rows:
            write_rows(pipeline_rows, os.path.join(run.work, "bench_pipeline.csv"))
            run.copy_in("bench_pipeline.csv", os.path.join(run.work, "bench_pipeline.csv"))
        lines.append(f"bench_pipeline: {len(pipeline_rows)} rows ({res['seconds']:.0f} s)")
        if not _ok(res):
            broken.append(f"bench_pipeline {_why(run, res)}")
            pipeline_note = "bench_pipeline.py did not finish"
    run.goal_rows = report.goals(bench_rows, pipeline_rows, "" if bench_rows else "bench_mor_lora.py wrote no rows",
                                 pipeline_note)  # fmt: skip
    status = "error" if broken else ("dry-run" if run.dry else "passed")
    _done(run, s, start, status, "; ".join(lines + broken))


# ------------------------------------------------------------------------------------------------
# exit code


def finish(run) -> int:
    states = list(run.stages.values())
    failed = [s.name for s in states if s.status == "failed"]
    errors = [s.name for s in states if s.status == "error"]
    if not run.goal_rows:
        run.goal_rows = report.goals([], [], "the bench stage did not run", "the bench stage did not run")
    if failed:
        run.info["verdict"] = f"FAILED: a check failed in {', '.join(failed)}" + (
            f"; could not finish: {', '.join(errors)}" if errors else ""
        )
        return 1
    if errors:
        run.info["verdict"] = f"INCOMPLETE: could not finish {', '.join(errors)} (no check failed)"
        return 3
    skipped = [s.name for s in states if s.status == "skipped" and s.summary != NOT_SELECTED]
    run.info["verdict"] = ("dry run passed (CPU, not a GPU result)" if run.dry else "every stage that ran passed") + (
        f"; could not run: {', '.join(skipped)} (see why below)" if skipped else ""
    )
    return 0
