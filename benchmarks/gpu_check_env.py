#!/usr/bin/env python
"""The ``env`` stage of gpu_check.sh: the machine, as JSON (GPU name, SM count, capability, driver, clocks,
free memory, torch/triton/CUDA/cuDNN/nvcc/Python versions, the packages the tests need, the commit).

    python benchmarks/gpu_check_env.py OUT.json

Runs in its own process so that a CUDA initialisation failure is reported here, not inside the driver script.
Where the tree has no ``.git`` (a copy sent to a GPU machine), ``GPU_CHECK_COMMIT=<sha>`` names the commit.
Every probe that fails records why (``"<field>_error"``) instead of stopping the others.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys

PACKAGES = ("torch", "triton", "numpy", "pytest", "pytest-xdist", "hypothesis", "diffusers", "open_clip_torch",
            "transformers", "peft", "accelerate", "safetensors", "ftfy", "lpips", "timm", "scikit-image")  # fmt: skip
SMI_FIELDS = ("name", "driver_version", "memory.total", "memory.used", "clocks.sm", "clocks.mem", "clocks.max.sm",
              "clocks.max.mem", "power.draw", "power.limit", "temperature.gpu", "pstate")  # fmt: skip


def _cmd(args: list[str], timeout: float = 20) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout.strip()


def collect() -> dict:
    info: dict = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }

    def probe(field: str, fn) -> None:
        try:
            info[field] = fn()
        except Exception as err:  # one failing probe must not hide the others; the field says why
            info[f"{field}_error"] = f"{type(err).__name__}: {err}"[:400]

    def versions() -> dict:
        out = {}
        for name in PACKAGES:
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
        return out

    probe("packages", versions)
    probe("git_commit", lambda: _cmd(["git", "rev-parse", "HEAD"]))
    probe("git_dirty", lambda: bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"])))
    if "git_commit" not in info and os.environ.get("GPU_CHECK_COMMIT"):  # a copy of the tree without .git
        info["git_commit"] = os.environ["GPU_CHECK_COMMIT"] + " (from GPU_CHECK_COMMIT)"
    probe("nvcc", lambda: _cmd(["nvcc", "--version"]).splitlines()[-1])
    probe("compute_sanitizer", lambda: _cmd([_tool("compute-sanitizer"), "--version"]).splitlines()[-1])
    probe(
        "nvidia_smi",
        lambda: dict(
            zip(
                SMI_FIELDS,
                (
                    v.strip()
                    for v in _cmd(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"])
                    .splitlines()[0]
                    .split(",")
                ),  # fmt: skip
                strict=True,
            )
        ),
    )

    import torch

    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    probe("cudnn", lambda: torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    probe("triton", lambda: __import__("triton").__version__)
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:

        def device() -> dict:
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            return {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_total_gib": round(total / 2**30, 1),
                "memory_free_gib": round(free / 2**30, 1),
                "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                "device_count": torch.cuda.device_count(),
            }

        probe("gpu", device)
    return info


def _tool(name: str) -> str:
    """``name`` on PATH, else in ``$CUDA_HOME/bin`` or ``/usr/local/cuda/bin``."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    raise FileNotFoundError(f"{name} is not on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: gpu_check_env.py OUT.json")
    info = collect()
    tmp = argv[0] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    os.replace(tmp, argv[0])
    gpu = info.get("gpu") or {}
    print(f"env: {gpu.get('name', 'no CUDA device')}, torch {info['torch']}, CUDA {info['cuda']}, "
          f"triton {info.get('triton')}, {info['cpu_count']} CPUs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
