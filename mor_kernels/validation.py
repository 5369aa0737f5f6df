"""Up-front argument checks shared by every backend (MOR_SPEC section 6).

Every public op calls these before any kernel runs, so a bad call fails the same way whichever
backend would have served it: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong
shape, range or device, each naming the argument, what it got and what was expected.

The checks never copy or modify user tensors. The one data-dependent check (index range) needs a
host synchronisation; it is skipped while ``torch.compile`` traces or a CUDA graph is captured, where
a sync is not allowed, and when the caller passes ``check_indices=False`` because its indices come
from ``route`` (the MoR layers do, so a model forward has no sync per layer). The kernels treat any
index outside ``[0, E)`` as a zero slot.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

#: dtypes every backend accepts for activations and weights (float64 is for the reference and gradcheck).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, *, dim: int | None = None, min_dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {_shape(t)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {_shape(t)}")
    return t


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype in ({names}), got {t.dtype}")


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be a Python/NumPy integer (not bool) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_same_device(x: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")


def check_same_dtype(x: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")


def needs_grad(*tensors) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on and one of them requires a gradient; None and
    non-tensors are skipped): the backends' choice between their autograd Functions and the bare forward."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _index_check_allowed(t: torch.Tensor) -> bool:
    """Whether a host sync is allowed now (not while compiling or capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    if getattr(t, "is_meta", False) or type(t) is not torch.Tensor:
        return False  # fake/meta/subclass tensors have no data to inspect
    return True


# ----------------------------------------------------------------------------------------------
# route


def check_route(logits, top_k, num_zero, renormalize) -> tuple[int, int]:
    """Returns ``(num_real, num_slots)``."""
    check_tensor("logits", logits, min_dim=1)
    check_float("logits", logits)
    n = logits.shape[-1]
    if n < 1:
        raise ValueError(f"logits must have at least one slot in its last dimension, got shape {_shape(logits)}")
    num_zero = check_int("num_zero", num_zero, low=0, high=n - 1)
    check_int("top_k", top_k, low=1, high=n)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    return n - num_zero, n


# ----------------------------------------------------------------------------------------------
# mor_lora / mor_linear / mor_conv2d


@dataclass(frozen=True)
class LoRAShape:
    """What the checks learned about a MoR call; backends use it instead of re-deriving."""

    batch: int
    tokens: int  # tokens per sample (H_out * W_out for a conv)
    d_in: int
    d_out: int
    ranks: int
    num_shared: int
    top_k: int
    token_routing: bool

    @property
    def num_routed(self) -> int:
        return self.ranks - self.num_shared


def _check_routing(
    x: torch.Tensor, idx, gate, *, allow_token: bool, ranks: int, num_shared: int, check_indices: bool = True
) -> tuple[int, bool]:
    check_tensor("idx", idx, min_dim=2)
    check_tensor("gate", gate)
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    check_float("gate", gate)
    if gate.shape != idx.shape:
        raise ValueError(f"gate must have the shape of idx {_shape(idx)}, got {_shape(gate)}")
    check_same_device(x, idx=idx, gate=gate)
    k = idx.shape[-1]
    if k < 1:
        raise ValueError(f"idx must select at least one slot (last dimension k >= 1), got shape {_shape(idx)}")
    batch = x.shape[0]
    lead = tuple(x.shape[:-1])
    if idx.dim() == 2 and idx.shape[0] == batch:
        token_routing = False
    elif allow_token and tuple(idx.shape[:-1]) == lead:
        token_routing = True
    else:
        expected = f"({batch}, k) for sample routing"
        if allow_token:
            expected += f" or ({', '.join(str(s) for s in lead)}, k) for token routing"
        raise ValueError(f"idx must have shape {expected}, got {_shape(idx)}")
    if check_indices and idx.numel() and _index_check_allowed(idx):
        lo, hi = (int(v) for v in torch.aminmax(idx))
        num_routed = ranks - num_shared
        if lo < -1 or hi >= num_routed:
            raise ValueError(
                f"idx values must be in [-1, {num_routed}) (-1 = zero slot, 0..E-1 = routed rank with "
                f"E = lora ranks {ranks} - num_shared {num_shared}), got values in [{lo}, {hi}]"
            )
    return k, token_routing


def _check_scaling(scaling) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    return float(scaling)


def check_mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, base=None, check_indices=True) -> LoRAShape:
    check_tensor("x", x, min_dim=2)
    check_float("x", x)
    check_tensor("lora_a", lora_a, dim=2)
    check_tensor("lora_b", lora_b, dim=2)
    check_same_dtype(x, lora_a=lora_a, lora_b=lora_b)
    check_same_device(x, lora_a=lora_a, lora_b=lora_b)
    ranks, d_in = lora_a.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"lora_a must have shape (R, {x.shape[-1]}) to match x {_shape(x)}, got {_shape(lora_a)}")
    if ranks < 1:
        raise ValueError(f"lora_a must have at least one rank, got shape {_shape(lora_a)}")
    d_out = lora_b.shape[0]
    if lora_b.shape[1] != ranks:
        raise ValueError(
            f"lora_b must have shape (d_out, {ranks}) to match lora_a {_shape(lora_a)}, got {_shape(lora_b)}"
        )
    num_shared = check_int("num_shared", num_shared, low=0, high=ranks)
    _check_scaling(scaling)
    k, token = _check_routing(
        x, idx, gate, allow_token=True, ranks=ranks, num_shared=num_shared, check_indices=check_indices
    )
    if base is not None:
        check_tensor("base", base)
        expected = tuple(x.shape[:-1]) + (d_out,)
        if tuple(base.shape) != expected:
            raise ValueError(f"base must have shape ({', '.join(map(str, expected))}), got {_shape(base)}")
        check_same_dtype(x, base=base)
        check_same_device(x, base=base)
    tokens = math.prod(x.shape[1:-1])
    return LoRAShape(x.shape[0], tokens, d_in, d_out, ranks, num_shared, k, token)


def _check_bias(bias, d_out: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    check_tensor("bias", bias, dim=1)
    if bias.shape[0] != d_out:
        raise ValueError(f"bias must have shape ({d_out},), got {_shape(bias)}")
    check_same_dtype(x, bias=bias)
    check_same_device(x, bias=bias)


def check_mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, check_indices=True) -> LoRAShape:
    info = check_mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, check_indices=check_indices)
    check_tensor("weight", weight, dim=2)
    if tuple(weight.shape) != (info.d_out, info.d_in):
        raise ValueError(
            f"weight must have shape ({info.d_out}, {info.d_in}) (d_out from lora_b, d_in from x), got {_shape(weight)}"
        )
    check_same_dtype(x, weight=weight)
    check_same_device(x, weight=weight)
    _check_bias(bias, info.d_out, x)
    return info


def pair(name: str, value) -> tuple[int, int]:
    """Normalises an int or a pair of ints (stride, padding, dilation)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check_int(name, value[0]), check_int(name, value[1])
    v = check_int(name, value)
    return v, v


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_mor_conv2d(
    x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation, check_indices=True
) -> tuple[LoRAShape, tuple[int, int], tuple[int, int], tuple[int, int]]:
    check_tensor("x", x, dim=4)
    check_float("x", x)
    check_tensor("weight", weight, dim=4)
    check_tensor("lora_a", lora_a, dim=4)
    check_tensor("lora_b", lora_b, dim=2)
    check_same_dtype(x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    check_same_device(x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    c_in = x.shape[1]
    if c_in < 1:  # F.conv2d has no zero-channel convolution; mor_linear's d_in = 0 would give bias alone
        raise ValueError(f"x must have at least one input channel (C_in >= 1), got shape {_shape(x)}")
    c_out, w_cin, kh, kw = weight.shape
    if w_cin != c_in:
        raise ValueError(
            f"weight must have shape (C_out, {c_in}, kh, kw) to match x {_shape(x)} (groups=1 only), got {_shape(weight)}"
        )
    ranks = lora_a.shape[0]
    if ranks < 1 or tuple(lora_a.shape[1:]) != (c_in, kh, kw):
        raise ValueError(f"lora_a must have shape (R, {c_in}, {kh}, {kw}) with R >= 1, got {_shape(lora_a)}")
    if tuple(lora_b.shape) != (c_out, ranks):
        raise ValueError(f"lora_b must have shape ({c_out}, {ranks}) (C_out, R), got {_shape(lora_b)}")
    _check_bias(bias, c_out, x)
    s, p, d = pair("stride", stride), pair("padding", padding), pair("dilation", dilation)
    if min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got stride={s} padding={p} dilation={d}")
    h_out = conv_out_size(x.shape[2], kh, s[0], p[0], d[0])
    w_out = conv_out_size(x.shape[3], kw, s[1], p[1], d[1])
    if h_out < 1 or w_out < 1:
        raise ValueError(f"x {_shape(x)} is too small for a {kh}x{kw} kernel with stride={s} padding={p} dilation={d}")
    num_shared = check_int("num_shared", num_shared, low=0, high=ranks)
    _check_scaling(scaling)
    k, _ = _check_routing(
        x, idx, gate, allow_token=False, ranks=ranks, num_shared=num_shared, check_indices=check_indices
    )
    info = LoRAShape(x.shape[0], h_out * w_out, c_in * kh * kw, c_out, ranks, num_shared, k, False)
    return info, s, p, d
