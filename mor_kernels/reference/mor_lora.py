"""Reference MoR low-rank path (MOR_SPEC section 2.2): ``base + scaling * B (g * (A x))``.

- Sample routing: each sample's active ranks are gathered (:mod:`.rank_lists`), so the work is the
  active ranks' and a rank no sample picked is never read.
- Token routing: all ``R`` ranks for every token, the unpicked ones masked per token with
  ``torch.where`` before the gate multiplies them. A non-finite weight cannot be masked per token inside
  one GEMM (``0 * inf`` is NaN), so where ``lora_a``/``lora_b`` hold non-finite values (checked on the
  host where that is free, assumed elsewhere) the GEMMs run on their finite parts and the tokens that
  picked a non-finite rank get its contribution separately.

Either way a rank with ``g = 0`` contributes exactly zero, non-finite weights included, forward and
backward (only the poisoned rank's own ``lora_a``/``lora_b`` gradient may be non-finite). A slot whose gate is
exactly 0 counts as not picking its rank (it gets no gradient either), as in every backend.
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


def _split_finite(w: torch.Tensor):
    """``(finite part, non-finite part or None)`` of ``w``: the non-finite entries zeroed in the first, the
    finite ones in the second (None when ``w`` is known finite, checked on the host where that is free)."""
    if host_sync_allowed(w) and bool(torch.isfinite(w).all()):
        return w, None
    finite = torch.isfinite(w)
    return torch.where(finite, w, 0), torch.where(finite, 0, w).detach()


def _token_delta(x, lora_a, lora_b, idx, gate, num_shared, scaling, dtype) -> torch.Tensor:
    """``scaling B (g * A x)`` under token routing (``idx``/``gate (B, T, k)``), all ranks, masked per token.

    The GEMMs over all ``R`` ranks run on the finite parts of ``A`` and ``B`` (``0 * inf`` would be NaN for
    every token, forward or backward); the tokens that picked a rank with non-finite entries get that rank's
    contribution apart, masked per token after the product and left out of the backward (their output is
    non-finite anyway)."""
    ranks = lora_a.shape[0]
    g = dense_gate(idx, gate, num_shared, ranks, dtype) * scaling  # (B, T, R)
    picked = dense_gate(idx, (gate != 0).float(), num_shared, ranks, torch.float32) > 0  # gate 0: not used
    x = cast(x, dtype)
    a, a_bad = _split_finite(cast(lora_a, dtype))
    h = F.linear(x, a)
    if a_bad is not None:
        h = h + torch.where(picked, F.linear(x.detach(), a_bad), 0)
    h = torch.where(picked, h, 0) * g  # (B, T, R)
    b, b_bad = _split_finite(cast(lora_b, dtype))
    out = F.linear(h, b)
    if b_bad is not None:
        hits = F.linear(picked.to(dtype), (b_bad != 0).to(dtype)) > 0  # (B, T, d_out): picked a bad entry
        out = out + torch.where(hits, F.linear(h.detach(), b_bad), 0)
    return out


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
