"""Build logic for the compiled extension ``mor_kernels._C`` (metadata lives in pyproject.toml).

What gets built is decided from the CUDA toolkit and the torch build, never from
``torch.cuda.is_available()``, so a build box with nvcc and no GPU still builds the CUDA kernels:

- torch importable, a CUDA build of torch and a CUDA toolkit found -> CUDAExtension (C++ CPU kernels
  and ``csrc/cuda/*.cu``);
- torch importable otherwise, or ``MOR_SKIP_CUDA_BUILD=1`` -> CppExtension (CPU kernels only);
- torch not importable (e.g. ``pip install .`` with build isolation) -> the pure-Python package;
  install torch first and build with ``pip install --no-build-isolation .``.

Environment: ``MOR_SKIP_CUDA_BUILD=1``, ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX"), ``MAX_JOBS``,
``CUDA_HOME``. Every decision is printed with its reason. Nothing is downloaded.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"
# Headers that torch's CUDA headers include and that a slim toolkit may lack; the nvidia pip wheels
# (installed with a CUDA build of torch) carry them.
WHEEL_HEADERS = ("cusparse.h", "cublas_v2.h", "cusolverDn.h", "curand.h", "cufft.h", "cudnn.h")


def say(msg: str) -> None:
    print(f"[mor_kernels build] {msg}", file=sys.stderr, flush=True)


def _toolkit_ok(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_reported_home() -> str | None:
    """The toolkit nvcc itself uses (``TOP`` in its dry run), which sees through wrapper scripts."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(os.path.join(match.group(1).strip(), "..")) if match else None


def find_cuda_home() -> str | None:
    """Checks torch's way of guessing CUDA_HOME and falls back when the guess has no headers."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((f"${var}", os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(("the nvcc on PATH (torch's guess)", os.path.dirname(os.path.dirname(nvcc))))
    candidates.append(("the standard install folder", "/usr/local/cuda"))
    candidates.append(("the folder nvcc reports", None))
    for source, path in candidates:
        if path is None:
            path = _nvcc_reported_home()
        if _toolkit_ok(path):
            say(f"CUDA toolkit: {path} (from {source})")
            return path
        if path:
            say(f"not using {path} as CUDA_HOME (from {source}): it has no include/cuda_runtime.h")
    return None


def wheel_include_dirs(cuda_home: str) -> list[str]:
    """Include folders of the nvidia pip wheels for headers the toolkit lacks."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    toolkit_dirs = [os.path.join(cuda_home, "include")] + glob.glob(os.path.join(cuda_home, "targets", "*", "include"))
    dirs: list[str] = []
    for header in WHEEL_HEADERS:
        if any(os.path.isfile(os.path.join(d, header)) for d in toolkit_dirs + dirs):
            continue
        for root in roots:
            found = sorted(glob.glob(os.path.join(root, "*", "include", header)))
            if found:
                dirs.append(os.path.dirname(found[0]))
                break
    return dirs


def extension_modules():
    try:
        import torch  # noqa: F401
    except ImportError:
        say(
            "torch is not importable here (build isolation?): building without mor_kernels._C. "
            "Install torch, then `pip install --no-build-isolation .` to build the extension."
        )
        return [], {}

    import torch

    cuda_home = None
    if os.environ.get("MOR_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        say("MOR_SKIP_CUDA_BUILD is set: building the C++ CPU kernels only")
    elif torch.version.cuda is None:
        say(f"torch {torch.__version__} is not a CUDA build: building the C++ CPU kernels only")
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            say("no CUDA toolkit found (set CUDA_HOME): building the C++ CPU kernels only")
        else:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    if cuda_home is None:
        ext = CppExtension("mor_kernels._C", sources, extra_compile_args={"cxx": cxx})
    else:
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        includes = wheel_include_dirs(cuda_home)
        if includes:
            say(f"headers from the nvidia wheels: {includes}")
        nvcc = ["-O3", "-lineinfo", "-DMOR_WITH_CUDA"]
        ext = CUDAExtension(
            "mor_kernels._C",
            sources + cu_sources,
            include_dirs=includes,
            extra_compile_args={"cxx": cxx + ["-DMOR_WITH_CUDA"], "nvcc": nvcc},
        )
        say(
            f"CUDA {torch.version.cuda} build for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: "
            f"{len(cu_sources)} CUDA source(s)"
        )
    say(
        f"mor_kernels._C from {len(ext.sources)} source(s): {', '.join(ext.sources)}"
        f" (MAX_JOBS={os.environ.get('MAX_JOBS', 'ninja default')})"
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":
    os.chdir(ROOT)
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
