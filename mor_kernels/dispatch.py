"""Which backend runs an op, and why a faster one did not; and, per call, whether merged inference runs.

Backends:

- ``"triton"``: fused Triton kernels (``mor_kernels.ops.triton_backend``); CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1`` (the interpreter is for testing, so ``"auto"`` never picks it on CPU);
- ``"cuda"``: the compiled extension's CUDA kernels (``mor_kernels.ops.extension_backend``);
- ``"cpp"``: the compiled extension's CPU kernels (same module): the oracle-independent CPU twin of the
  CUDA kernels, for tests; measured slower than the reference on CPU, so ``"auto"`` does not offer it
  (:data:`DECISIONS`);
- ``"blas"``: the compiled extension's BLAS CPU path (``mor_kernels.ops.cpu_blas``): one C++ op per call, host
  rank lists and gathers in C++, the GEMMs in ATen's BLAS; ``mor_linear``/``mor_conv2d`` only; the fastest
  measured path on CPU (:data:`DECISIONS`);
- ``"reference"``: pure PyTorch (``mor_kernels.reference``), any device, always available: the test oracle,
  and the CPU path when the extension is not built (each sample's active ranks gathered).

``"auto"`` tries the backends of :data:`DECISIONS` for the device type and dtype in order; each entry
cites the measurement behind it. On top of the backend, :func:`merge_plan` decides per call whether a
sample-routed inference call folds its active ranks into per-sample merged weights
(:mod:`mor_kernels.reference.merged`), from a cost model with the crossover measured per device type
(:data:`MERGE_CROSSOVER`).

A backend module provides the ops it implements as functions with the canonical signatures (see
``mor_kernels.functional``) and may define ``unavailable_reason(op, device, dtype) -> str | None`` for
checks that only it knows (kernels registered for this device, dtype support...). ``dtype`` is the
dtype of the op's main input.

``resolve`` returns a :class:`Choice` that lists every backend it skipped with the reason; ``explain``
renders that for a user. Nothing here touches the GPU at import time.
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
BACKENDS = ("triton", "cuda", "cpp", "blas", "reference")
_MODULES = {
    "triton": "mor_kernels.ops.triton_backend",
    "cuda": "mor_kernels.ops.extension_backend",
    "cpp": "mor_kernels.ops.extension_backend",
    "blas": "mor_kernels.ops.cpu_blas",
    "reference": "mor_kernels.reference",
}


@dataclass(frozen=True)
class Decision:
    """What ``"auto"`` tries for ``device`` type and ``dtypes``, in order, and the measurement behind it."""

    device: str
    dtypes: tuple[torch.dtype, ...]
    order: tuple[str, ...]
    measured: str


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CPU_RUN = (
    "benchmarks/bench_mor_lora.py default run (fp32, batch 1, sample routing, 1 thread) on the 2-core Xeon of "
    "benchmarks/README.md"
)
#: The measured decisions behind ``"auto"``, first match wins (device type, dtypes -> backends in order).
DECISIONS = (
    Decision(
        "cpu",
        _FLOATS,
        ("blas", "reference"),
        f"{_CPU_RUN}, commit 4c9d0f0 (load 5.1; ratios to the bare layer, same run): mor:blas "
        "1.25/1.15/1.07/1.16/1.08/1.25x forward and 1.30/1.19/1.18/1.24/1.10/1.44x fwd+bwd at "
        "lin4096x320/lin1024x640/lin256x1280/lin64x1280/conv3x3-32x32x640/conv1x1-64x64x320 against mor:reference's "
        "1.48/1.38/1.27/1.47/1.12/1.45x and 1.93/1.61/1.45/1.60/1.13/1.78x; zero sweep 1.14-1.19x against "
        "1.35-1.44x. Faster at every shape and mode, here and in three more runs of the same command (loads "
        "2.4-4.8), so the BLAS path comes first for mor_linear/mor_conv2d; the reference runs the rest (mor_lora, "
        "route, token routing, and every op without the extension). The C++ loop kernels (mor:cpp) ran 1.22-3.48x "
        "forward and 1.35-4.15x fwd+bwd, slower than both at every shape: they are the CUDA kernels' CPU twin for "
        "tests (backend='cpp'), not a speed path. fp16/bf16 on CPU: both compute in float32 (not measured apart)",
    ),
    Decision(
        "cuda",
        _FLOATS,
        ("triton", "cuda", "reference"),
        "design order (fused Triton first, then the extension's CUDA kernels); not measured yet: no GPU run "
        "is committed (benchmarks/gpu_check.sh records one)",
    ),
)
#: backends ``"auto"`` leaves out for a device type, with the reason (listed by ``explain``)
_NOT_OFFERED = {
    "cpu": {
        "cpp": "measured slower than the reference and the BLAS path on CPU (see the decision); the C++ loop kernels "
        "are the CUDA kernels' CPU twin for tests: ask for backend='cpp'",
        "triton": None,  # the interpreter (a test path): unavailable_reason says why
    },
}


def decision(device_type: str, dtype: torch.dtype) -> Decision | None:
    """The measured decision for ``device_type`` and ``dtype`` (None: other devices get the reference)."""
    return next((d for d in DECISIONS if d.device == device_type and dtype in d.dtypes), None)


#: Merged inference: a sample's merged weight ``W0 + scaling B diag(g) A`` costs a pass over a weight-sized
#: tensor; the low-rank path costs passes over the sample's activations (two skinny GEMMs, or a rank conv
#: and a 1x1 up-projection). Merging wins when
#:     rho = T (C_in + C_out) / (C_in kh kw C_out)          (T tokens per sample; a Linear has kh = kw = 1)
#: exceeds the crossover measured for the device type and layer kind (:func:`merge_kind`: "linear",
#: "conv1x1", "conv" for larger kernels), with the measurement. No entry: "auto" never merges there.
MERGE_CROSSOVER = {
    ("cpu", "linear"): 1.2,
    ("cpu", "conv1x1"): 1.2,
    ("cpu", "conv"): 0.5,
}
MERGE_MEASURED = {
    "cpu": "benchmarks/bench_mor_lora_merge.py on the 2-core Xeon (fp32, batch 1, 16 active ranks, 1 thread, load "
    "0.3-0.8, commit 168940b plus this table's change), the low-rank path being the BLAS op the model runs: merged over "
    "low-rank crossed 1 at rho 0.96 (Linear 320) and 1.53 (Linear 640; Linear 1280 not up to rho 0.4), 0.88 and 1.66 "
    "(1x1 conv 320, 640), 0.60 (3x3 conv 320; 640 and 1280 not up to rho 0.36); per layer of the SD 2.1 UNet at a "
    "32x32 latent the 3x3 convs merged faster from rho 0.47 (320 -> 320/640/960 inputs) and slower at 0.36 (640)",
}
MERGE_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class MergePlan:
    """Whether a call runs per-sample merged weights, and why (one line)."""

    merge: bool
    why: str


def merge_kind(kernel: tuple[int, ...] = ()) -> str:
    """``"linear"`` (no kernel), ``"conv1x1"`` or ``"conv"`` (a larger kernel)."""
    if not kernel:
        return "linear"
    return "conv1x1" if all(k == 1 for k in kernel) else "conv"


def merge_rule(device_type: str) -> str:
    """The merge rule of ``merge="auto"`` on ``device_type``, for :meth:`Choice.explain`."""
    limits = {kind: MERGE_CROSSOVER.get((device_type, kind)) for kind in ("linear", "conv1x1", "conv")}
    if all(v is None for v in limits.values()):
        return (
            f"not by 'auto' on {device_type} (no measured crossover; merge='always' forces it); sample routing, "
            "inference only"
        )
    shown = ", ".join(f"{v:g} ({k})" for k, v in limits.items() if v is not None)
    return (
        f"sample routing, no gradient needed, and rho = T (C_in + C_out) / (C_in kh kw C_out) > {shown} "
        f"(measured: {MERGE_MEASURED.get(device_type, '?')})"
    )


def merge_plan(
    device_type: str,
    tokens: int,
    c_in: int,
    c_out: int,
    *,
    kernel: tuple[int, ...] = (),
    mode: str = "auto",
    backend: str = "auto",
    token_routing: bool = False,
    needs_grad: bool = False,
) -> MergePlan:
    """Whether a MoR call runs per-sample merged weights (``mode``: ``"auto"`` = the cost model, with
    ``backend="auto"`` only; ``"always"``; ``"never"``). ``tokens`` per sample (output pixels of a conv),
    ``kernel`` the conv's ``(kh, kw)`` (empty for a Linear). Gradients and token routing never merge."""
    if mode not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {mode!r}")
    if mode == "never":
        return MergePlan(False, "merge='never'")
    if token_routing:
        return MergePlan(False, "token routing: the ranks differ per token")
    if needs_grad:
        return MergePlan(False, "a gradient is needed: merged weights are for inference only")
    if torch.compiler.is_compiling():
        return MergePlan(False, "torch.compile is tracing (the merge decides on host values)")
    if mode == "always":
        return MergePlan(True, "merge='always'")
    if backend != "auto":
        return MergePlan(False, f"backend={backend!r} was asked for (merge='auto' applies to backend='auto')")
    kind = merge_kind(kernel)
    limit = MERGE_CROSSOVER.get((device_type, kind))
    if limit is None:
        return MergePlan(False, f"no measured merge crossover for a {kind} layer on {device_type}")
    taps = 1
    for k in kernel:
        taps *= k
    rho = tokens * (c_in + c_out) / max(c_in * taps * c_out, 1)
    verdict = ">" if rho > limit else "<="
    return MergePlan(
        rho > limit, f"rho = T (C_in + C_out) / (C_in kh kw C_out) = {rho:.2f} {verdict} {limit:g} ({kind})"
    )


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device; the message says why."""


@dataclass(frozen=True)
class Choice:
    op: str
    device: str
    dtype: torch.dtype
    backend: str
    skipped: tuple[tuple[str, str], ...]  # (backend, why it was not used)
    measured: str = ""  # the measurement behind an "auto" decision

    def explain(self) -> str:
        lines = [f"mor_kernels.{self.op} on {self.device} ({self.dtype}): backend {self.backend!r}"]
        lines += [f"  not {name!r}: {why}" for name, why in self.skipped]
        if self.measured:
            lines.append(f"  measured: {self.measured}")
        if self.op in ("mor_linear", "mor_conv2d"):
            lines.append(f"  merged inference: {merge_rule(self.device)}")
        if self.op in ("mor_linear", "mor_conv2d") and self.backend == "blas":
            lines.append(f"  rank work: {importlib.import_module(_MODULES['blas']).rank_kernels()}")
        if self.op == "mor_linear" and self.backend == "blas":
            lines.append("  token routing: the reference's masked all-rank path (the BLAS path gathers per sample)")
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
        found = decision(device.type, dtype)
        order = found.order if found else ("reference",)
        for name, not_offered in _NOT_OFFERED.get(device.type, {}).items():
            why = unavailable_reason(name, op, device, dtype, auto=True) or not_offered  # it cannot run, or not faster
            if why is not None:
                skipped.append((name, why))
        for name in order:
            why = unavailable_reason(name, op, device, dtype, auto=True)
            if why is None:
                choice = Choice(op, device.type, dtype, name, tuple(skipped), found.measured if found else "")
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


class _Loaded:
    """Backend name -> its module, as attributes, set by :func:`_backend_name`. Not a dict: while
    ``torch.compile`` traces, a dict read before ``_backend_name`` ran would be the snapshot dynamo took of it
    (a backend imported during the trace missing: ``KeyError`` in the first compiled forward of a model),
    while an object's attributes are read from the object itself."""


_LOADED = _Loaded()


@torch.compiler.assume_constant_result
def _backend_name(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    """The resolved backend name; a constant for torch.compile, which runs this once while tracing
    instead of tracing the import machinery."""
    name = resolve(op, backend, torch.device(device_type), dtype).backend
    if not hasattr(_LOADED, name):
        setattr(_LOADED, name, importlib.import_module(_MODULES[name]))
    return name


def implementation(op: str, backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The function that runs ``op`` (resolved as in :func:`resolve`)."""
    return getattr(getattr(_LOADED, _backend_name(op, backend, device.type, dtype)), op)


def prepared_implementation(op: str, backend: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """:func:`implementation` for calls whose arguments of the same kinds already passed the public op's checks,
    in one dtype with ``idx`` int32, nothing to differentiate and no autocast: the backend's ``<op>_prepared``
    where it has one (it skips the conversions such calls do not need), else its ``op``."""
    module = getattr(_LOADED, _backend_name(op, backend, device.type, dtype))
    return getattr(module, f"{op}_prepared", None) or getattr(module, op)


def explain(device="cpu", op: str = "mor_linear", dtype: torch.dtype = torch.float32) -> str:
    """What ``backend="auto"`` runs for ``op`` on ``device`` and why not each faster backend."""
    return resolve(op, "auto", torch.device(device), dtype).explain()


def available_backends(device="cpu", op: str = "mor_linear", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run ``op`` on ``device`` for ``dtype`` inputs when asked for explicitly."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, op, device, dtype) is None]


#: the public ops' lean CPU path (:func:`lean_plan`), cached with the decisions
_LEAN: dict[tuple, tuple[float, float] | None] = {}


def lean_plan(op: str, backend: str, merge: str, dtype: torch.dtype) -> tuple[float, float] | None:
    """For a sample-routed ``op`` (``"mor_linear"``/``"mor_conv2d"``) on CPU tensors of ``dtype``: when ``backend``
    resolves to ``"blas"``, :func:`merge_plan`'s rule for ``merge`` as the C++ op's ``merge_above`` (the op merges
    when ``rho`` exceeds it and no gradient is needed): ``(limit for a Linear or 1x1 kernel, limit for a larger
    kernel)``, ``inf`` = never, ``-1`` = always; else None. Cached per (op, backend, merge, dtype) with the
    decisions, so a call decides with one dict lookup."""
    key = (op, backend, merge, dtype)
    try:
        return _LEAN[key]
    except KeyError:
        pass
    plan = None
    if merge in MERGE_MODES and backend in ("auto", "blas") and op in ("mor_linear", "mor_conv2d"):
        try:
            runs = resolve(op, backend, torch.device("cpu"), dtype).backend
        except BackendUnavailableError:
            runs = None
        if runs == "blas":
            never = float("inf")
            if merge == "never" or (merge == "auto" and backend != "auto"):
                plan = (never, never)
            elif merge == "always":
                plan = (-1.0, -1.0)
            else:
                kinds = ("linear", "linear") if op == "mor_linear" else ("conv1x1", "conv")
                plan = tuple(MERGE_CROSSOVER.get(("cpu", kind), never) for kind in kinds)
    _LEAN[key] = plan
    return plan


_GENERATION = [0]  # bumped by clear_cache: callers that keep plans of their own key them on it


def generation() -> int:
    """How many times :func:`clear_cache` ran: part of the key of plans kept outside this module (the MoR
    layers' per-size inference plans, ``mor_model.inference``), so clearing the cache forgets those too."""
    return _GENERATION[0]


def clear_cache() -> None:
    """Forget earlier decisions (after building the extension or changing TRITON_INTERPRET)."""
    _CACHE.clear()
    _LEAN.clear()
    _GENERATION[0] += 1
