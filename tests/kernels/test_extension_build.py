"""The compiled extension mor_kernels._C: it loads, its kernels are registered, the backend explains itself.

With ``MOR_REQUIRE_CUDA_BUILD=1`` (set by ``.ci/run``) a build without the CUDA kernels fails here, so a CUDA
compile problem cannot hide behind a CPU-only build.
"""

from __future__ import annotations

import os

import pytest
import torch

from mor_kernels import _extension, dispatch

OPS = ("dense_gate", "route", "lora_fwd", "lora_bwd", "conv_up")
REQUIRE_CUDA = os.environ.get("MOR_REQUIRE_CUDA_BUILD", "0") not in ("", "0")

_C, WHY = _extension.load()
needs_extension = pytest.mark.skipif(_C is None and not REQUIRE_CUDA, reason=f"the extension is not built here ({WHY})")


def test_extension_loads_when_required():
    if not REQUIRE_CUDA:
        pytest.skip("MOR_REQUIRE_CUDA_BUILD is not set (only CI demands the CUDA build)")
    assert _C is not None, WHY


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_required(op):
    if not REQUIRE_CUDA:
        pytest.skip("MOR_REQUIRE_CUDA_BUILD is not set (only CI demands the CUDA build)")
    assert _C is not None, WHY
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mor::{op}", "CUDA"), (
        f"mor::{op} has no CUDA kernel: mor_kernels._C was built without its CUDA sources"
    )


@needs_extension
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert _C is not None, WHY
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mor::{op}", "CPU")
    assert _extension.has_kernel(op, "CPU")


@needs_extension
def test_cpp_backend_is_available_but_not_auto_on_cpu():
    """The C++ loop kernels are correct but slower than the reference and the BLAS path on CPU: "auto" says so
    (and runs the BLAS path for the layers, the reference for mor_lora and route)."""
    dispatch.clear_cache()
    for op in dispatch.OPS:
        choice = dispatch.resolve(op, "auto", torch.device("cpu"), torch.float32)
        assert choice.backend == ("blas" if op in ("mor_linear", "mor_conv2d") else "reference")
        assert "slower" in dict(choice.skipped)["cpp"]
        assert "cpp" in dispatch.available_backends("cpu", op)
        assert dispatch.resolve(op, "cpp", torch.device("cpu"), torch.float32).backend == "cpp"


@needs_extension
def test_unavailable_reasons():
    from mor_kernels.ops import extension_backend as eb

    assert eb.unavailable_reason("mor_lora", torch.device("cpu"), torch.float32) is None
    assert eb.unavailable_reason("mor_conv2d", torch.device("cpu"), torch.bfloat16) is None
    why = eb.unavailable_reason("mor_linear", torch.device("cpu"), torch.float64)
    assert why is not None and "float64 unsupported" in why
    why = eb.unavailable_reason("route", torch.device("meta"), torch.float32)
    assert why is not None and "meta" in why
    dispatch.clear_cache()
    # float64 on CPU falls back to the reference, and says why
    choice = dispatch.resolve("mor_lora", "auto", torch.device("cpu"), torch.float64)
    assert choice.backend == "reference"
    assert any(name == "cpp" and "float64" in why for name, why in choice.skipped)
    with pytest.raises(dispatch.BackendUnavailableError, match="float64 unsupported"):
        dispatch.resolve("mor_lora", "cpp", torch.device("cpu"), torch.float64)
    if not _extension.has_kernel("lora_fwd", "CUDA"):
        why = eb.unavailable_reason("mor_lora", torch.device("cuda"), torch.float32)
        assert why is not None and "CUDA kernels not compiled in" in why


def test_failed_load_names_the_torch_it_was_built_for(monkeypatch):
    """An extension built against another torch cannot load; the reason says which torch it wants."""

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10whatever")

    monkeypatch.setattr(_extension.importlib, "import_module", broken)
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch": "0.0.1", "cuda": None})
    module, why = _extension.load.__wrapped__()
    assert module is None
    assert "undefined symbol" in why and "built against torch 0.0.1" in why and torch.__version__ in why
    assert "--no-build-isolation" in why


def test_the_required_ops_are_those_the_sources_define():
    """``_extension.OPS`` (what a loaded _C must have) is the list of ops csrc/registration.cpp defines."""
    import re
    from pathlib import Path

    source = (Path(__file__).parents[2] / "csrc" / "registration.cpp").read_text()
    assert set(_extension.OPS) == set(re.findall(r'm\.def\("([a-z_0-9]+)\(', source))


@needs_extension
def test_an_extension_older_than_the_sources_is_not_used(monkeypatch):
    """A _C built before an op was added (sources pulled, extension not rebuilt) is refused with a reason that
    names the missing op and how to rebuild, instead of failing later when a fake or a call needs the op."""
    monkeypatch.setattr(_extension, "OPS", (*_extension.OPS, "op_from_newer_sources"))
    module, why = _extension.load.__wrapped__()
    assert module is None
    assert "older than these sources" in why and "mor::op_from_newer_sources" in why and "rebuild" in why
    assert "mor::route" not in why  # only the missing ones are named


@needs_extension
def test_build_info_is_installed_with_the_extension():
    info = _extension.build_info()
    assert info is not None and info["torch"] == torch.__version__
    if REQUIRE_CUDA:
        assert info["cuda"] == torch.version.cuda


@needs_extension
def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for in the C++ kernels is only parallel when compiled with OpenMP."""
    import shutil
    import subprocess

    if shutil.which("nm") is None:
        pytest.skip("binutils' nm is not installed: cannot list the extension's symbols")
    symbols = subprocess.run(["nm", "-D", _C.__file__], capture_output=True, text=True, check=True).stdout
    assert "GOMP_parallel" in symbols


@needs_extension
def test_fakes_come_with_the_extension_not_the_backend_module(tmp_path):
    """torch.ops.mor.* trace with fake tensors as soon as the extension is loaded (direct use, no backend
    module imported): checked in a fresh interpreter."""
    import subprocess
    import sys

    import mor_kernels

    code = (
        "import sys, torch\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "from mor_kernels import _extension\n"
        "assert _extension.load()[0] is not None\n"
        "assert 'mor_kernels.ops.extension_backend' not in sys.modules\n"
        "with FakeTensorMode():\n"
        "    x, a, b = torch.empty(2, 5, 8), torch.empty(4, 8), torch.empty(6, 4)\n"
        "    idx, gate = torch.zeros(2, 2, dtype=torch.int32), torch.empty(2, 2)\n"
        "    y, h = torch.ops.mor.lora_fwd(x, a, b, idx, gate, 2, 1.0, None)\n"
        "assert tuple(y.shape) == (2, 5, 6) and tuple(h.shape) == (2, 5, 4)\n"
    )
    # The child imports the mor_kernels this process imported (after `pip install .`, the installed copy and its
    # _C), not the source tree that `python -c` would put first when run from the repository root.
    root = os.path.dirname(os.path.dirname(os.path.abspath(mor_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
