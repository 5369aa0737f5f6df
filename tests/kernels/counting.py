"""What one call of a MoR op does, counted on the CPU (used by tests/kernels/test_op_counts.py): the Triton
launches it makes (under the interpreter, or compiled on a GPU), the aten ops it issues itself and the bytes
they allocate, from the torch profiler.

- A Triton launch is recorded by wrapping the launcher of ``@triton.jit`` functions; everything the
  interpreter does inside a launch (copies to its host buffers) is left out.
- The aten ops of a call are the outermost ``aten::`` events of the profile (custom ops ``mor::*``, autograd
  Functions and the autograd engine are containers, seen through); views, allocations and casts or
  ``contiguous`` calls that copy nothing are not kernels and are not counted as ops.
- Bytes allocated: every allocation the profiler sees outside a Triton launch (``profile_memory``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

LAUNCH = "triton_launch::"
#: aten ops that move no data (views, allocations, metadata) and are never kernels
NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::permute", "aten::transpose", "aten::t",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::alias", "aten::detach", "aten::flatten", "aten::unflatten", "aten::movedim", "aten::narrow",
    "aten::split", "aten::chunk", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::is_nonzero", "aten::_unsafe_view", "aten::contiguous", "aten::to",
    "aten::type_as", "aten::view_as", "aten::expand_as", "aten::set_",
}  # fmt: skip
#: of those, the ones that are a copy kernel when they copy (a ``copy_`` below them)
COPY_WHEN_NEEDED = {"aten::contiguous", "aten::to", "aten::type_as", "aten::reshape", "aten::flatten"}


@dataclass
class Counts:
    launches: list[str] = field(default_factory=list)  # Triton kernels, in launch order
    ops: list[str] = field(default_factory=list)  # kernel-launching aten ops, in order
    allocations: list[int] = field(default_factory=list)  # bytes of each allocation

    @property
    def kernels(self) -> int:
        return len(self.launches) + len(self.ops)


def _wrap_launchers():
    """Patches the launch entry points of interpreted and compiled ``@triton.jit`` functions so that each
    launch is one ``triton_launch::<name>`` profiler range."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    patched = []
    for cls in (interp.InterpretedFunction, jit.JITFunction):
        real = cls.run

        def run(self, *args, _real=real, **kwargs):
            if kwargs.get("warmup"):
                return _real(self, *args, **kwargs)
            with record_function(LAUNCH + self.__name__):
                return _real(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, real))
    return patched


@contextlib.contextmanager
def counting(within: str | None = None):
    """Profiles the block; yields a :class:`Counts` filled on exit. ``within``: count only inside the profiler
    events whose name contains it (e.g. an autograd backward node)."""
    counts = Counts()
    patched = _wrap_launchers()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            yield counts
    finally:
        for cls, real in patched:
            cls.run = real
    events = sorted(prof.events(), key=lambda e: (e.time_range.start, -e.time_range.end))

    def ancestors(e):
        p = e.cpu_parent
        while p is not None:
            yield p
            p = p.cpu_parent

    def below(e, name):
        stack = list(e.cpu_children)
        while stack:
            c = stack.pop()
            if c.name == name:
                return True
            stack.extend(c.cpu_children)
        return False

    for e in events:
        up = list(ancestors(e))
        if within is not None and not any(within in a.name for a in up + [e]):
            continue
        if any(a.name.startswith(LAUNCH) for a in up):
            continue  # the interpreter's own work inside a launch
        if e.name.startswith(LAUNCH):
            counts.launches.append(e.name[len(LAUNCH) :])
            continue
        if e.self_cpu_memory_usage > 0:
            counts.allocations.append(e.self_cpu_memory_usage)
        if not e.name.startswith("aten::") or any(a.name.startswith("aten::") for a in up):
            continue
        if e.name in NO_KERNEL and not (e.name in COPY_WHEN_NEEDED and below(e, "aten::copy_")):
            continue
        counts.ops.append(e.name)


def nbytes(*tensors: torch.Tensor) -> list[int]:
    return [t.numel() * t.element_size() for t in tensors]
