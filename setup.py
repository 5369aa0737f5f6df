"""Build logic for the compiled extension ``mor_kernels._C`` (metadata lives in pyproject.toml).

What gets built is decided from the CUDA toolkit and the torch build, never from
``torch.cuda.is_available()``, so a build box with nvcc and no GPU still builds the CUDA kernels:

- torch importable, a CUDA build of torch and a CUDA toolkit found -> CUDAExtension (C++ CPU kernels
  and ``csrc/cuda/*.cu``);
- torch importable otherwise, or ``MOR_SKIP_CUDA_BUILD=1`` -> CppExtension (CPU kernels only);
- torch not importable (``--no-build-isolation`` without torch installed) -> the pure-Python package.

torch is a build requirement in pyproject.toml, so a plain ``pip install .`` builds the extension in
pip's isolated build environment; ``pip install --no-build-isolation .`` builds it against the torch
that is installed, which is what must run it (``_C_build.json`` records the build's versions).

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
BUILD_INFO = "_C_build.json"  # torch/CUDA versions the extension was built with (read by mor_kernels._extension)
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
    # TOP is already the toolkit root (nvcc prints it as ``<home>/bin/..``)
    return os.path.normpath(match.group(1).strip()) if match else None


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
    """Include folders for the headers the toolkit lacks, taken from the nvidia pip wheels.

    A wheel's include folder also holds its own copy of the CUDA runtime headers (``cuda_runtime.h``...),
    which must not shadow the toolkit's (user include folders come first). So the headers the toolkit
    does not have are linked into ``build/mor_cuda_headers/<wheel>`` and only that folder is added."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    toolkit_dirs = [os.path.join(cuda_home, "include")] + glob.glob(os.path.join(cuda_home, "targets", "*", "include"))
    wheel_dirs: list[str] = []
    for header in WHEEL_HEADERS:
        if any(os.path.isfile(os.path.join(d, header)) for d in toolkit_dirs):
            continue
        for root in roots:
            found = sorted(glob.glob(os.path.join(root, "*", "include", header)))
            if found:
                if os.path.dirname(found[0]) not in wheel_dirs:
                    wheel_dirs.append(os.path.dirname(found[0]))
                break
    dirs = []
    for i, wheel_dir in enumerate(wheel_dirs):
        shadow = os.path.join(ROOT, "build", "mor_cuda_headers", str(i))
        shutil.rmtree(shadow, ignore_errors=True)
        for src in glob.glob(os.path.join(wheel_dir, "**", "*"), recursive=True):
            rel = os.path.relpath(src, wheel_dir)
            if os.path.isfile(src) and not any(os.path.exists(os.path.join(d, rel)) for d in toolkit_dirs):
                os.makedirs(os.path.dirname(os.path.join(shadow, rel)), exist_ok=True)
                os.symlink(src, os.path.join(shadow, rel))
        say(f"headers the toolkit lacks, from {wheel_dir}: linked into {shadow}")
        dirs.append(shadow)
    return dirs


def nvcc_version(cuda_home: str) -> str | None:
    """``major.minor`` of ``<cuda_home>/bin/nvcc`` (None when it does not run)."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def openmp_flags() -> list[str]:
    """``-fopenmp`` for gcc/clang: ATen's ``at::parallel_for`` in our C++ kernels is only parallel when
    compiled with OpenMP (torch's own libgomp is reused at run time)."""
    return [] if sys.platform in ("win32", "darwin") else ["-fopenmp"]


def build_ext_class(base):
    """``base`` (torch's BuildExtension) that also writes ``_C_build.json`` (torch/CUDA versions and
    architectures the extension was built for) beside the built library, so a failed load can say
    that the extension belongs to another torch."""
    import json

    import torch

    class BuildExt(base):
        def _info_paths(self, ext):
            """(in the build folder, in the source tree) paths of the build info file of ``ext``."""
            package = ext.name.rpartition(".")[0]
            built = os.path.join(self.build_lib, *package.split("."), BUILD_INFO)
            package_dir = self.get_finalized_command("build_py").get_package_dir(package)
            return built, os.path.join(package_dir, BUILD_INFO)

        def build_extension(self, ext):
            super().build_extension(ext)
            info = {
                "torch": torch.__version__,
                "cuda": torch.version.cuda if any(src.endswith(".cu") for src in ext.sources) else None,
                "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            }
            path = self._info_paths(ext)[0]
            with open(path, "w") as f:
                json.dump(info, f)
            say(f"wrote {path}: {info}")

        # the info file travels with the library: wheels, --inplace and editable installs
        def get_outputs(self):
            return super().get_outputs() + ([] if self.inplace else [self._info_paths(e)[0] for e in self.extensions])

        def _get_output_mapping(self):
            yield from super()._get_output_mapping()
            if self.inplace:
                yield from (self._info_paths(e) for e in self.extensions)

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            for ext in self.extensions:
                self.copy_file(*self._info_paths(ext), level=self.verbose)

    return BuildExt


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
            found = nvcc_version(cuda_home)
            say(f"nvcc {found} in {cuda_home}; torch {torch.__version__} was built with CUDA {torch.version.cuda}")
            if found is None:
                say(f"{cuda_home}/bin/nvcc does not run: building the C++ CPU kernels only")
                cuda_home = None
            elif found.split(".")[0] != torch.version.cuda.split(".")[0]:
                raise RuntimeError(
                    f"nvcc {found} ({cuda_home}) and torch's CUDA {torch.version.cuda} differ in the major version, "
                    "which torch's extension builder refuses: point CUDA_HOME at a CUDA "
                    f"{torch.version.cuda.split('.')[0]}.x toolkit, or set MOR_SKIP_CUDA_BUILD=1 for the CPU kernels only"
                )
            else:
                os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    cxx = ["-O3", *openmp_flags()]
    link = openmp_flags()
    if cuda_home is None:
        ext = CppExtension(
            "mor_kernels._C", sources, depends=headers, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    else:
        cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        includes = wheel_include_dirs(cuda_home)
        nvcc = ["-O3", "-lineinfo", "-DMOR_WITH_CUDA"]
        ext = CUDAExtension(
            "mor_kernels._C",
            sources + cu_sources,
            depends=headers,
            include_dirs=includes,
            extra_compile_args={"cxx": cxx + ["-DMOR_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
        say(
            f"CUDA {torch.version.cuda} build for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}: "
            f"{len(cu_sources)} CUDA source(s)"
        )
    say(
        f"mor_kernels._C from {len(ext.sources)} source(s): {', '.join(ext.sources)}"
        f" (MAX_JOBS={os.environ.get('MAX_JOBS', 'ninja default')})"
    )
    build_ext = build_ext_class(BuildExtension).with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


if __name__ == "__main__":
    os.chdir(ROOT)
    ext_modules, cmdclass = extension_modules()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
