"""``backend="cuda"`` and ``backend="cpp"``: the compiled extension ``mor_kernels._C`` (MOR_SPEC 6).

The C++ ops (schemas in ``csrc/registration.cpp``; CPU kernels in ``csrc/cpu``, CUDA kernels in
``csrc/cuda``) are composed here into differentiable functions with the canonical backend signatures
(see ``mor_kernels.functional``):

- ``route``: ``mor::route`` (softmax, top-k, renormalisation); its backward (softmax and
  renormalisation Jacobians) is a few torch ops on the saved probabilities and selected slots;
- ``mor_lora``: ``mor::lora_fwd`` / ``mor::lora_bwd`` (the fused low-rank path and its deterministic
  backward for ``x``, ``lora_a``, ``lora_b``, ``gate``; ``base`` gets ``grad_y`` as is);
- ``mor_linear``: ``F.linear`` for the base GEMM, then ``mor::lora_fwd`` adds the low-rank path into it;
- ``mor_conv2d``: the base convolution and the rank convolution (``lora_a``'s R filters; two cuDNN/oneDNN calls,
  no ``[weight; lora_a]`` weight built per call; TF32 off for float32 and deterministic backward, see
  :mod:`.cudnn_conv`), then ``mor::conv_up`` applies gate, 1x1 up-projection and the add in one pass; its
  backward is torch ops.

Precision: the CUDA kernels accumulate in float32 (the forward on tensor cores for 16-bit inputs on sm_80+,
with the gated rank activations rounded to the input dtype before the up-projection; SIMT otherwise); the C++ CPU kernels
store float32 and accumulate in float64, and on CPU the half-precision base GEMM / convolution run in float32
(CPU half-precision GEMMs may accumulate in half precision), so the CPU twin is at least as accurate as the
reference path. ``mor_lora`` and ``mor_conv2d`` round their output once to ``x.dtype``; ``mor_linear`` adds
the low-rank path to the base GEMM's output already rounded to ``x.dtype`` (a second rounding in 16-bit).

Fake (meta) implementations for every ``mor::`` C++ op are registered when the extension is loaded
(``mor_kernels._extension.load``), so the ops trace under ``torch.compile`` even when called directly as
``torch.ops.mor.*``. Importing this module never fails for want of the extension:
:func:`unavailable_reason` says why it cannot run instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _extension
from ..validation import needs_grad
from .cudnn_conv import conv2d_input_op, conv2d_op, conv2d_weight_op
from .route_grad import route_backward

_C, _LOAD_ERROR = _extension.load()

#: the C++ ops each public op needs, per device
OP_KERNELS = {
    "route": ("route",),
    "mor_lora": ("lora_fwd", "lora_bwd"),
    "mor_linear": ("lora_fwd", "lora_bwd"),
    "mor_conv2d": ("conv_up", "dense_gate"),
}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Why the extension cannot run ``op`` on ``device`` for ``dtype`` inputs (None when it can)."""
    if _C is None:
        return f"extension not built: {_LOAD_ERROR}"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return f"the compiled kernels run on CPU or CUDA tensors, not {torch.device(device).type}"
    for name in OP_KERNELS[op]:
        if not _extension.has_kernel(name, key):
            if key == "CUDA":
                return (
                    f"CUDA kernels not compiled in (mor::{name} has no CUDA kernel: mor_kernels._C was built "
                    "without a CUDA toolkit or with MOR_SKIP_CUDA_BUILD=1)"
                )
            return f"mor::{name} has no {key} kernel in this build of mor_kernels._C"
    if dtype not in KERNEL_DTYPES:
        return f"{str(dtype).replace('torch.', '')} unsupported by the compiled kernels (float32, float16, bfloat16)"
    if key == "CUDA":
        return _arch_reason(torch.device(device))
    return None


def runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for ``TORCH_CUDA_ARCH_LIST``-style ``arch_list`` ("8.0;9.0+PTX") has code for a
    GPU of compute ``capability``: a cubin for ``X.Y`` runs on ``X.Y'`` with ``Y' >= Y``; PTX for ``X.Y``
    is compiled by the driver for any newer GPU."""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        major, _, minor = entry.removesuffix("+PTX").partition(".")
        try:
            arch = (int(major), int(minor or 0))
        except ValueError:
            return True  # a spelling we cannot read ("Hopper"...): let the launch decide
        if (capability[0] == arch[0] and capability[1] >= arch[1]) or (ptx and capability >= arch):
            return True
    return False


def _arch_reason(device: torch.device) -> str | None:
    """Why the compiled CUDA kernels have no code for ``device``'s GPU (None when they do)."""
    arch_list = (_extension.build_info() or {}).get("arch_list")
    if not arch_list or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability(device)
    if runs_on(arch_list, capability):
        return None
    return (
        f"mor_kernels._C was built for TORCH_CUDA_ARCH_LIST={arch_list!r}, which has no code for this GPU "
        f"(compute capability {capability[0]}.{capability[1]}); rebuild with TORCH_CUDA_ARCH_LIST set for it"
    )


# ------------------------------------------------------------------------------------------------
# route


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, num_zero, renormalize):
        idx, gate, probs, slots = torch.ops.mor.route(logits, top_k, num_zero, renormalize)
        ctx.renormalize = renormalize
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(gate, probs, slots)
        ctx.mark_non_differentiable(idx)
        return idx, gate, probs

    @staticmethod
    def backward(ctx, _grad_idx, grad_gate, grad_probs):
        gate, probs, slots = ctx.saved_tensors
        grad_logits = route_backward(probs, slots, gate, grad_gate, grad_probs, ctx.renormalize)
        return grad_logits.to(ctx.logits_dtype), None, None, None


def route(logits, top_k, num_zero, renormalize=True):
    """Canonical ``route`` (see ``mor_kernels.functional.route``) on ``mor::route``."""
    if not needs_grad(logits):  # nothing to differentiate: the op without the autograd Function (torch.vmap rejects it)
        return tuple(torch.ops.mor.route(logits, int(top_k), int(num_zero), bool(renormalize))[:3])
    return _Route.apply(logits, int(top_k), int(num_zero), bool(renormalize))


# ------------------------------------------------------------------------------------------------
# mor_lora / mor_linear


class _MoRLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, idx, gate, num_shared, scaling, base, store_h):
        y, h = torch.ops.mor.lora_fwd(x, lora_a, lora_b, idx, gate, num_shared, scaling, base, store_h)
        ctx.num_shared, ctx.scaling = num_shared, scaling
        ctx.save_for_backward(x, lora_a, lora_b, idx, gate, h)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b, idx, gate, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[4]]
        grads = [None] * 4
        if any(mask):
            out = torch.ops.mor.lora_bwd(
                grad_y.to(x.dtype), x, lora_a, lora_b, idx, gate, h, ctx.num_shared, ctx.scaling, mask
            )
            grads = [g if m else None for g, m in zip(out, mask, strict=True)]
        grad_base = grad_y if need[7] else None
        return grads[0], grads[1], grads[2], None, grads[3], None, None, grad_base, None


def _gate32(gate: torch.Tensor) -> torch.Tensor:
    return gate if gate.dtype == torch.float32 else gate.to(torch.float32)


#: the CUDA launches put the batch on gridDim.y (at most 65535): larger batches run in chunks
MAX_BATCH = 65535


def _chunks(batch: int):
    return [slice(i, min(i + MAX_BATCH, batch)) for i in range(0, batch, MAX_BATCH)] or [slice(None)]


def mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, *, base=None):
    """Canonical ``mor_lora``: ``x (B, T, d_in)``, ``idx``/``gate`` ``(B, k)`` or ``(B, T, k)``,
    ``base (B, T, d_out)`` or None; returns ``(B, T, d_out)`` in ``x.dtype``."""
    idx, gate = idx.to(torch.int32), _gate32(gate)
    # h (the rank activations) is written only when a backward will run
    store_h = needs_grad(x, lora_a, lora_b, gate)
    args = (int(num_shared), float(scaling))
    if store_h or needs_grad(base):

        def run(x, idx, gate, base):
            return _MoRLoRA.apply(x, lora_a, lora_b, idx, gate, *args, base, store_h)
    else:  # nothing to differentiate: the op without the autograd Function (which torch.vmap rejects)

        def run(x, idx, gate, base):
            return torch.ops.mor.lora_fwd(x, lora_a, lora_b, idx, gate, *args, base, False)[0]

    if x.shape[0] <= MAX_BATCH:
        return run(x, idx, gate, base)
    return torch.cat([run(x[c], idx[c], gate[c], None if base is None else base[c]) for c in _chunks(x.shape[0])])


def _dense_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the base GEMM / convolution: CPU half-precision GEMMs may accumulate in half precision
    (their backward does), so on CPU they run in float32 and round once; CUDA accumulates in float32 anyway."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def mor_linear(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling):
    """Canonical ``mor_linear``: the base GEMM by ``F.linear``, the low-rank path added by ``mor::lora_fwd``."""
    dt = _dense_dtype(x)
    base = F.linear(x.to(dt), weight.to(dt), _cast(bias, dt)).to(x.dtype)
    return mor_lora(x, lora_a, lora_b, idx, gate, num_shared, scaling, base=base)


# ------------------------------------------------------------------------------------------------
# mor_conv2d


class _ConvUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, z_rank, lora_b, idx, gate, num_shared, scaling):
        y = torch.ops.mor.conv_up(base, z_rank, lora_b, idx, gate, num_shared, scaling)
        ctx.num_shared, ctx.scaling = num_shared, scaling
        ctx.save_for_backward(z_rank, lora_b, idx, gate)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z_rank, lora_b, idx, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        ranks = lora_b.shape[1]
        s = ctx.num_shared
        # float32 sums on CUDA; float64 on CPU, like the C++ CPU kernels
        acc = torch.float64 if z_rank.device.type == "cpu" else torch.float32
        g = (torch.ops.mor.dense_gate(idx, gate, s, ranks) * ctx.scaling).to(acc)  # (B, R)
        dy = grad_y.to(acc)
        h = z_rank.to(acc)  # (B, R, H, W), ungated rank activations
        dyb = torch.einsum("bohw,or->brhw", dy, lora_b.to(acc))
        grad_base = grad_y if need[0] else None
        grad_z = grad_b = grad_gate = None
        # MOR_SPEC 2.2: a rank a sample does not pick (g = 0) gets exactly zero, whatever its weights hold
        picked = (g != 0)[:, :, None, None]
        if need[1]:
            grad_z = torch.where(picked, dyb * g[:, :, None, None], 0).to(z_rank.dtype)
        if need[2]:
            hg = torch.where(picked, h * g[:, :, None, None], 0)
            grad_b = torch.einsum("bohw,brhw->or", dy, hg).to(lora_b.dtype)
        if need[4]:
            q = (dyb * h).sum((2, 3))  # (B, R)
            valid = (idx >= 0) & (idx < ranks - s) & (gate != 0)  # a gate of 0: the rank is not used
            rank = torch.where(valid, idx.long() + s, torch.zeros_like(idx, dtype=torch.long))
            grad_gate = torch.where(valid, (q.gather(1, rank) * ctx.scaling).float(), torch.zeros_like(gate))
        return grad_base, grad_z, grad_b, None, grad_gate, None, None


def _conv_bias(x, weight, bias, conv) -> torch.Tensor:
    out = conv2d_op(x, weight, *conv)
    if bias is not None:
        out.add_(bias.to(out.dtype).view(1, -1, 1, 1))
    return out


class _Conv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias)`` through the :mod:`.cudnn_conv` ops: TF32 off for float32 operands,
    deterministic backward convolutions (on CPU the settings change nothing). The filters from ``ranks_from``
    on are rank filters: the input gradient sees them with non-finite values zeroed, since the gradient of a
    rank channel is zero for every sample that does not pick the rank and ``0 * NaN`` would reach their
    ``dx`` (MOR_SPEC 2.2)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, ranks_from):
        conv = (list(stride), list(padding), list(dilation))
        out = _conv_bias(x, weight, bias, conv)
        ctx.conv, ctx.has_bias, ctx.ranks_from = conv, bias is not None, ranks_from
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dz = dz.contiguous()
        dx = dw = None
        if need[0]:
            filters = weight
            if ctx.ranks_from < weight.shape[0]:  # rank filters: a rank-sized where, never the base weight
                ranks = weight[ctx.ranks_from :]
                ranks = torch.where(torch.isfinite(ranks), ranks, 0)
                filters = ranks if ctx.ranks_from == 0 else torch.cat([weight[: ctx.ranks_from], ranks])
            dx = conv2d_input_op(x, filters, dz, *ctx.conv)
        if need[1]:
            dw = conv2d_weight_op(x, weight, dz, *ctx.conv)
        db = dz.sum((0, 2, 3)) if ctx.has_bias and need[2] else None
        return dx, dw, db, None, None, None, None


def mor_conv2d(x, weight, bias, lora_a, lora_b, idx, gate, num_shared, scaling, stride, padding, dilation):
    """Canonical ``mor_conv2d``: the base convolution (with its bias) and the rank convolution (``lora_a``, all R
    filters), two calls (no ``[weight; lora_a]`` weight is built), then ``mor::conv_up``."""
    dt = _dense_dtype(x)  # on CPU half precision: the rank channels stay float32 too, rounded once at the end
    xd = x.to(dt)
    if needs_grad(x, weight, bias, lora_a, lora_b, gate):

        def conv(w, b, ranks_from):
            return _Conv2d.apply(xd, w, b, stride, padding, dilation, ranks_from)

        up = _ConvUp.apply
    else:  # nothing to differentiate: the same ops without the autograd Functions (which torch.vmap rejects)
        settings = (list(stride), list(padding), list(dilation))

        def conv(w, b, _ranks_from):
            return _conv_bias(xd, w, b, settings)

        up = torch.ops.mor.conv_up
    base = conv(weight.to(dt), _cast(bias, dt), weight.shape[0])
    z_rank = conv(lora_a.to(dt), None, 0)  # every filter is a rank's
    idx, gate, b = idx.to(torch.int32), _gate32(gate), lora_b.to(dt)
    args = (int(num_shared), float(scaling))
    parts = [up(base[c], z_rank[c], b, idx[c], gate[c], *args) for c in _chunks(x.shape[0])]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype)
