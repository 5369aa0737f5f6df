"""Which backend runs an op, and why a faster one did not.

Backends, fastest first for each device type:

- ``"triton"``: fused Triton kernels (``mor_kernels.ops.triton_backend``); CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1`` (the interpreter is for testing, so ``"auto"`` never picks it on CPU);
- ``"cuda"``: the compiled extension's CUDA kernels (``mor_kernels.ops.extension_backend``);
- ``"cpp"``: the compiled extension's CPU kernels (same module); slower than the reference's BLAS
  GEMMs on CPU, so ``"auto"`` lists it with that reason and runs the reference;
- ``"reference"``: pure PyTorch (``mor_kernels.reference``), any device, always available.

A backend module provides the ops it implements as functions with the canonical signatures (see
``mor_kernels.functional``) and may define ``unavailable_reason(op, device) -> str | None`` for
checks that only it knows: ``unavailable_reason(op, device, dtype) -> str | None`` (kernels
registered for this device, dtype support...). ``dtype`` is the dtype of the op's main input.

``resolve`` returns a :class:`Choice` that lists every faster backend it skipped with the reason;
``explain`` renders that for a user. Nothing here touches the GPU at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger("mor_kernels")

OPS = ("route", "mor_lora", "mor_linear", "mor_conv2d")
BACKENDS = ("triton", "cuda", "cpp", "reference")
_MODULES = {
    "triton": "mor_kernels.ops.triton_backend",
    "cuda": "mor_kernels.ops.extension_backend",
    "cpp": "mor_kernels.ops.extension_backend",
    "reference": "mor_kernels.reference",
}
#: the order ``"auto"`` tries, per device type; other device types get the reference.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "triton", "reference")}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device; the message says why."""


@dataclass(frozen=True)
class Choice:
    op: str
    device: str
    dtype: torch.dtype
    backend: str
    skipped: tuple[tuple[str, str], ...]  # (faster backend, why it was not used)

    def explain(self) -> str:
        lines = [f"mor_kernels.{self.op} on {self.device} ({self.dtype}): backend {self.backend!r}"]
        lines += [f"  not {name!r}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _module(backend: str):
    """The backend's module, or the reason it cannot be imported."""
    path = _MODULES[backend]
    if importlib.util.find_spec(path) is None:
        return None, f"not implemented in this version ({path} is missing)"
    try:
        return importlib.import_module(path), None
    except ImportError as err:  # a missing dependency of the backend, e.g. triton
        return None, f"{path} could not be imported: {err}"


def unavailable_reason(
    backend: str, op: str, device: torch.device, dtype: torch.dtype = torch.float32, *, auto: bool = False
) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` for inputs of ``dtype`` (None when it can)."""
    dev = device.type
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
        if dev == "cpu" and not _interpreting():
            return "Triton needs a CUDA device; on CPU it runs only under TRITON_INTERPRET=1 (for tests)"
        if dev == "cpu" and auto:
            return "the Triton interpreter (TRITON_INTERPRET=1) is for testing and slower than the reference"
        if dev not in ("cpu", "cuda"):
            return f"Triton kernels run on CUDA devices, not {dev}"
    elif backend == "cuda" and dev != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {dev}"
    elif backend == "cpp" and dev != "cpu":
        return f"the C++ kernels run on CPU tensors, got {dev}"
    if dev == "cuda" and not torch.cuda.is_available():
        return "CUDA tensors were given but torch.cuda.is_available() is False"
    module, why = _module(backend)
    if module is None:
        return why
    if not hasattr(module, op):
        return f"{_MODULES[backend]} does not implement {op}"
    check = getattr(module, "unavailable_reason", None)
    why = check(op, device, dtype) if check is not None else None
    if why is None and backend == "cpp" and auto:
        # Measured with `benchmarks/bench_mor_lora.py --shapes linear --modes fwd,fwd+bwd --sweep none` on a
        # 2-core Xeon (1 thread, OpenMP build, commit 5e1f08d): the reference's BLAS GEMMs beat the C++
        # kernels (forward 1.24-1.89x vs 1.59-3.98x the bare base layer; fwd+bwd 1.31-1.73x vs 1.96-4.60x),
        # so they run only when asked for.
        return "the C++ kernels are slower on CPU than the reference's BLAS GEMMs; ask for backend='cpp'"
    return why


_CACHE: dict[tuple, Choice] = {}


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Choice:
    """Picks the backend for ``op`` on ``device``; raises if an explicit request cannot be met."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    device = torch.device(device)
    key = (op, backend, device.type, dtype, _interpreting())
    choice = _CACHE.get(key)
    if choice is not None:
        return choice
    if backend != "auto":
        why = unavailable_reason(backend, op, device, dtype)
        if why is not None:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot run mor_kernels.{op} on {device.type} ({dtype}): {why}"
            )
        choice = Choice(op, device.type, dtype, backend, ())
    else:
        skipped = []
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            why = unavailable_reason(name, op, device, dtype, auto=True)
            if why is None:
                choice = Choice(op, device.type, dtype, name, tuple(skipped))
                break
            skipped.append((name, why))
        else:  # unreachable while the reference is always available; kept as a clear failure
            raise BackendUnavailableError(f"no backend can run mor_kernels.{op} on {device.type}: {skipped}")
        if choice.skipped:
            logger.info(choice.explain())
        if device.type == "cuda" and choice.backend == "reference" and dtype != torch.float64:
            # the slow path on a GPU is never silent (once per op, device and dtype: decisions are cached)
            warnings.warn(
                f"no fused backend for this call, running the reference path:\n{choice.explain()}", stacklevel=3
            )
    _CACHE[key] = choice
    return choice


_LOADED: dict[str, object] = {}  # backend name -> its module, filled by _backend_name


@torch.compiler.assume_constant_result
def _backend_name(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    """The resolved backend name; a constant for torch.compile, which runs this once while tracing
    instead of tracing the import machinery."""
    name = resolve(op, backend, torch.device(device_type), dtype).backend
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_MODULES[name])
    return name


def implementation(op: str, backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The function that runs ``op`` (resolved as in :func:`resolve`)."""
    return getattr(_LOADED[_backend_name(op, backend, device.type, dtype)], op)


def explain(device="cpu", op: str = "mor_linear", dtype: torch.dtype = torch.float32) -> str:
    """What ``backend="auto"`` runs for ``op`` on ``device`` and why not each faster backend."""
    return resolve(op, "auto", torch.device(device), dtype).explain()


def available_backends(device="cpu", op: str = "mor_linear", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run ``op`` on ``device`` for ``dtype`` inputs when asked for explicitly."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, op, device, dtype) is None]


def clear_cache() -> None:
    """Forget earlier decisions (after building the extension or changing TRITON_INTERPRET)."""
    _CACHE.clear()
