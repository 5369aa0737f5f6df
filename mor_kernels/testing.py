"""Helpers for parity tests of every backend (MOR_SPEC section 7), reused by all kernel tests.

- :func:`assert_parity`: the tolerance table plus the "at most 2x the reference's own
  low-precision error" rule;
- :func:`random_case`: fresh random MoR inputs (never zeros) for linear or conv layers, sample or
  token routing, with the odd corners of section 7 (all zero slots chosen, ``S = 0``...);
- :func:`poison_allocations`: makes ``torch.empty``/``torch.empty_like`` (and ``at::empty`` in the
  compiled ops) return NaN-filled tensors, so an output element a kernel forgets to write cannot pass
  by being zero.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .reference.route import route as reference_route

#: MOR_SPEC section 7: dtype -> (atol, rtol). float64 is ours, for reference-vs-naive checks.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


@dataclass
class Parity:
    name: str
    dtype: torch.dtype
    max_err: float
    worst_excess: float  # max of err - (atol + rtol |ref|); <= 0 passes the table
    lowp_err: float | None  # max error of the reference path in the same low precision
    lowp_budget: float | None  # 2 * lowp_err + one rounding at the largest |cond| (or |ref|)

    @property
    def ok(self) -> bool:
        return self.worst_excess <= 0 and (self.lowp_budget is None or self.max_err <= self.lowp_budget)


def parity(out: torch.Tensor, ref: torch.Tensor, *, dtype=None, lowp=None, cond=None, name="output") -> Parity:
    """Measures ``out`` against ``ref`` (see :func:`assert_parity`)."""
    dtype = dtype or out.dtype
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    atol, rtol = TOLERANCES[dtype]
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(r).all():
        raise AssertionError(f"{name}: the reference itself is not finite; the test inputs are wrong")
    if not torch.isfinite(o).all():
        bad = (~torch.isfinite(o)).nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite value at {bad} (an unwritten or overflowed output?)")
    err = (o - r).abs()
    max_err = err.max().item() if err.numel() else 0.0
    excess = (err - (atol + rtol * r.abs())).max().item() if err.numel() else 0.0
    lowp_err = budget = None
    if lowp is not None:
        lowp_err = (lowp.detach().double().cpu() - r).abs().max().item() if err.numel() else 0.0
        floor_of = r if cond is None else cond.detach().double().cpu()
        scale = floor_of.abs().max().item() if err.numel() else 0.0
        budget = 2 * lowp_err + torch.finfo(dtype).eps * scale
    return Parity(name, dtype, max_err, excess, lowp_err, budget)


def assert_parity(out: torch.Tensor, ref: torch.Tensor, *, dtype=None, lowp=None, cond=None, name="output") -> Parity:
    """Fails unless ``out`` matches the oracle ``ref`` under MOR_SPEC section 7.

    Args:
        out: the result under test (any dtype; compared in float64).
        ref: the oracle: the reference path in float64 (or float32 upcast) on the same inputs.
        dtype: the precision being judged (default ``out.dtype``), which picks ``atol``/``rtol``.
        lowp: the reference path run in that same low precision (``upcast=False``); when given,
            ``out``'s max error must also be at most twice ``lowp``'s, plus one rounding of
            ``dtype`` (``eps``) at the largest magnitude of ``cond`` (of ``ref`` when ``cond`` is not
            given), so that a reference that happens to be exactly rounded does not demand an exactly
            rounded kernel.
        cond: the same computation run in float64 on the absolute values of the inputs (see
            :meth:`MoRCase.magnitudes`): for these multilinear maps it is, element by element, the
            sum of the absolute values of the terms each result sums. A float32 sum that cancels to a
            small result is off by about ``eps * cond`` in any summation order, so the floor of the
            2x rule is one rounding at that scale, not at the (possibly much smaller) result's.
    """
    p = parity(out, ref, dtype=dtype, lowp=lowp, cond=cond, name=name)
    if p.worst_excess > 0:
        atol, rtol = TOLERANCES[p.dtype]
        err = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
        where = tuple(
            torch.nonzero(err - (atol + rtol * ref.detach().double().cpu().abs()) == p.worst_excess)[0].tolist()
        )
        raise AssertionError(
            f"{name} ({p.dtype}): |out - ref| exceeds atol={atol} + rtol={rtol}*|ref| by {p.worst_excess:.3g} at "
            f"{where} (out={out.detach()[where].item():.6g}, ref={ref.detach()[where].item():.6g}); max error {p.max_err:.3g}"
        )
    if p.lowp_budget is not None and p.max_err > p.lowp_budget:
        raise AssertionError(
            f"{name} ({p.dtype}): max error {p.max_err:.3g} is more than twice the reference path's own "
            f"{p.dtype} error {p.lowp_err:.3g} (budget {p.lowp_budget:.3g})"
        )
    return p


@contextlib.contextmanager
def poison_allocations(value: float = float("nan")):
    """Within the block, new float tensors from ``torch.empty``/``empty_like`` are filled with ``value``
    (NaN by default) and integer ones with -7, so outputs a kernel never writes are caught."""
    empty, empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.numel():
            t.fill_(value if t.is_floating_point() else -7)
        return t

    torch.empty = lambda *a, **k: _fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _fill(empty_like(*a, **k))
    # at::empty inside the compiled (C++/CUDA) ops: PyTorch fills uninitialised memory (NaN for floats,
    # the largest value for integers) while deterministic algorithms are on
    deterministic, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@dataclass
class MoRCase:
    """One set of MoR inputs. ``x`` is ``(B, T, d_in)`` (linear) or ``(B, C_in, H, W)`` (conv)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    idx: torch.Tensor
    gate: torch.Tensor
    num_shared: int
    scaling: float
    conv: dict = field(default_factory=dict)  # stride / padding / dilation for convolutions

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("x", "weight", "bias", "lora_a", "lora_b", "gate")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def magnitudes(self) -> MoRCase:
        """A float64 copy with every float tensor (and ``scaling``) replaced by its absolute value, as
        leaves that require grad: the oracle run on it, with ``|dy|``, gives the ``cond`` of
        :func:`assert_parity` for the output and for every gradient."""
        c = self.to(torch.float64, requires_grad=False)
        for name, t in c.tensors().items():
            setattr(c, name, t.abs().requires_grad_(True))
        c.scaling = abs(c.scaling)
        return c

    def to(self, dtype=None, device=None, requires_grad=False) -> MoRCase:
        """A copy with the float tensors cast (``gate`` stays float32) and made leaves."""

        def cast(t, keep_dtype=False):
            if t is None:
                return None
            t = t.detach().to(device=device, dtype=None if keep_dtype else dtype).clone()
            return t.requires_grad_(requires_grad)

        return MoRCase(
            cast(self.x),
            cast(self.weight),
            cast(self.bias),
            cast(self.lora_a),
            cast(self.lora_b),
            self.idx.to(device),
            cast(self.gate, keep_dtype=True),
            self.num_shared,
            self.scaling,
            dict(self.conv),
        )


def random_case(
    *,
    batch: int = 2,
    tokens: int = 17,
    d_in: int = 41,
    d_out: int = 33,
    num_shared: int = 2,
    num_routed: int = 6,
    num_zero: int = 2,
    top_k: int = 3,
    routing: str = "sample",
    kernel_size: int | None = None,
    height: int = 5,
    width: int = 7,
    conv: dict | None = None,
    bias: bool = True,
    zero_only_unit: bool = False,
    scaling: float = 0.75,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
) -> MoRCase:
    """Random inputs with routing computed by the reference router.

    ``kernel_size`` set makes a conv case (``x (B, d_in, height, width)``, sample routing only).
    ``zero_only_unit`` rigs the first routing unit's logits so that it picks the zero slots first
    (all of its slots are zero slots when ``top_k <= num_zero``).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    ranks = num_shared + num_routed
    if kernel_size is None:
        x = randn(batch, tokens, d_in)
        fan_in = d_in
        weight, lora_a = randn(d_out, d_in, scale=fan_in**-0.5), randn(ranks, d_in, scale=fan_in**-0.5)
    else:
        x = randn(batch, d_in, height, width)
        fan_in = d_in * kernel_size**2
        kk = (kernel_size, kernel_size)
        weight = randn(d_out, d_in, *kk, scale=fan_in**-0.5)
        lora_a = randn(ranks, d_in, *kk, scale=fan_in**-0.5)
    lora_b = randn(d_out, ranks, scale=ranks**-0.5)
    b = randn(d_out) if bias else None
    units = (batch,) if routing == "sample" else (batch, tokens)
    logits = torch.randn(*units, num_routed + num_zero, generator=gen)
    if zero_only_unit:
        logits.view(-1, num_routed + num_zero)[0, num_routed:] += 20.0
    idx, gate, _ = reference_route(logits, top_k, num_zero, True)
    return MoRCase(
        x.to(device),
        weight.to(device),
        None if b is None else b.to(device),
        lora_a.to(device),
        lora_b.to(device),
        idx.to(device),
        gate.to(device),
        num_shared,
        scaling,
        dict(conv or {}),
    )
