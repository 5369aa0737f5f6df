"""The stages of gpu_check.sh, in the order they run on a GPU: env; install (wheels, then the extension build
started in the background); kernels and the device-agnostic Triton tests while the build runs; then parity,
sanitize and bench. Each stage fills in its :class:`gpu_check.Stage` and calls ``run.record`` so that OUT_DIR
holds everything measured so far. ``--dry-run`` gives every stage its CPU fallback (see each function). Every
command's cap comes from ``run.plan`` (gpu_check_plan.py: each phase's end, split among its commands).
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import re

import gpu_check_report as report

NOT_SELECTED = "not selected (--stages)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_OPS = ("route", "dense_gate", "lora_fwd", "lora_bwd", "conv_up")
CHECK_EXTENSION = (
    "import json; from mor_kernels import _extension as e; m, why = e.load(); "
    f"ops = {CUDA_OPS!r}; "
    "print(json.dumps({'loaded': m is not None, 'why': why, "
    "'cuda_ops': [o for o in ops if m is not None and e.has_kernel(o, 'CUDA')]}))"
)


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
        finish_build(run, build)
    if "parity" in run.args.stages:
        parity_stage(run, parts)
    if "sanitize" in run.args.stages:
        sanitize_stage(run)
    if "bench" in run.args.stages:
        bench_stage(run)
    return finish(run)


def _done(run, s, start: float, status: str, summary: str, seconds: float | None = None) -> None:
    s.status, s.summary = status, summary
    s.seconds = s.seconds + run.now() - start if seconds is None else seconds
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
    s, start = run.stages["env"], run.now()
    s.cap_s = run.plan.begin("env") - start
    path = os.path.join(run.work, "env.json")
    res = run.sh([run.python, "benchmarks/gpu_check_env.py", path], "env.log", run.plan.cap("env", "env"))
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


def _extension_state(run, log: str, cap: float) -> dict:
    res = run.sh([run.python, "-c", CHECK_EXTENSION], log, cap)
    try:
        with open(res["log"]) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {"loaded": False, "why": f"the extension check {_why(run, res)}", "cuda_ops": []}


def _describe(state: dict) -> str:
    if not state["loaded"]:
        return f"mor_kernels._C not loaded: {state['why']}"
    return f"mor_kernels._C loaded, CUDA kernels for {len(state['cuda_ops'])}/{len(CUDA_OPS)} ops"


def _complete(ext: dict | None) -> bool:
    """The extension is loaded with a CUDA kernel for every op."""
    return bool(ext) and ext["loaded"] and len(ext.get("cuda_ops", [])) == len(CUDA_OPS)


def _model_deps(run, cap: float) -> str:
    """Whether diffusers and open_clip import (the model/pipeline tests and bench_pipeline.py need them)."""
    probe = run.sh([run.python, "-c", "import diffusers, open_clip"], "install-imports.log", cap)
    run.have_model_deps = _ok(probe)
    if run.have_model_deps:
        return "diffusers and open_clip import"
    return f"diffusers/open_clip missing ({run.tail(probe['log'], 1)}): pass --wheels DIR"


def install_stage(run):
    """Wheels from ``--wheels`` into a scratch ``site`` folder (put on PYTHONPATH); then the extension built in
    place for this GPU's architecture only, in the background (the process is returned; ``run.build_started``
    says when); or, with ``--no-build`` or ``--dry-run``, the extension already in the tree checked."""
    s, start = run.stages["install"], run.now()
    s.cap_s, notes = run.plan.begin("install") - start, []
    if run.args.wheels:
        wheels = sorted(glob.glob(os.path.join(run.args.wheels, "*.whl")))
        if not wheels:
            return _done(run, s, start, "error", f"--wheels {run.args.wheels} holds no *.whl")
        site = os.path.join(run.work, "site")
        cmd = [run.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
               *wheels]  # fmt: skip
        res = run.sh(cmd, "install-wheels.log", run.plan.cap("install", "wheels"))
        if not _ok(res):
            return _done(run, s, start, "error", f"pip install of {len(wheels)} wheels {_why(run, res)}")
        run.set_pythonpath([site])
        notes.append(f"{len(wheels)} wheels installed ({', '.join(os.path.basename(w).split('-')[0] for w in wheels)})")
    notes.append(_model_deps(run, run.plan.cap("install", "imports")))
    if run.dry or run.args.no_build:
        state = _extension_state(run, "install-extension.log", run.plan.cap("install", "extension"))
        run.extension = state
        why = "--dry-run: no build on the CPU" if run.dry else "--no-build"
        notes.append(f"{why}; {_describe(state)}")
        return _done(run, s, start, "dry-run" if run.dry else "passed", "; ".join(notes))
    cap = (run.envinfo.get("gpu") or {}).get("capability", "9.0")
    jobs = str(os.cpu_count() or 4)
    env = dict(run.env, TORCH_CUDA_ARCH_LIST=cap, MAX_JOBS=jobs)
    s.data["build"] = f"TORCH_CUDA_ARCH_LIST={cap} MAX_JOBS={jobs} python setup.py build_ext --inplace"
    run.say(f"  $ {s.data['build']}  (in the background, log build.log)")
    run.build_started = run.now()
    proc = run.start([run.python, "setup.py", "build_ext", "--inplace"], "build.log", env)
    s.status, s.summary = "running", "; ".join(notes) + "; building the extension in the background"
    s.seconds = run.now() - start
    run.record(s)
    return proc


def finish_build(run, proc) -> None:
    """Waits for the background build (until its own cap, or less when the later phases need the time; past
    that it is stopped) and checks that it made a CUDA kernel for every op."""
    s, start, started = run.stages["install"], run.now(), run.build_started
    s.cap_s += run.plan.begin("build") - started  # the install commands, then the build and its check
    rc, timed_out = run.wait(proc, run.plan.cap("build", "build"))
    build_s = run.now() - started
    state = _extension_state(run, "install-extension.log", run.plan.cap("build", "extension"))
    run.extension = state
    notes = s.summary.replace("; building the extension in the background", "")
    seconds = s.seconds + run.now() - started  # the build ran beside the kernels stage and Triton tests
    if rc != 0 or timed_out or not _complete(state):
        what = f"timed out after {build_s:.0f} s" if timed_out else f"exited {rc}" if rc else "finished"
        summary = f"{notes}; build {what}: {run.tail('build.log', 4)}; {_describe(state)}"
        return _done(run, s, start, "error", summary, seconds)
    _done(
        run, s, start, "passed", f"{notes}; built in {build_s:.0f} s ({s.data['build']}); {_describe(state)}", seconds
    )


# ------------------------------------------------------------------------------------------------
# kernels


def kernels_stage(run) -> None:
    s, start = run.stages["kernels"], run.now()
    s.cap_s = run.plan.begin("kernels") - start
    path = os.path.join(run.work, "kernels.csv")
    cmd = [run.python, "benchmarks/gpu_check_kernels.py", "--mode", "aot" if run.dry else "launch",
           "--cache", run.env["TRITON_CACHE_DIR"], "--csv", path]  # fmt: skip
    if run.dry:  # one Linear and one conv shape, batch 1, sample routing: the real compile, the smallest set
        cmd += ["--shapes", "lin64x1280,conv1x1-8x8x1280", "--batch", "1", "--routing", "sample"]
    res = run.sh(cmd, "kernels.log", run.plan.cap("kernels", "kernels"))
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


ANY_DEVICE = "Triton tests on the GPU (-m 'not gpu' tests/kernels/test_triton_*.py)"


def parity_triton_any_device(run) -> list[dict]:
    """GPU only, while the extension builds: the device-agnostic Triton tests (tests/kernels/test_triton_*.py
    without the ``gpu`` mark: odd sizes, zero-slot corners, every gradient), which run on the GPU when there is
    one. On the CPU they are part of the ordinary test suite (interpreter), so the dry run leaves them out. Extra
    evidence, not the parity check itself: it gets the time the later phases can spare, and a cut here is a note
    (its failures still count)."""
    if not run.gpu:
        return []
    # test_triton_gpu_compile.py is left out: it compiles every kernel ahead of time, the kernels stage's job
    files = [f for f in sorted(glob.glob("tests/kernels/test_triton_*.py", root_dir=ROOT))
             if not f.endswith("test_triton_gpu_compile.py")]  # fmt: skip
    junit = os.path.join(run.work, "parity-triton-any-device.xml")
    res = run.sh(_pytest(run, ["-m", "not gpu", *files], junit), "parity-triton-any-device.log",
                 run.plan.cap("beside-build", "triton-any-device"))  # fmt: skip
    return [{"label": ANY_DEVICE, "junit": junit, "res": res, "optional": True}]


def _cuda_note(run) -> str:
    """Why the backend 'cuda' cases skip in this run ('' when the extension has every CUDA op)."""
    ext = run.extension
    if _complete(ext):
        return ""
    if ext is None:
        return "the install stage did not run: backend 'cuda' cases use the tree's extension, or skip without it"
    why = "the extension build failed (see install)" if run.build_started is not None else "--no-build"
    return f"backend 'cuda' cases skip: {why}; {_describe(ext)}"


def parity_stage(run, parts: list[dict]) -> None:
    s, start = run.stages["parity"], run.now()
    s.cap_s = run.plan.begin("parity") - start
    env = dict(run.env)
    env.pop("MOR_REQUIRE_CUDA_BUILD", None)
    if run.gpu and _complete(run.extension):
        env["MOR_REQUIRE_CUDA_BUILD"] = "1"  # the extension has every CUDA op: a case that cannot run it fails
    junit = os.path.join(run.work, "parity-kernels-gpu.xml")
    res = run.sh(_pytest(run, ["-m", "gpu", "tests/kernels"], junit), "parity-kernels-gpu.log",
                 run.plan.cap("parity", "kernels"), env)  # fmt: skip
    parts = [{"label": "kernels: pytest -m gpu tests/kernels", "junit": junit, "res": res, "optional": False}] + parts
    junit = os.path.join(run.work, "parity-model-gpu.xml")
    res = run.sh(_pytest(run, ["-m", "gpu", "tests", "--ignore=tests/kernels"], junit, workers=False),
                 "parity-model-gpu.log", run.plan.cap("parity", "model"), env)  # fmt: skip
    parts.append({"label": "model/pipeline: pytest -m gpu tests --ignore=tests/kernels", "junit": junit, "res": res,
                  "optional": False})  # fmt: skip
    total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": None}
    lines, broken, merged = [], [], []
    for part in parts:
        label, r = part["label"], part["res"]
        cut = r["timed_out"] or r["rc"] is None
        try:
            c = report.junit_counts(part["junit"])
        except (OSError, report.ET.ParseError):
            if part["optional"] and cut:  # stopped before it wrote a report: nothing ran to completion
                lines.append(f"{label}: {_why(run, r)}; no report (a note, not a failure)")
                continue
            c = {"passed": 0, "failed": 0, "errors": 1, "skipped": 0, "failures": [(label, _why(run, r))],
                 "skip_reasons": report.collections.Counter()}  # fmt: skip
        merged.append((label, part["junit"]))
        for key in ("passed", "failed", "errors", "skipped", "failures"):
            total[key] += c[key]
        total["skip_reasons"] = (total["skip_reasons"] or report.collections.Counter()) + c["skip_reasons"]
        note = ""
        if cut and part["optional"]:
            note = ", cut at its cap: the tests it did not reach run under the interpreter in CI; a note, not a failure"
        elif cut or r["rc"] not in (0, 1):
            broken.append(f"{label} {_why(run, r)}")
            note = ", cut at its cap" if cut else ""
        lines.append(f"{label}: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                     f"{c['skipped']} skipped ({r['seconds']:.0f} s{note})")  # fmt: skip
    report.merge_junit(merged, os.path.join(run.work, "parity.xml"))
    run.copy_in("parity.xml", os.path.join(run.work, "parity.xml"))
    run.parity = total
    if run.gpu and _cuda_note(run):
        lines.append(_cuda_note(run))
    if total["failed"] or total["errors"]:
        status = "failed"
    elif broken:
        status = "error"
    elif run.dry:
        status = "dry-run"
        lines.append("on the CPU every GPU test skips: this checks the selection and the reports, not the kernels")
    else:
        status = "passed" if total["passed"] else "error"
    _done(run, s, start, status, "; ".join(lines + broken), sum(p["res"]["seconds"] for p in parts))


# ------------------------------------------------------------------------------------------------
# sanitize


def find_sanitizer() -> str | None:
    import gpu_check_env

    try:
        return gpu_check_env._tool("compute-sanitizer")
    except FileNotFoundError:
        return None


def sanitize_stage(run) -> None:
    s, start = run.stages["sanitize"], run.now()
    s.cap_s = run.plan.begin("sanitize") - start
    tool = find_sanitizer()
    program = [run.python, "benchmarks/gpu_check_sanitize.py"]
    ext = run.extension
    if ext is None:  # the install stage did not run
        ext = _extension_state(run, "sanitize-extension.log", run.plan.cap("sanitize", "extension"))
    if run.dry:
        res = run.sh([*program, "--device", "cpu"], "sanitize-cpu.log", run.plan.cap("sanitize", "cpu"))
        why = f"compute-sanitizer {'found at ' + tool if tool else 'not found'}, but no GPU"
        if not ext["loaded"]:
            return _done(run, s, start, "skipped", f"{why}; {_describe(ext)}")
        if not _ok(res):
            return _done(run, s, start, "error", f"{why}; CPU fallback {_why(run, res)}")
        return _done(run, s, start, "dry-run", f"{why}; CPU fallback: {run.tail(res['log'], 1)} (C++ kernels)")
    if tool is None:
        return _done(run, s, start, "skipped", "compute-sanitizer not found on PATH, in $CUDA_HOME/bin or "
                                                "/usr/local/cuda/bin")  # fmt: skip
    if not _complete(ext):
        return _done(run, s, start, "skipped", f"no CUDA kernels to check: {_describe(ext)}")
    lines, outcomes = [], []
    for name, extra_env in (("memcheck", {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}), ("racecheck", {})):
        # API errors are left to the program (torch raises on a failed launch); the tools judge device accesses
        cmd = [tool, "--tool", name, "--error-exitcode", "86", "--report-api-errors", "no", "--print-limit", "30",
               *program, "--device", "cuda"]  # fmt: skip
        res = run.sh(cmd, f"sanitize-{name}.log", run.plan.cap("sanitize", name), dict(run.env, **extra_env))
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


def bench_runs(run) -> list[tuple[str, list[str]]]:
    """``[(label, argv)]`` of bench_mor_lora.py: one call per group (its cap: the plan's step ``label``), so a
    call cut at its cap costs only its own rows. GPU: bf16, batch 1 and 8, fwd and fwd+bwd, every backend, CUDA graphs (the script's defaults on a
    GPU); then the zero sweep. Dry run: the smallest CPU settings."""
    if run.dry:
        cpu = ["--device", "cpu", "--batch", "1", "--dtypes", "fp32", "--token-scale", "0.25", "--budget", "0.02"]
        return [
            ("linear", [*cpu, "--shapes", "lin64x1280", "--modes", "fwd,fwd+bwd", "--sweep", "none"]),
            ("conv", [*cpu, "--shapes", "conv1x1-8x8x1280", "--modes", "fwd,fwd+bwd", "--sweep", "none"]),
            ("sweep", [*cpu, "--shapes", "lin64x1280", "--sweep-shape", "lin64x1280", "--modes", "fwd", "--sweep",
                       "zero"]),
        ]  # fmt: skip
    gpu = ["--device", "cuda", "--dtypes", "bf16", "--budget", "0.1"]  # 0.1 s of CUDA-graph replays per provider
    return [
        ("linear", [*gpu, "--batch", "1,8", "--shapes", "linear", "--modes", "fwd,fwd+bwd", "--sweep", "none"]),
        ("conv", [*gpu, "--batch", "1,8", "--shapes", "conv", "--modes", "fwd,fwd+bwd", "--sweep", "none"]),
        ("sweep", [*gpu, "--batch", "8", "--shapes", "lin1024x640", "--modes", "fwd", "--sweep", "zero"]),
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
    s, start = run.stages["bench"], run.now()
    s.cap_s = run.plan.begin("bench") - start
    lines, broken, bench_rows = [], [], []
    for label, argv in bench_runs(run):
        out = os.path.join(run.work, "bench", label)
        # each run keeps only the least of the runs after it (the plan): the linear run has the 1.15x goal
        res = run.sh([run.python, "benchmarks/bench_mor_lora.py", *argv, "--out", out], f"bench-{label}.log",
                     run.plan.cap("bench", label))  # fmt: skip
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
        _model_deps(run, run.plan.cap("bench", "imports"))
    if not run.have_model_deps:
        pipeline_note = "bench_pipeline.py needs diffusers and open_clip_torch: pass --wheels DIR (see --help)"
        lines.append(f"bench_pipeline: not run ({pipeline_note})")
    else:
        out = os.path.join(run.work, "bench", "pipeline")
        argv = (["--device", "cpu", "--reduced", "--budget", "0.02", "--min-samples", "2", "--variants", "mor:reference"]
                if run.dry else ["--device", "cuda", "--full-size"])  # fmt: skip
        res = run.sh([run.python, "benchmarks/bench_pipeline.py", *argv, "--out", out], "bench-pipeline.log",
                     run.plan.cap("bench", "pipeline"))  # fmt: skip
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
