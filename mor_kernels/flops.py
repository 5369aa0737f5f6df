"""FLOP and byte formulas for the MoR ops, the bare base layers and a dense (PEFT-style) LoRA.

One module, used by the benchmarks (``benchmarks/bench_mor_lora.py``) and, through
:func:`register_flop_formulas`, by ``torch.utils.flop_counter.FlopCounterMode`` for the ``mor``
custom ops that exist at run time.

Conventions (the same as ``torch.utils.flop_counter``):

- FLOPs count the matrix products and convolutions only, 2 per multiply-add; bias adds, gates,
  scaling and other elementwise work are left out.
- Every layer is seen as an implicit GEMM: ``rows`` output positions (``B * T`` for a Linear,
  ``B * H_out * W_out`` for a conv), a reduction length ``d_in`` (``C_in * kh * kw`` for a conv)
  and ``d_out`` output channels. A rank is one row of ``lora_a`` (a ``kh x kw`` filter for a conv)
  and one column of ``lora_b`` (a 1x1 up-projection).
- LoRA work is counted in **rank-rows**: the sum over output rows of the ranks applied to that row.
  *Useful* FLOPs use the active ranks (shared + distinct routed ranks picked; a zero slot costs
  nothing); *executed* FLOPs use what a backend actually computes (the reference gathers each
  sample's rank list under sample routing and runs all ``R`` ranks, masked, under token routing;
  :func:`executed_rank_rows` has each backend's; :func:`merged_rank_rows` the merged inference path).
- Backward assumes a frozen base weight (no ``dW`` unless ``weight_grad=True``), ``x`` needing its
  gradient (an adapter inside a network), and gradients for ``lora_a``/``lora_b``: the LoRA part
  costs twice its forward (``dh = dy B``, ``dB = dy^T h``, ``dA = dh^T x``, ``dx += dh A``), or
  twice the forward without its repeats where a forward recomputes its down-projection (the Triton
  linear kernel, once per output-column tile).
- Minimal bytes: every input read once and every output written once (nothing re-read, no
  intermediate round trip), which is what a perfectly fused kernel would move.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .kernels.mor_lora_tiles import bwd_column_tiles, fwd_column_tiles, rank_pad

logger = logging.getLogger("mor_kernels")


@dataclass(frozen=True)
class Layer:
    """A Linear or Conv2d layer seen as an implicit GEMM (see the module docstring)."""

    kind: str  # "linear" or "conv2d"
    batch: int
    tokens: int  # output positions per sample: T, or H_out * W_out
    d_in: int  # reduction length: d_in, or C_in * kh * kw
    d_out: int
    x_numel: int  # elements of the input x (for a conv B * C_in * H * W, not the unfolded view)
    bias: bool = True

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    @property
    def weight_numel(self) -> int:
        return self.d_out * self.d_in

    @property
    def y_numel(self) -> int:
        return self.rows * self.d_out


def linear_layer(batch: int, tokens: int, d_in: int, d_out: int, bias: bool = True) -> Layer:
    """``x (batch, tokens, d_in) -> (batch, tokens, d_out)``."""
    return Layer("linear", batch, tokens, d_in, d_out, batch * tokens * d_in, bias)


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """``F.conv2d``'s output size along one spatial dimension."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_layer(
    batch: int,
    c_in: int,
    c_out: int,
    hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    bias: bool = True,
) -> Layer:
    """``x (batch, c_in, H, W)`` convolved by a ``(c_out, c_in, kh, kw)`` filter (groups = 1)."""
    h_out = conv_out_size(hw[0], kernel[0], stride[0], padding[0], dilation[0])
    w_out = conv_out_size(hw[1], kernel[1], stride[1], padding[1], dilation[1])
    return Layer(
        "conv2d", batch, h_out * w_out, c_in * kernel[0] * kernel[1], c_out, batch * c_in * hw[0] * hw[1], bias
    )


# ----------------------------------------------------------------------------------------------
# Ranks


def live_slots(idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``idx`` with every slot whose gate is exactly 0 marked ``-1``: such a slot adds nothing and every backend
    treats it as a zero slot (MOR_SPEC 2.2: its rank is never read), so it does no work to count. Pass the result
    to the functions below when the gates can underflow (a logit gap above ~88 in float32)."""
    if gate.shape != idx.shape:
        raise ValueError(f"gate must have idx's shape {tuple(idx.shape)}, got {tuple(gate.shape)}")
    return torch.where(gate.to(idx.device) == 0, torch.full_like(idx, -1), idx)


def active_ranks(idx: torch.Tensor, num_shared: int) -> torch.Tensor:
    """Active ranks per routing unit: ``num_shared`` plus the distinct routed ranks picked.

    ``idx`` is ``(B, k)`` (sample routing) or ``(B, T, k)`` (token routing), ``-1`` for a zero slot;
    returns an int64 tensor of shape ``idx.shape[:-1]``. A rank picked twice counts once.
    """
    srt = idx.long().sort(dim=-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    return (new & (srt >= 0)).sum(-1) + num_shared


def active_rank_rows(idx: torch.Tensor, num_shared: int, tokens: int) -> int:
    """Useful rank-rows: the sum over output rows of the active ranks (``tokens`` rows per sample)."""
    act = active_ranks(idx, num_shared)
    if idx.dim() == 2:  # sample routing: every row of the sample uses the sample's ranks
        return int(act.sum().item()) * tokens
    return int(act.sum().item())


def ranks_touched(idx: torch.Tensor, num_shared: int) -> int:
    """Distinct ranks used anywhere in the batch (the ``lora_a`` rows a kernel must read)."""
    routed = idx[idx >= 0].long().unique().numel()
    return num_shared + routed


def rank_list_width(idx: torch.Tensor, num_shared: int, ranks: int, *, host: bool = True) -> int:
    """The width of the reference's per-sample rank lists under sample routing (``idx (B, k)``): ``S`` plus
    the most routed picks of any sample (duplicates count twice) where the lists are built on the host
    (CPU), ``S + k`` elsewhere (``host=False``: every slot kept, masked)."""
    if not host:
        return num_shared + idx.shape[-1]
    real = (idx >= 0) & (idx < ranks - num_shared)
    return num_shared + (int(real.sum(-1).max()) if idx.numel() else 0)


def merged_rank_rows(layer: Layer, weights: int, width: int) -> tuple[int, int]:
    """Merged inference as ``(down, up)`` rank-rows for :func:`lora_flops`: building one merged weight
    ``W0 + B diag(g) A`` over a ``width``-rank list is a ``(d_out x width) @ (width x d_in)`` GEMM, i.e.
    the down-projection of ``d_out`` rows; ``weights`` merged weights (1, or one per sample); the base
    GEMM/conv then runs on the merged weight (counted by ``base_flops``)."""
    return weights * layer.d_out * width, 0


def triton_rank_list(n: int) -> int:
    """The Triton kernels' rank-list width for ``n`` ranks: a power of two, at least 16 (``tl.dot``)."""
    return rank_pad(n)


def executed_rank_rows(
    backend: str,
    layer: Layer,
    ranks: int,
    useful_rank_rows: int,
    token_routing: bool,
    *,
    num_shared: int = 0,
    top_k: int = 0,
    list_width: int | None = None,
) -> int | tuple[int, ...]:
    """Rank-rows a backend computes, from each backend's documented design: an int, a pair
    ``(down, up)`` when the down- and up-projections differ, or a triple ``(forward down, up, backward
    down)`` when the forward recomputes the down-projection (see :func:`lora_flops`).

    - ``reference``: under sample routing each sample's gathered rank list, ``list_width`` ranks per row
      (:func:`rank_list_width`; default ``S + k``); all ``R`` under token routing;
    - ``triton``: a rank list of ``RP = triton_rank_list(S + k)`` positions per sample (zero slots save
      loads, not dot FLOPs), ``triton_rank_list(R)`` under token routing. A Linear's one-kernel forward
      recomputes the down-projection in each of its ``cdiv(d_out, BLOCK_N)`` output-column tiles
      (``BLOCK_N`` from the kernel's tile table, a function of the shapes alone), once in the backward,
      whose ``dh = dy B`` is recomputed in each of its ``d_in`` tiles: ``(rows RP tiles, rows RP, rows RP,
      rows RP bwd_tiles)``. A conv
      runs its down-projection as extra output channels of the base conv (all ``R``) and the
      up-projection over the list;
    - ``cpp``: the active ranks only (per sample or per token); a conv: all ``R`` down, active up;
    - ``cuda``: the active ranks under sample routing, all ``R`` under token routing (an upper bound);
      a conv: all ``R`` down, active up (the 16-bit tensor-core forward pads the rank list to a multiple
      of 16, not modelled here);
    - ``blas``: the active ranks under sample routing (zero slots dropped from each sample's list), down and
      up alike; all ``R`` under token routing (the reference's masked path);
    - anything else: all ``R``.
    """
    rows = layer.rows
    conv = layer.kind == "conv2d"
    if backend == "triton":
        rp = triton_rank_list(ranks if token_routing else num_shared + top_k)
        if conv:
            return rows * ranks, rows * rp
        tiles = fwd_column_tiles(layer.batch, layer.tokens, layer.d_out, rp)
        bwd_tiles = bwd_column_tiles(layer.batch, layer.tokens, layer.d_in, layer.d_out, rp)
        return rows * rp * tiles, rows * rp, rows * rp, rows * rp * bwd_tiles
    if backend in ("cpp", "cuda"):
        active = rows * ranks if (backend == "cuda" and token_routing) else useful_rank_rows
        return (rows * ranks, active) if conv else active
    if backend == "blas" and not token_routing:
        return useful_rank_rows
    if backend == "reference" and not token_routing:
        return rows * (num_shared + top_k if list_width is None else list_width)
    return rows * ranks


# ----------------------------------------------------------------------------------------------
# FLOPs


def base_flops(layer: Layer, *, backward: bool = False, weight_grad: bool = False) -> int:
    """The bare layer: forward ``2 rows d_in d_out``; backward adds ``dx`` (and ``dW`` if asked)."""
    fwd = 2 * layer.rows * layer.d_in * layer.d_out
    if not backward:
        return fwd
    return fwd + fwd + (fwd if weight_grad else 0)


def lora_flops(layer: Layer, rank_rows: int | tuple[int, ...], *, backward: bool = False) -> int:
    """The low-rank branch: forward ``2 rank_rows (d_in + d_out)`` (down then up projection), or
    ``2 (down d_in + up d_out)`` for a pair ``rank_rows = (down, up)``; with ``backward`` the total of
    forward and backward, which does twice the forward's work (``dh``, ``dB`` on the up side, ``dA``,
    ``dx`` on the down side). A triple ``(down, up, down_bwd)`` gives the backward's down-side rank-rows
    apart, for a forward that repeats its down-projection (the Triton linear kernel, per column tile), and a
    fourth entry the rank-rows of the backward's ``dh = dy B`` when it is repeated too (per ``d_in`` tile)."""
    if isinstance(rank_rows, tuple):
        down, up, down_bwd, up_dh = _rows4(rank_rows)
    else:
        down = up = down_bwd = up_dh = rank_rows
    fwd = 2 * (down * layer.d_in + up * layer.d_out)
    return fwd + 4 * down_bwd * layer.d_in + 2 * (up + up_dh) * layer.d_out if backward else fwd


def _rows4(rank_rows: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(down, up, down_bwd, up_dh)`` from a pair, triple or quadruple of :func:`lora_flops`."""
    if len(rank_rows) == 2:
        return rank_rows[0], rank_rows[1], rank_rows[0], rank_rows[1]
    if len(rank_rows) == 3:
        return (*rank_rows, rank_rows[1])
    return tuple(rank_rows)


def op_flops(op: str, layer: Layer, rank_rows: int | tuple[int, ...] = 0, *, backward: bool = False) -> int:
    """FLOPs of one call (forward, or forward + backward) of ``op``:

    - ``"base"``: the bare ``F.linear`` / ``F.conv2d``;
    - ``"mor_lora"``: the low-rank branch alone (``base`` is an input, not computed);
    - ``"mor_linear"``, ``"mor_conv2d"``, ``"lora"`` (dense LoRA, ``rank_rows = rows * r``): base + branch.
    """
    if op == "base":
        return base_flops(layer, backward=backward)
    if op == "mor_lora":
        return lora_flops(layer, rank_rows, backward=backward)
    if op in ("mor_linear", "mor_conv2d", "lora"):
        return base_flops(layer, backward=backward) + lora_flops(layer, rank_rows, backward=backward)
    raise ValueError(f"op must be base, lora, mor_lora, mor_linear or mor_conv2d, got {op!r}")


# ----------------------------------------------------------------------------------------------
# Bytes


def min_bytes(
    op: str,
    layer: Layer,
    dtype: torch.dtype,
    *,
    ranks_read: int = 0,
    ranks: int | None = None,
    routing_numel: int = 0,
    backward: bool = False,
) -> int:
    """Minimal bytes moved by one call of ``op`` (see :func:`op_flops` for the op names).

    Args:
        ranks_read: ranks whose ``lora_a`` row and ``lora_b`` column must be read (the distinct
            ranks used, :func:`ranks_touched`; ``r`` for a dense LoRA).
        ranks: ``R``, the size of the ``lora_a``/``lora_b`` gradients written in backward
            (default ``ranks_read``).
        routing_numel: elements of ``idx`` (int32) and of ``gate`` (float32) each (0 for no routing).
        backward: forward + backward: the backward reads ``dy``, ``x`` (for ``dA``), the weights and
            the routing, and writes ``dx``, ``dA``, ``dB`` and ``dgate`` (the base weight is frozen).
    """
    if op not in ("base", "lora", "mor_lora", "mor_linear", "mor_conv2d"):
        raise ValueError(f"op must be base, lora, mor_lora, mor_linear or mor_conv2d, got {op!r}")
    e = torch.empty((), dtype=dtype).element_size()
    ranks = ranks_read if ranks is None else ranks
    lora = op != "base"
    with_base = op != "mor_lora"
    w = (layer.weight_numel + (layer.d_out if layer.bias else 0)) if with_base else 0
    a_b = ranks_read * (layer.d_in + layer.d_out) if lora else 0
    route = routing_numel * 8 if op.startswith("mor") else 0  # int32 idx + float32 gate
    base_in = layer.y_numel if op == "mor_lora" else 0  # mor_lora reads ``base``
    fwd = e * (layer.x_numel + w + a_b + base_in + layer.y_numel) + route
    if not backward:
        return fwd
    x_read = layer.x_numel if lora else 0
    grads = ranks * (layer.d_in + layer.d_out) if lora else 0
    dbase = layer.y_numel if op == "mor_lora" else 0  # d(base) = dy, written out
    bwd = e * (layer.y_numel + x_read + w + a_b + layer.x_numel + grads + dbase) + 2 * route
    return fwd + bwd


# ----------------------------------------------------------------------------------------------
# torch.utils.flop_counter registration for the ``mor`` custom ops

_REGISTERED: dict[str, str] = {}


def _mor_op_names() -> list[str]:
    """Names (without the namespace) of the ``mor::`` ops registered in this process."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n.split("::", 1)[1].split(".", 1)[0] for n in names if n.startswith("mor::")})


def _load_op_libraries() -> dict[str, str]:
    """Imports what registers ``mor`` ops (the extension, the Triton backend); returns why not."""
    import importlib
    import importlib.util

    from . import _extension

    notes = {}
    _, why = _extension.load()
    if why is not None:
        notes["extension"] = why
    path = "mor_kernels.ops.triton_backend"
    try:
        if importlib.util.find_spec(path) is None:
            notes["triton_backend"] = f"{path} is missing"
        else:
            importlib.import_module(path)
    except Exception as err:  # an import-time failure of another module must not break counting
        notes["triton_backend"] = f"{path} could not be imported: {type(err).__name__}: {err}"
    return notes


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= int(v)
    return out


def _rows(shape) -> int:
    """Rows of a ``(B, T, N)`` (or ``(B, *tokens, N)``) shape."""
    return _prod(shape[:-1])


def _outs(out_shape) -> list:
    """The output shapes of an op as a list (one entry for a single-output op)."""
    if out_shape is None:
        return []
    if len(out_shape) and isinstance(out_shape[0], (list, tuple, torch.Size)):
        return list(out_shape)
    return [out_shape]


# Per-stage formulas of the known ``mor`` ops: ``f(args by schema name, out_shape) -> flops``. Rank-list
# tensors (``u``, ``du``: ``(B, T, RP)``) carry the number of ranks the kernel runs.
def _triton_fwd(a, out):
    """One launch: the base GEMM (with a weight), ``u = x A^T`` once per output-column tile, ``h B^T``."""
    x, (d_out, ranks) = a["x"], a["lora_b"]
    batch, rows, d_in = int(x[0]), _rows(x), int(x[-1])
    rp = triton_rank_list(ranks if len(a["idx"]) == 3 else int(a.get("num_shared", 0) or 0) + a["idx"][-1])
    tiles = fwd_column_tiles(batch, rows // max(batch, 1), d_out, rp)
    base = 2 * rows * d_in * d_out if a.get("weight") is not None else 0
    return base + 2 * rows * rp * d_in * tiles + 2 * rows * rp * d_out


def _triton_bwd(a, out):
    """Two launches: ``dh = dy B`` over the rank list in each ``d_in`` tile, ``dB^T = h^T dy``, ``dx = du A (+ dy
    W)`` and ``dA = du^T x``, as ``needs`` asks."""
    dy, x = a["dy"], a["x"]
    batch, rows, d_in, d_out, rp = int(dy[0]), _rows(dy), int(x[-1]), int(dy[-1]), int(a["u"][-1])
    need_x, need_a, need_b, need_g = (list(a.get("needs") or [True] * 4) + [True] * 4)[:4]
    tiles = bwd_column_tiles(batch, rows // max(batch, 1), d_in, d_out, rp) if (need_x or need_a) else 1
    flop = 2 * rows * rp * d_out * tiles
    flop += 2 * rows * rp * d_out if need_b else 0
    flop += 2 * rows * rp * d_in * (int(bool(need_x)) + int(bool(need_a)))
    flop += 2 * rows * d_out * d_in if need_x and a.get("weight") is not None else 0
    return flop


def _conv_rows(out) -> int:  # B H_out W_out of a (B, C, H_out, W_out) shape
    return int(out[0]) * _prod(out[2:])


def _triton_conv2d(a, out):
    """``conv(x, W0)``, ``conv(x, A)`` over all R ranks, the up-projection over the rank list."""
    y = _outs(out)[0]
    w, (ranks, *patch) = a["weight"], a["lora_a"]
    rows, k = _conv_rows(y), _prod(patch)
    rp = triton_rank_list(int(a.get("num_shared", 0) or 0) + a["idx"][-1])
    return 2 * rows * k * (int(w[0]) + ranks) + 2 * rows * rp * int(w[0])


def _triton_conv2d_bwd(a, out):
    """``dh``, ``dB`` over the rank list; the input gradient of ``W0`` and of the R rank filters (16-bit inputs
    run the rank part over ``2R`` channels, ``dz`` split in two halves: not seen from shapes, not counted);
    ``dW``; ``dA`` over the R ranks."""
    dy, (ranks, *patch) = a["dy"], a["lora_a"]
    rows, k, c_out = _conv_rows(dy), _prod(patch), int(dy[1])
    rp = triton_rank_list(int(a.get("num_shared", 0) or 0) + a["idx"][-1])
    need_x, need_w, need_a, need_b, need_g = (list(a.get("needs") or [True] * 5) + [True] * 5)[:5]
    flop = 2 * rows * rp * c_out if (need_x or need_a or need_b or need_g) else 0
    flop += 2 * rows * rp * c_out if need_b else 0
    flop += 2 * rows * k * (c_out + ranks) if need_x else 0
    flop += 2 * rows * k * c_out if need_w else 0
    flop += 2 * rows * k * ranks if need_a else 0
    return flop


def _conv_up(a, out):  # base (B, C_out, H, W): the gated 1x1 up-projection over the active ranks
    z = a["base"] if "base" in a else a["out"]
    c_out, ranks = a["lora_b"]
    return 2 * z[0] * _prod(z[2:]) * min(ranks, int(a.get("num_shared", 0) or 0) + a["idx"][-1]) * c_out


def _lora_fwd(a, out):  # C++/CUDA: active ranks gathered under sample routing, all R under token routing
    ranks, token = a["lora_a"][0], len(a["idx"]) == 3
    per_row = ranks if token else min(ranks, int(a.get("num_shared", 0) or 0) + a["idx"][-1])
    return 2 * _rows(a["x"]) * per_row * (a["x"][-1] + a["lora_b"][0])


def _lora_bwd(a, out):
    ranks, token = a["lora_a"][0], len(a["idx"]) == 3
    per_row = ranks if token else min(ranks, int(a.get("num_shared", 0) or 0) + a["idx"][-1])
    rows, d_in, d_out = _rows(a["x"]), a["x"][-1], a["lora_b"][0]
    need_x, need_a, need_b, need_g = (list(a.get("output_mask") or [True] * 4) + [True] * 4)[:4]
    flop = 2 * rows * per_row * d_out if (need_x or need_a or need_g) else 0  # dh = dy B
    flop += 2 * rows * per_row * d_in * (int(bool(need_x)) + int(bool(need_a)))  # dx += dh A, dA = dh^T x
    flop += 2 * rows * per_row * d_out if need_b else 0  # dB = dy^T h
    return flop


def _blas_sizes(a, rows):
    """``(rows, d_in, d_out, n)`` of a BLAS op (``mor::blas_mor_*``): ``d_in`` = C_in kh kw for a conv, ``n`` =
    S + k (every slot a real rank: shapes cannot tell zero slots, so an upper bound)."""
    lora_a, idx = a["lora_a"], a["idx"]
    ranks = int(lora_a[0])
    return rows, _prod(lora_a[1:]), int(a["weight"][0]), min(ranks, int(a.get("num_shared", 0) or 0) + int(idx[-1]))


def _blas_fwd(a, out):
    """The base GEMM/conv, then the merged weights (one ``d_out x n x d_in`` GEMM per sample: an upper bound, samples
    routed alike share one) when no ``u`` is stored and ``rho > merge_above``, else ``x A_act^T`` and its
    up-projection over the rows."""
    y = _outs(out)[0] if out is not None else None
    conv = len(a["weight"]) == 4
    rows = _conv_rows(y) if conv else _rows(a["x"])
    rows, d_in, d_out, n = _blas_sizes(a, rows)
    batch = int(a["x"][0])
    tokens = rows // max(batch, 1)
    rho = tokens * (int(a["x"][1] if conv else a["x"][-1]) + d_out) / max(d_in * d_out, 1)
    base = 2 * rows * d_in * d_out
    if not a.get("store_u", False) and rho > float(a.get("merge_above", math.inf)):
        return base + 2 * batch * d_out * n * d_in
    return base + 2 * rows * n * (d_in + d_out)


def _blas_bwd(a, out):
    """The base layer's dx and dW, ``du = dy B_act``, dx's and dA's rank terms, dB (``output_mask``: x, weight,
    bias, lora_a, lora_b, gate)."""
    conv = len(a["weight"]) == 4
    rows = _conv_rows(a["grad_y"]) if conv else _rows(a["x"])
    rows, d_in, d_out, n = _blas_sizes(a, rows)
    need_x, need_w, _, need_a, need_b, need_g = (list(a.get("output_mask") or [True] * 6) + [True] * 6)[:6]
    flop = 2 * rows * d_in * d_out * (int(bool(need_x)) + int(bool(need_w)))
    flop += 2 * rows * n * d_out if (need_x or need_a or need_g) else 0
    flop += 2 * rows * n * d_in * (int(bool(need_x)) + int(bool(need_a)))
    flop += 2 * rows * n * d_out if need_b else 0
    return flop


_STAGES = {
    "triton_lora_fwd": _triton_fwd,
    "triton_lora_bwd": _triton_bwd,
    "triton_conv2d": _triton_conv2d,
    "triton_conv2d_bwd": _triton_conv2d_bwd,
    "conv_up": _conv_up,
    "lora_fwd": _lora_fwd,
    "lora_bwd": _lora_bwd,
    "blas_mor_linear_fwd": _blas_fwd,
    "blas_mor_linear_bwd": _blas_bwd,
    "blas_mor_conv2d_fwd": _blas_fwd,
    "blas_mor_conv2d_bwd": _blas_bwd,
}


def _generic(name: str):
    """For an op not in ``_STAGES`` whose schema names ``x``, ``lora_a``, ``idx`` and ``lora_b`` or
    ``weight``: the whole layer (base GEMM when ``weight`` is given, plus the low-rank branch)."""
    backward = any(t in name for t in ("bwd", "backward", "grad"))
    conv = "conv" in name

    def formula(a, out_shape) -> int:
        x, lora_a, idx = a["x"], a["lora_a"], a["idx"]
        ranks = int(lora_a[0])
        num_shared = int(a.get("num_shared", 0) or 0)
        d_out = int(a["lora_b"][0]) if "lora_b" in a else int(a["weight"][0])
        outs = _outs(out_shape)
        if conv:
            out = outs[0] if outs else None
            tokens = _prod(out[2:]) if (not backward and out is not None and len(out) == 4) else _prod(x[2:])
            layer = Layer("conv2d", int(x[0]), tokens, _prod(lora_a[1:]), d_out, _prod(x), True)
        else:
            layer = Layer("linear", int(x[0]), _prod(x[1:-1]), int(x[-1]), d_out, _prod(x), True)
        per_row = ranks if len(idx) == 3 else min(ranks, num_shared + int(idx[-1]))
        lora = 2 * layer.rows * per_row * (layer.d_in + layer.d_out)
        base = 2 * layer.rows * layer.d_in * layer.d_out if a.get("weight") is not None else 0
        # a backward op alone: 2x the branch's forward, and dx of the frozen base (1x its forward)
        return 2 * lora + base if backward else lora + base

    return formula


def _formula_for(name: str, arg_names: list[str]):
    """A shape-only FLOP formula for ``mor::<name>``, arguments bound by its schema's names; None when
    there is no matmul to count (routing, gates) or the arguments are not recognised."""
    stage = _STAGES.get(name)
    if stage is None:
        if not ({"x", "lora_a", "idx"} <= set(arg_names) and {"lora_b", "weight"} & set(arg_names)):
            return None
        stage = _generic(name)

    def formula(*args, out_shape=None, **kwargs) -> int:
        a = dict(zip(arg_names, args, strict=False))
        a.update(kwargs)
        try:
            return int(stage(a, out_shape))
        except Exception as err:  # a schema that changed under us must not break the user's counting
            logger.warning(
                "mor_kernels.flops: no FLOP count for mor::%s (%s: %s); counted as 0", name, type(err).__name__, err
            )
            return 0

    return formula


def register_flop_formulas() -> dict[str, str]:
    """Registers FLOP formulas with ``torch.utils.flop_counter`` for the ``mor`` ops that exist.

    Loads the compiled extension and the Triton backend when they import (``mor::<op>`` and
    ``mor::triton_<op>``), then registers a formula for every stage it knows (``_STAGES``: the Triton
    forward and backward launches, ``conv_up``, ``lora_fwd``/``lora_bwd``) and for any other op
    whose schema names ``x``, ``lora_a``, ``idx`` and ``lora_b`` or ``weight``. A Triton stage is
    counted at the ``RP`` ranks of its rank list, the forward with its recomputation of ``x A^T`` in
    each output-column tile; otherwise shapes alone
    cannot say which slots are zero slots, so the count assumes every selected slot is a real rank
    under sample routing (the upper bound for a kernel that skips zero slots) and all ``R`` ranks under
    token routing (a dense tile). Routing and gate ops have no matmul and are skipped. Safe to call
    repeatedly; never raises. Returns ``{op name: "registered" or the reason it was skipped}``.
    """
    from torch.utils import flop_counter

    aten = torch.ops.aten
    for inplace, op in ((aten.addmm_, aten.addmm), (aten.baddbmm_, aten.baddbmm)):
        # the reference adds its low-rank part into the base output in place (no extra output tensor)
        if inplace not in flop_counter.flop_registry and op in flop_counter.flop_registry:
            flop_counter.register_flop_formula(inplace, get_raw=True)(flop_counter.flop_registry[op])
    for lib, why in _load_op_libraries().items():
        _REGISTERED.setdefault(f"<{lib}>", f"not loaded: {why}")
    for name in _mor_op_names():
        if _REGISTERED.get(name) == "registered":
            continue
        try:
            packet = getattr(torch.ops.mor, name)
            overload = packet.default if "default" in packet.overloads() else getattr(packet, packet.overloads()[0])
            arg_names = [arg.name for arg in overload._schema.arguments]
        except Exception as err:
            _REGISTERED[name] = f"skipped: schema unreadable ({type(err).__name__}: {err})"
            continue
        if packet in flop_counter.flop_registry:
            _REGISTERED[name] = "registered"  # by an earlier call or by the op's own module (e.g. mor::conv2d)
            continue
        formula = _formula_for(name, arg_names)
        if formula is None:
            _REGISTERED[name] = f"skipped: no matmul formula for arguments {arg_names}"
            continue
        try:
            flop_counter.register_flop_formula(packet)(formula)
        except Exception as err:
            _REGISTERED[name] = f"skipped: registration failed ({type(err).__name__}: {err})"
            continue
        _REGISTERED[name] = "registered"
    return dict(_REGISTERED)
