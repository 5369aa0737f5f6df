"""The public ops: check the arguments, pick a backend, run it (MOR_SPEC section 6).

Backends are called with canonical arguments, after the checks:

- ``x`` as ``(B, T, d_in)`` (any strides; flattened token dimensions), ``idx`` int32 ``(B, k)``
  (sample routing) or ``(B, T, k)`` (token routing), ``gate`` of the same shape, ``base``
  ``(B, T, d_out)`` or None, ``scaling`` a float;
- for convolutions ``stride``/``padding``/``dilation`` as pairs of ints.

so a backend never re-implements the checks or the reshaping.

**The lean CPU path.** When ``backend`` resolves to ``"blas"`` on a CPU tensor (``"auto"`` does where the
compiled extension is built: :data:`mor_kernels.dispatch.DECISIONS`) and the routing is per sample,
``mor_linear``/``mor_conv2d`` skip all of the above and call the C++ op directly (one dict lookup, a few type
tests, one dispatcher hop: :mod:`mor_kernels.ops.cpu_blas`). On a CPU each Python-level step of a call costs
microseconds next to the layer's GEMMs, more after a GEMM evicted the caches; the Python checks alone cost
more than a dense LoRA's extra torch calls. The C++ op checks every condition the Python checks do (sizes,
dtypes, devices, index range) before it computes anything; when one fails, the Python checks run and raise
their documented ``ValueError``/``TypeError`` naming the argument, so a bad call fails exactly as before.

``mor_linear``/``mor_conv2d`` with sample routing and no gradient needed may instead run per-sample merged weights
(:mod:`mor_kernels.reference.merged`): ``merge="auto"`` (default) asks the cost model of
:func:`mor_kernels.dispatch.merge_plan` when ``backend="auto"``; :func:`merge_decision` says what a call
would run and why. Inside ``torch.autocast`` the ops act
like ``F.linear``/``F.conv2d``: the float operands are cast to the autocast dtype first and the backend
runs with autocast off, so every backend sees one compute dtype (``gate`` stays float32).
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import dispatch
from .reference import merged
from .validation import check_mor_conv2d, check_mor_linear, check_mor_lora, check_route, needs_grad


def route(
    logits: torch.Tensor, top_k: int, num_zero: int, renormalize: bool = True, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing over ``E`` routed ranks and ``Z`` zero slots (MOR_SPEC 2.1).

    Args:
        logits: ``(..., E + Z)`` router logits, any float dtype.
        top_k: ``k``, slots per row, ``1 <= k <= E + Z``.
        num_zero: ``Z``, zero slots at the end of each row, ``0 <= Z < E + Z``.
        renormalize: renormalise the selected probabilities (zero slots included) to sum to 1.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"`` or ``"cpp"``.

    Returns:
        ``(idx, gate, probs)``: ``idx`` int32 ``(..., k)`` in ``[-1, E)`` with ``-1`` for zero
        slots, in descending order of probability (ties to the lower slot); ``gate`` float32
        ``(..., k)``; ``probs`` float32 ``(..., E + Z)``.
    """
    check_route(logits, top_k, num_zero, renormalize)
    impl = dispatch.implementation("route", backend, logits.device, logits.dtype)
    return impl(logits, int(top_k), int(num_zero), renormalize)


def _as_tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """``(B, *tokens, d)`` -> ``(B, T, d)`` (a view when the strides allow it; also for B = 0)."""
    return x.reshape(x.shape[0], tokens, x.shape[-1])


def _int32(idx: torch.Tensor) -> torch.Tensor:
    """int32 indices for the kernels; int64 values beyond int32 are clamped first (they stay out of range,
    i.e. zero slots, instead of wrapping onto a real rank when ``check_indices=False``)."""
    if idx.dtype == torch.int64:
        idx = idx.clamp(-1, torch.iinfo(torch.int32).max)
    return idx.to(torch.int32)


def _routing(idx: torch.Tensor, gate: torch.Tensor, info):
    idx = _int32(idx)
    if info.token_routing:
        k = idx.shape[-1]
        idx, gate = idx.reshape(info.batch, info.tokens, k), gate.reshape(info.batch, info.tokens, k)
    return idx, gate


def _autocast_dtype(x) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device inside a ``torch.autocast`` region, else None."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cuda", "cpu"):
        return None
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _autocast(dtype: torch.dtype | None, *tensors):
    """Inside ``torch.autocast`` the MoR ops behave like ``F.linear``/``F.conv2d``: float16/bfloat16/
    float32 operands run in the autocast dtype (float64 is left alone; ``gate`` and ``idx`` are not
    passed here). Non-tensors pass through for the checks to report."""
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        for t in tensors
    )


_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast(x: torch.Tensor, autocast: torch.dtype | None):
    """The backends run with autocast off (their operands already have the compute dtype); nothing to do
    when ``autocast`` (the dtype :func:`_autocast_dtype` found) is None."""
    if autocast is None or x.device.type not in ("cuda", "cpu"):  # no autocast there (meta tensors...)
        return _NO_CONTEXT
    return torch.autocast(x.device.type, enabled=False)


_Tensor = torch.Tensor
_SCALARS = (float, int)
_LEAN_PLANS = dispatch._LEAN  # lean_plan's cache itself (clear_cache empties it), read without a call
_BLAS_OPS: list = []  # (mor::blas_mor_linear, mor::blas_mor_conv2d), filled on the first lean call


def _lean(op: str, backend, merge, x, idx):
    """The merge limits of :func:`mor_kernels.dispatch.lean_plan` when this call can take the lean CPU path
    (plain CPU tensors, sample routing, no autocast, not tracing), else None. Every step here runs per call,
    usually right after a GEMM evicted the caches: few objects touched, no import, one dict lookup."""
    if type(x) is not _Tensor or type(idx) is not _Tensor or not x.is_cpu or idx.dim() != 2:
        return None
    if type(backend) is not str or type(merge) is not str:
        return None  # the general path names the bad argument
    if torch.compiler.is_compiling():  # before lean_plan: its first call resolves the backend (imports)
        return None
    key = (op, backend, merge, x.dtype)
    plan = _LEAN_PLANS[key] if key in _LEAN_PLANS else dispatch.lean_plan(*key)
    if plan is None or torch.is_autocast_enabled("cpu"):
        return None
    if not _BLAS_OPS:
        from .ops import cpu_blas

        _BLAS_OPS.extend((cpu_blas.linear_op(), cpu_blas.conv2d_op()))
    return plan


def _lean_pair(value):
    """``(a, b)`` for an int or a pair of ints (stride, padding, dilation), None for anything else (the
    general path's checks then report it)."""
    if type(value) is int:
        return [value, value]
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return list(value)
    return None


def _merge_plan(merge, backend, x, info, weight, *tensors) -> dispatch.MergePlan:
    kernel = tuple(weight.shape[2:])
    return dispatch.merge_plan(
        x.device.type,
        info.tokens,
        info.d_in // max(math.prod(kernel), 1),
        info.d_out,
        kernel=kernel,
        mode=merge,
        backend=backend,
        token_routing=info.token_routing,
        needs_grad=needs_grad(x, weight, *tensors),
    )


def merge_decision(op: str, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, idx: torch.Tensor, *,
                   bias=None, lora_b=None, gate=None, stride=1, padding=0, dilation=1, backend: str = "auto",
                   merge: str = "auto") -> dispatch.MergePlan:  # fmt: skip
    """What ``mor_linear``/``mor_conv2d`` (``op``) would do with these arguments (grad mode included):
    per-sample merged weights or the low-rank path, and why. Shapes as in the ops; only the sizes, the
    device and ``requires_grad`` of the tensors are read."""
    if op == "mor_linear":
        tokens = x.numel() // max(x.shape[0] * x.shape[-1], 1)
        c_in, d_out = x.shape[-1], weight.shape[0]
    elif op == "mor_conv2d":
        from .validation import conv_out_size, pair

        (sh, sw), (ph, pw), (dh, dw) = pair("stride", stride), pair("padding", padding), pair("dilation", dilation)
        kh, kw = weight.shape[2:]
        tokens = conv_out_size(x.shape[2], kh, sh, ph, dh) * conv_out_size(x.shape[3], kw, sw, pw, dw)
        c_in, d_out = weight.shape[1], weight.shape[0]
    else:
        raise ValueError(f"op must be 'mor_linear' or 'mor_conv2d', got {op!r}")
    token = op == "mor_linear" and idx.dim() > 2
    return dispatch.merge_plan(x.device.type, tokens, c_in, d_out, kernel=tuple(weight.shape[2:]), mode=merge,
                               backend=backend, token_routing=token,
                               needs_grad=needs_grad(x, weight, bias, lora_a, lora_b, gate))  # fmt: skip


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
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """MoR low-rank path ``scaling * B (g * (A x))``, added to ``base`` when given.

    Shapes: ``x (B, *tokens, d_in)`` (usually ``(B, T, d_in)``); ``lora_a (R, d_in)``;
    ``lora_b (d_out, R)``; ``idx`` int32/int64 and ``gate`` float, ``(B, k)`` for sample routing or
    ``(B, *tokens, k)`` for token routing, ``idx`` in ``[-1, R - num_shared)``; ``base``
    ``(B, *tokens, d_out)``. Ranks ``0..num_shared-1`` are always on. Returns
    ``(B, *tokens, d_out)`` in ``x.dtype``; ``base`` is never modified.

    ``check_indices=False`` skips the index-range check, the one check that synchronises with the
    device; pass it only for indices made by :func:`route`.
    """
    autocast = _autocast_dtype(x)
    x, lora_a, lora_b, base = _autocast(autocast, x, lora_a, lora_b, base)
    info = check_mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, base, check_indices)
    impl = dispatch.implementation("mor_lora", backend, x.device, x.dtype)
    idx, gate = _routing(idx, gate, info)
    tokens = _as_tokens(x, info.tokens)
    base = None if base is None else _as_tokens(base, info.tokens)
    with _no_autocast(x, autocast):
        out = impl(tokens, lora_a, lora_b, idx, gate, info.num_shared, float(scaling), base=base)
    return out.reshape(*x.shape[:-1], info.d_out)


def mor_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    *,
    backend: str = "auto",
    check_indices: bool = True,
    merge: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + mor_lora(x, ...)``, the base GEMM fused where the backend can.

    Shapes: ``weight (d_out, d_in)``, ``bias (d_out,)`` or None; the rest as in :func:`mor_lora`.
    Returns ``(B, *tokens, d_out)`` in ``x.dtype``. ``check_indices``: see :func:`mor_lora`.
    ``merge``: ``"auto"`` (with ``backend="auto"``, per-sample merged weights where the measured cost
    model of :func:`mor_kernels.dispatch.merge_plan` says they are faster), ``"always"`` or ``"never"``;
    sample routing without a gradient only (see :func:`merge_decision`).
    """
    lean = _lean("mor_linear", backend, merge, x, idx)
    if lean is not None and type(num_shared) is int and type(scaling) in _SCALARS:
        try:
            return _BLAS_OPS[0](x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, lean[0],
                                        check_indices)  # fmt: skip
        except (RuntimeError, TypeError, ValueError, IndexError):
            # the documented error for bad arguments (the C++ checks accept exactly what these accept)
            check_mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, check_indices)
            raise
    autocast = _autocast_dtype(x)
    x, weight, bias, lora_a, lora_b = _autocast(autocast, x, weight, bias, lora_a, lora_b)
    info = check_mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, check_indices)
    if _merge_plan(merge, backend, x, info, weight, bias, lora_a, lora_b, gate).merge:
        with _no_autocast(x, autocast):
            out = merged.mor_linear_merged(_as_tokens(x, info.tokens), weight, bias, lora_a, lora_b, _int32(idx), gate,
                                           info.num_shared, float(scaling))  # fmt: skip
        return out.reshape(*x.shape[:-1], info.d_out)
    impl = dispatch.implementation("mor_linear", backend, x.device, x.dtype)
    idx, gate = _routing(idx, gate, info)
    with _no_autocast(x, autocast):
        out = impl(_as_tokens(x, info.tokens), weight, bias, lora_a, lora_b, idx, gate, info.num_shared, float(scaling))
    return out.reshape(*x.shape[:-1], info.d_out)


def mor_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    idx: torch.Tensor,
    gate: torch.Tensor,
    num_shared: int,
    scaling: float,
    stride=1,
    padding=0,
    dilation=1,
    *,
    backend: str = "auto",
    check_indices: bool = True,
    merge: str = "auto",
) -> torch.Tensor:
    """MoR convolution ``conv(x, W0) + b + scaling * B (g * conv(x, A))``, sample routing.

    Shapes: ``x (B, C_in, H, W)`` (NCHW or channels_last), ``weight (C_out, C_in, kh, kw)``,
    ``bias (C_out,)`` or None, ``lora_a (R, C_in, kh, kw)``, ``lora_b (C_out, R)``,
    ``idx``/``gate (B, k)``. ``stride``/``padding``/``dilation``: int or pair, as ``F.conv2d``
    (groups = 1). Returns ``(B, C_out, H_out, W_out)`` in ``x.dtype``. ``check_indices``: see
    :func:`mor_lora`; ``merge``: see :func:`mor_linear` (the merged weight of a conv is the 1x1 x kxk
    composition ``W0 + scaling B diag(g) A``, run as a grouped conv when the samples' ranks differ).
    """
    lean = _lean("mor_conv2d", backend, merge, x, idx)
    if lean is not None and type(num_shared) is int and type(scaling) in _SCALARS:
        s, p, d = _lean_pair(stride), _lean_pair(padding), _lean_pair(dilation)
        if s is not None and p is not None and d is not None:
            try:
                one = weight.shape[-1] == 1 and weight.shape[-2] == 1
                return _BLAS_OPS[1](x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, s, p, d,
                                            lean[0] if one else lean[1], check_indices)  # fmt: skip
            except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
                check_mor_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding,
                                 dilation, check_indices)  # fmt: skip
                raise
    autocast = _autocast_dtype(x)
    x, weight, bias, lora_a, lora_b = _autocast(autocast, x, weight, bias, lora_a, lora_b)
    info, s, p, d = check_mor_conv2d(
        x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation, check_indices
    )
    idx = _int32(idx)
    if _merge_plan(merge, backend, x, info, weight, bias, lora_a, lora_b, gate).merge:
        with _no_autocast(x, autocast):
            return merged.mor_conv2d_merged(x, weight, bias, lora_a, lora_b, idx, gate, int(num_shared), float(scaling),
                                            s, p, d)  # fmt: skip
    impl = dispatch.implementation("mor_conv2d", backend, x.device, x.dtype)
    with _no_autocast(x, autocast):
        return impl(x, weight, bias, lora_a, lora_b, idx, gate, int(num_shared), float(scaling), s, p, d)
