"""Reference MoR low-rank path (MOR_SPEC section 2.2): ``base + scaling * B (g * (A x))``.

- Sample routing: each sample's active ranks are gathered (:mod:`.rank_lists`), so the work is the
  active ranks' and a rank no sample picked is never read.
- Token routing: all ``R`` ranks for every token, the unpicked ones masked per token with
  ``torch.where`` before the gate multiplies them. A non-finite ``lora_b`` column cannot be masked
  per token inside one GEMM (``0 * inf`` is NaN), so where ``lora_b`` holds non-finite values (checked on
  the host where that is free, assumed elsewhere) the up-projection runs on the finite part and the
  tokens that picked a non-finite column get that column's contribution separately.

Either way a rank with ``g = 0`` contributes exactly zero, non-finite weights included, forward and
backward (only the poisoned rank's own ``lora_a``/``lora_b`` gradient may be non-finite).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dense_gate import dense_gate
from .factors import add_lowrank_linear, cast, rank_factors
from .rank_lists import host_sync_allowed


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """float32 accumulation (float64 stays float64); ``upcast=False`` computes in the input dtype."""
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def _sample_delta_into(y, x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype, *, inplace):
    """``y + scaling B (g * A x)`` for ``x (B, T, d_in)``, ``y (B, T, d_out)`` (or None: the delta alone),
    over each sample's gathered ranks; ``inplace`` adds into ``y``."""
    f = rank_factors(lora_a, lora_b, idx, gate, num_shared, scaling, dtype)
    return add_lowrank_linear(y, cast(x, dtype), f, inplace=inplace)


def _token_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype) -> torch.Tensor:
    """``scaling B (g * A x)`` under token routing (``idx``/``gate (B, T, k)``), all ranks, masked per token."""
    ranks = lora_a.shape[0]
    g = dense_gate(idx, gate, num_shared, ranks, dtype) * scaling  # (B, T, R)
    picked = dense_gate(idx, torch.ones_like(gate), num_shared, ranks, torch.float32) > 0
    h = torch.where(picked, F.linear(cast(x, dtype), cast(lora_a, dtype)), 0) * g  # (B, T, R)
    b = cast(lora_b, dtype)
    if host_sync_allowed(b) and bool(torch.isfinite(b).all()):
        return F.linear(h, b)
    finite = torch.isfinite(b)
    out = F.linear(h, torch.where(finite, b, 0))
    # The tokens that picked a column with non-finite entries get that column's contribution, masked per
    # token after the product (0 * inf is NaN for the others). It is left out of the backward, whose
    # masked zeros would meet the same infs; the tokens it reaches have a non-finite output anyway.
    bad = torch.where(finite, 0, b).detach()
    hits = F.linear(picked.to(dtype), (~finite).to(dtype)) > 0  # (B, T, d_out): token picked a bad entry
    return out + torch.where(hits, F.linear(h.detach(), bad), 0)


def lora_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype) -> torch.Tensor:
    """``scaling * B (g * (A x))`` computed in ``dtype``, for ``x (B, T, d_in)``."""
    if idx.dim() == 2:
        return _sample_delta_into(None, x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype, inplace=False)
    return _token_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype)


def add_lora_delta(y, x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype) -> torch.Tensor:
    """``y + scaling * B (g * (A x))``, into ``y`` (an intermediate of the caller: it is overwritten)."""
    if idx.dim() == 2:
        return _sample_delta_into(y, x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype, inplace=True)
    return y.add_(_token_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype))


def mor_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    *,
    base: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """MoR delta (plus ``base`` when given), pure PyTorch, differentiable.

    Shapes: ``x (B, T, d_in)``, ``lora_a (R, d_in)``, ``lora_b (d_out, R)``, ``idx``/``gate``
    ``(B, k)`` (sample routing) or ``(B, T, k)`` (token routing), ``base (B, T, d_out)``.
    Returns ``(B, T, d_out)`` in ``x.dtype``; ``base`` is never modified. Inputs are assumed valid:
    the public ``mor_kernels.mor_lora`` checks them (and flattens the token dimensions) first.
    """
    ct = compute_dtype(x.dtype, upcast)
    if base is None:
        out = lora_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    elif idx.dim() == 2:
        out = _sample_delta_into(cast(base, ct), x, lora_a, lora_b, idx, gate, num_shared, scaling, ct, inplace=False)
    else:
        out = cast(base, ct) + _token_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, ct)
    return cast(out, x.dtype)
