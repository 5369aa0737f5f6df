#!/usr/bin/env python
"""GPU evidence in one command: environment, install, parity, sanitizers, compiled Triton kernels and the
benchmarks, each stage under its own time cap, in at most 8 minutes, into one folder of at most 8 files.

Run it as ``bash benchmarks/gpu_check.sh [options] OUT_DIR`` (see ``--help``); the stages are in
gpu_check_stages.py, the summary and the goals in gpu_check_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import gpu_check_plan as plan  # noqa: E402
import gpu_check_report as report  # noqa: E402
import gpu_check_stages as stages  # noqa: E402

#: every file OUT_DIR ends with (the device returns at most 8, each under 16 MB)
OUT_FILES = ("summary.md", "stages.json", "env.json", "parity.xml", "kernels.csv", "bench_mor_lora.csv",
             "bench_pipeline.csv", "logs.tar.gz")  # fmt: skip
MAX_FILE_BYTES = 15 * 2**20
MAX_LOG_BYTES = 3 * 2**20  # each log keeps its last 3 MB in logs.tar.gz
#: a command past its cap minus this grace (at most a quarter of its cap) gets SIGINT, at its cap SIGKILL
STOP_GRACE_S = 15.0
STAGE_NAMES = ("env", "install", "parity", "sanitize", "kernels", "bench")
#: the wheels the model/pipeline tests and bench_pipeline.py need beyond the GPU image (torch 2.11, Python 3.12,
#: huggingface_hub 1.33, timm, torchvision, regex, ...): pinned to versions whose requirements that image meets
WHEELS = ("diffusers==0.42.1", "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4", "importlib_metadata==10.2.0",
          "lazy-importer==0.1.0", "lpips==0.1.4")  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip

PLATFORM_ARGS = " ".join(f"--platform {p}" for p in PLATFORMS)
EPILOG = f"""
On a GPU machine, one call from the repository root (a bare image with torch, triton, nvcc and pytest):

    bash benchmarks/gpu_check.sh --wheels .whl OUT_DIR

The wheels folder, made once on a machine with PyPI (pure-Python wheels for the image's Python 3.12):

    bash benchmarks/gpu_check.sh --fetch-wheels .whl
    # = python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
    #     {PLATFORM_ARGS} \\
    #     -d .whl {" ".join(WHEELS)}

On a remote GPU machine that sends back one folder: copy the repository and .whl there, run the command
above with OUT_DIR = that folder and a 10-minute limit (the script stops itself after --budget seconds,
480 by default), and fetch the 8 files. A copy without .git: prefix GPU_CHECK_COMMIT=<sha> to name the commit. Commit them under benchmarks/results/<gpu>-<date>/ with the command
(benchmarks/README.md, "GPU check").

CPU check that the script still works (CI runs it): bash benchmarks/gpu_check.sh --dry-run OUT_DIR

Exit code: 0 every stage that ran passed; 1 a parity test or a sanitizer check failed; 3 a stage could not
finish (a crash, a failed build, a time cap reached); 2 bad usage. A stage that cannot run here (no
compute-sanitizer, no wheels for the pipeline) says why in summary.md and does not change the exit code.
"""


@dataclasses.dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | error | skipped | dry-run (ran on the CPU) | running | not run
    seconds: float = 0.0
    cap_s: float | None = None
    summary: str = ""
    data: dict = dataclasses.field(default_factory=dict)


class Runner:
    """Runs commands under time caps, keeps the logs and rewrites OUT_DIR after every stage."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.out = os.path.abspath(args.out_dir)
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.clock = time.monotonic  # a test puts a fake clock here
        self.t0 = self.now()
        self.deadline = self.t0 + args.budget
        self.stages = {name: Stage(name) for name in STAGE_NAMES}
        self.python = sys.executable
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=os.path.join(self.work, "triton-cache"))
        self.env.pop("TRITON_INTERPRET", None)
        self.set_pythonpath([])
        self.info = {"command": "bash benchmarks/gpu_check.sh " + shlex.join(sys.argv[1:]), "dry_run": self.dry,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "work": self.work}  # fmt: skip
        self.envinfo: dict = {}  # env.json
        self.gpu = False  # a CUDA device and not --dry-run
        self.extension: dict | None = None  # what the install stage found: {loaded, why, cuda_ops}
        self.have_model_deps: bool | None = None  # diffusers and open_clip import (None: not probed yet)
        self.goal_rows: list[dict] = []
        self.parity: dict = {}
        self.kernels: list[dict] = []
        self.build_started: float | None = None  # when the background extension build started
        self.plan = plan.Plan(self)  # every command's cap (gpu_check_plan.py)

    def set_pythonpath(self, extra: list[str]) -> None:
        """The repository first (its mor_kernels, with the in-place built extension), then ``extra``."""
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env["PYTHONPATH"] = os.pathsep.join([REPO, *extra, *rest])

    # time ------------------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def elapsed(self) -> float:
        return self.now() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {text}", flush=True)

    # commands --------------------------------------------------------------------------------------

    def start(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        path = os.path.join(self.logs, log)
        with open(path, "ab") as f:
            f.write(f"$ {shlex.join(cmd)}\n".encode())
            return subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def wait(self, proc: subprocess.Popen, cap: float) -> tuple[int, bool]:
        """``(returncode, timed_out)``; the command ends within ``cap`` seconds, its stop included: ``grace``
        seconds before the cap (a quarter of it, at most STOP_GRACE_S) it gets SIGINT (pytest then still writes
        its JUnit report), at the cap SIGKILL, its whole process group either way."""
        grace = min(STOP_GRACE_S, cap / 4)
        try:
            return proc.wait(timeout=max(cap - grace, 0.1)), False
        except subprocess.TimeoutExpired:
            for sig, wait_s in ((signal.SIGINT, max(grace, 0.1)), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    return proc.wait(timeout=wait_s), True
                except subprocess.TimeoutExpired:
                    continue
            return proc.wait(), True

    def sh(self, cmd: list[str], log: str, cap: float, env: dict | None = None) -> dict:
        """Runs ``cmd`` under ``cap`` seconds: ``{rc, timed_out, seconds, log}``."""
        self.say(f"  $ {shlex.join(cmd)}  (cap {cap:.0f} s, log {log})")
        start = self.now()
        if cap < 1:
            return {"rc": None, "timed_out": True, "seconds": 0.0, "log": os.path.join(self.logs, log)}
        rc, timed_out = self.wait(self.start(cmd, log, env), cap)
        return {
            "rc": rc,
            "timed_out": timed_out,
            "seconds": self.now() - start,
            "log": os.path.join(self.logs, log),
        }

    def tail(self, log: str, lines: int = 8) -> str:
        path = log if os.path.isabs(log) else os.path.join(self.logs, log)
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 20000))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return " / ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])

    # OUT_DIR ---------------------------------------------------------------------------------------

    def write(self, name: str, data: bytes) -> None:
        """Writes OUT_DIR/name atomically, refusing more than MAX_FILE_BYTES."""
        assert name in OUT_FILES, name
        if len(data) > MAX_FILE_BYTES:
            data = f"{name} was {len(data)} bytes, over the {MAX_FILE_BYTES}-byte limit; see logs.tar.gz\n".encode()
        tmp = os.path.join(self.out, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.out, name))

    def copy_in(self, name: str, path: str) -> None:
        with open(path, "rb") as f:
            self.write(name, f.read())

    def record(self, stage: Stage | None = None) -> None:
        """After each stage: stages.json, summary.md and logs.tar.gz rewritten (a run cut short keeps them)."""
        if stage is not None:
            self.say(f"{stage.name}: {stage.status}: {stage.summary}")
        present = {n for n in os.listdir(self.out) if not n.startswith(".")}
        self.info["files"] = sorted(present | {"stages.json", "summary.md", "logs.tar.gz"})
        state = {"info": self.info, "stages": [dataclasses.asdict(s) for s in self.stages.values()],
                 "goals": self.goal_rows}  # fmt: skip
        self.write("stages.json", json.dumps(state, indent=1, default=str).encode())
        self.write("summary.md", self.render().encode())
        self.pack_logs()

    def render(self) -> str:
        return report.render(self.info, [dataclasses.asdict(s) for s in self.stages.values()], self.goal_rows,
                             self.kernels, self.parity)  # fmt: skip

    def pack_logs(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for root, _, files in os.walk(self.work):
                if os.path.relpath(root, self.work).split(os.sep)[0] in ("triton-cache", "site"):
                    continue  # compiled kernels and installed wheels: large, and not evidence
                for name in sorted(files):
                    path = os.path.join(root, name)
                    size = os.path.getsize(path)
                    info = tarfile.TarInfo(os.path.relpath(path, self.work))
                    with open(path, "rb") as f:
                        f.seek(max(0, size - MAX_LOG_BYTES))
                        data = f.read()
                    info.size, info.mtime = len(data), int(time.time())
                    tar.addfile(info, io.BytesIO(data))
        self.write("logs.tar.gz", buf.getvalue())


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bash benchmarks/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="an empty or new folder for the results")
    p.add_argument("--dry-run", action="store_true", help="every stage's CPU fallback at the smallest settings")
    p.add_argument("--wheels", metavar="DIR", help="install the *.whl in DIR (--no-index --no-deps) first")
    p.add_argument("--no-build", action="store_true", help="use the extension already in the tree, if any")
    p.add_argument("--stages", default=",".join(STAGE_NAMES),
                   help=f"comma list of {','.join(STAGE_NAMES)} (env always runs)")  # fmt: skip
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 480; 1200 with --dry-run)")
    p.add_argument(
        "--work", metavar="DIR", help="scratch folder for logs, the Triton cache, wheels (default: a new temp dir)"
    )
    p.add_argument("--fetch-wheels", metavar="DIR", help="download the wheels for the GPU image into DIR and exit")
    args = p.parse_args(argv)
    if args.fetch_wheels:
        return args
    if not args.out_dir:
        p.error("OUT_DIR is required")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        p.error(f"OUT_DIR {args.out_dir} is not empty: nothing there is overwritten; give an empty or new folder")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"OUT_DIR {args.out_dir} exists and is not a folder")
    if args.wheels and not os.path.isdir(args.wheels):
        p.error(f"--wheels {args.wheels}: no such folder")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    wrong = [s for s in args.stages if s not in STAGE_NAMES]
    if wrong:
        p.error(f"--stages: unknown {wrong}; choose from {', '.join(STAGE_NAMES)}")
    if args.budget is None:
        args.budget = 1200.0 if args.dry_run else 480.0
    if args.budget <= 0:
        p.error("--budget must be positive")
    return args


def fetch_wheels(folder: str) -> int:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", folder, *WHEELS]  # fmt: skip
    print("$", shlex.join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)
    os.makedirs(args.out_dir, exist_ok=True)
    run = Runner(args)
    run.say(
        f"gpu_check{' --dry-run' if run.dry else ''}: OUT_DIR {run.out}, scratch {run.work}, budget {args.budget:.0f} s"
    )
    floor = run.plan.total_floor()
    if args.budget < floor:
        run.say(f"WARNING: --budget {args.budget:.0f} s is under the {floor:.0f} s the selected stages need at least "
                "(gpu_check_plan.py): the later commands get less than their least, or no time")  # fmt: skip
    try:
        code = stages.run_all(run)
    except KeyboardInterrupt:
        run.info["verdict"] = "interrupted"
        code = 3
    run.info["exit_code"] = code
    run.record()
    print()
    print(run.render())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
