"""Per-image inference state of the MoR layers: routing once per image, merged weights per image.

With sample routing on the degradation vector, a layer's ranks and gates depend on the image's scores
alone, so in inference they need not be recomputed per call. :func:`attach` (called by
``set_degradation``) gives every MoR layer of a module one shared :class:`ImageState` for the scores.
The first layer that runs in inference (no gradient needed, sample routing, router on the degradation
vector only, the scores still the router's) routes the whole module in one pass: every router's logits in
one GEMM over the routers' stacked weights (kept across images while no router weight changes), then one
``mor_kernels.route`` call for all of them. That is the routers' float32 arithmetic up to the rounding of one
GEMM's blocking against another's; the routers go on recording ``last_probs``/``last_idx`` for the statistics.

Each call then runs, by the layer's ``merge`` mode and ``mor_kernels.dispatch.merge_plan``'s measured
cost model: the **merged path** (``W_b = W0 + B_act diag(g) A_act`` built on the first call that wants
it and kept for the image's later calls: tiles, the GroupNorm statistics pass), the **prepared
low-rank path** where ``"auto"`` runs the reference backend (the base layer plus two skinny GEMMs: the
op count of a dense LoRA), or the backend's fused op with the prepared routing (the BLAS op on a CPU,
which reads the active ranks itself). On a CPU in float32 the BLAS op ``mor::blas_merged_weights`` makes
the merged weights in one call; otherwise the merged and the reference paths use the layer's active low-rank
factors (``mor_kernels.reference.factors``: the picked rows of ``A``, the picked columns of ``B`` with
the gates folded in), gathered on their first use in the image; a layer on a fused op never makes them.
``layer.last_path`` says which ran and why. Which path a layer runs depends on sizes and settings only:
the plan is kept on the layer across images (made again after ``set_merge`` or
``mor_kernels.dispatch.clear_cache``).

Nothing outlives the scores: new scores (or ``None``) replace the state, and with it every merged
weight and factor. A layer whose weights changed in place since the preparation (``load_adapter``)
prepares itself again; a forward that needs gradients never uses the state.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import mor_kernels
from mor_kernels import dispatch
from mor_kernels.reference.factors import (
    RankFactors,
    add_lowrank_conv2d,
    add_lowrank_linear,
    merge_weights,
    merged_conv2d,
    merged_linear,
    rank_factors,
)

MERGE_MODES = dispatch.MERGE_MODES


@dataclass
class _Entry:
    """One layer's prepared inference: routing, factors, the merged weight once built, and what it was made of."""

    idx: torch.Tensor  # (B, k) int32
    gate: torch.Tensor  # (B, k) float32
    router_state: dict  # what MoRRouter.forward would record (last_probs, last_idx, ...)
    dtype: torch.dtype
    refs: tuple  # the tensors the entry was made from ...
    versions: tuple  # ... and their in-place version counters then
    args: tuple = ()  # (lora_a, lora_b, num_shared, scaling): what the factors are made from
    _factors: RankFactors | None = None
    merged: torch.Tensor | None = None
    runs: dict = field(default_factory=dict)  # (x shape, device) -> (last_path, fn): this image's calls per size

    @property
    def factors(self) -> RankFactors:
        """The active rank factors, gathered on first use (the merged and reference paths use them; the fused
        backends gather in their own op, so a layer that runs one never pays for them)."""
        if self._factors is None:
            lora_a, lora_b, num_shared, scaling = self.args
            with torch.no_grad():
                self._factors = rank_factors(lora_a, lora_b, self.idx, self.gate, num_shared, scaling, self.dtype)
        return self._factors

    def valid(self, layer, dtype: torch.dtype) -> bool:
        """Made for ``dtype`` from the layer's current tensors, none changed in place since."""
        if dtype != self.dtype:
            return False
        now = _refs(layer)
        return all(t is r and t._version == v for t, r, v in zip(now, self.refs, self.versions, strict=True))


def _refs(layer) -> tuple:
    """The tensors a layer's entry depends on besides the scores (fetched from the module dicts: attribute
    access on a module is slow, and this runs once per call)."""
    p, router = layer._parameters, layer._modules["router"]._modules["degradation"]._parameters
    return (p["lora_a"], p["lora_b"], layer._modules["base_layer"]._parameters["weight"], router["weight"],
            router["bias"])  # fmt: skip


_ROUTER_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first layer of a group -> its stack


def _router_stack(layers) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (L N, D), bias (L N,))`` float32: the degradation routers of ``layers`` stacked, made once and
    kept while none of their parameters is replaced or changed in place."""
    params = []
    for layer in layers:
        p = layer._modules["router"]._modules["degradation"]._parameters
        params += [p["weight"], p["bias"]]
    versions = tuple(t._version for t in params)
    kept = _ROUTER_STACKS.get(layers[0])
    if kept is not None and kept[1] == versions and all(a is b for a, b in zip(kept[0], params, strict=True)):
        return kept[2], kept[3]
    with torch.no_grad():
        weight, bias = torch.cat(params[0::2]).float(), torch.cat(params[1::2]).float()
    _ROUTER_STACKS[layers[0]] = (params, versions, weight, bias)
    return weight, bias


def _group_logits(layers, scores: torch.Tensor) -> torch.Tensor:
    """``(L, B, N)`` float32: the degradation logits of every router of ``layers`` (same weight shape and device)
    for ``scores``, in one GEMM over the stacked router weights: the float32 ``F.linear`` of
    ``MoRRouter._logits`` row by row, one op instead of one per layer (on a CPU ~25 us of Python and dispatch per
    layer, on a GPU a kernel launch each: 258 in the SD 2.1 UNet)."""
    weight, bias = _router_stack(layers)
    with torch.autocast(scores.device.type, enabled=False):  # float32 logits even under autocast, as the routers
        s = scores.to(device=weight.device, dtype=torch.float32)
        return F.linear(s, weight, bias).view(s.shape[0], len(layers), -1).transpose(0, 1)


def _eligible(layer) -> str | None:
    """Why ``layer`` routes on something else than the scores alone (None when it does not)."""
    r = layer._modules["router"]
    if r._modules.get("token") is not None or r._modules.get("degradation") is None or r.routing != "sample":
        return "the routing depends on the tokens (routing or router_input), not on the scores alone"
    return None


def needs_grad(layer, x: torch.Tensor) -> bool:
    """Whether this forward records a gradient for the layer (then it never uses the per-image state)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in layer.parameters())


class ImageState:
    """The per-image inference state shared by the MoR layers of one module (see the module docstring)."""

    def __init__(self, layers, scores: torch.Tensor):
        self.layers = list(layers)
        self.scores = scores
        self._entries: dict[int, _Entry] | None = None

    def lookup(self, layer, x: torch.Tensor) -> _Entry | None:
        """``layer``'s entry for this call, or None when the state does not apply (:meth:`why_not`)."""
        if needs_grad(layer, x) or torch.compiler.is_compiling() or x.shape[0] != self.scores.shape[0]:
            return None
        if layer._modules["router"].__dict__["_scores"] is not self.scores:
            return None
        if self._entries is None:
            self._prepare()
        entry = self._entries.get(id(layer))
        if entry is None or not entry.valid(layer, x.dtype):
            if _eligible(layer) is not None:
                return None
            entry = self._entries[id(layer)] = self._route_one(layer, x.dtype)
        return entry

    def why_not(self, layer, x: torch.Tensor) -> str:
        """Why :meth:`lookup` returned None."""
        if needs_grad(layer, x):
            return "a gradient is needed"
        if torch.compiler.is_compiling():
            return "torch.compile is tracing"
        if x.shape[0] != self.scores.shape[0]:
            return "batch size differs from the scores'"
        if layer.router._scores is not self.scores:
            return "the router's scores changed since set_degradation"
        return _eligible(layer) or "?"

    # -- preparation ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Routes every eligible layer in one ``route`` call per router configuration (the rank factors wait for
        their first use, :attr:`_Entry.factors`)."""
        # Once per image for every layer (258 in the SD 2.1 UNet), before the first layer's kernels: module
        # dicts rather than attribute lookups, one unbind per routing output rather than an index op per layer.
        groups: dict[tuple, list] = {}
        for layer in self.layers:
            r = layer._modules["router"]
            if r.__dict__["_scores"] is self.scores and _eligible(layer) is None:
                w = r._modules["degradation"]._parameters["weight"]
                key = (r.top_k, r.num_zero, r.renormalize, r.backend, tuple(w.shape), w.device)
                groups.setdefault(key, []).append(layer)
        self._entries = {}
        severities: dict = {}
        with torch.no_grad():
            for (top_k, num_zero, renormalize, backend, *_), layers in groups.items():
                logits = _group_logits(layers, self.scores)
                idx, gate, probs = mor_kernels.route(logits, top_k, num_zero, renormalize, backend=backend)
                for layer, i, g, p in zip(layers, idx.unbind(0), gate.unbind(0), probs.unbind(0), strict=True):
                    dtype = layer._modules["base_layer"]._parameters["weight"].dtype
                    self._entries[id(layer)] = self._entry(layer, i, g, p, dtype, severities)

    def _route_one(self, layer, dtype: torch.dtype) -> _Entry:
        """One layer routed on its own (its weights changed since the preparation, or another dtype)."""
        with torch.no_grad():
            idx, gate = layer.router(self.scores)  # the scores stand in for x (batch size only)
            return self._entry(layer, idx, gate, layer.router.last_probs, dtype, {})

    def _entry(self, layer, idx, gate, probs, dtype, severities: dict) -> _Entry:
        """``severities``: the routers' severity on ``probs``' device, by the router's tensor (``set_degradation``
        gives every router the same one), shared by the entries of one preparation."""
        batch, device = self.scores.shape[0], probs.device
        sev = layer._modules["router"].__dict__.get("_severity")
        key = (None if sev is None else id(sev), device)
        last = severities.get(key)
        if last is None:
            last = severities[key] = sev.to(device) if sev is not None else torch.ones(batch, device=device)
        state = {"last_probs": probs, "last_idx": idx, "last_batch": batch, "last_severity": last}
        refs = _refs(layer)
        args = (refs[0], refs[1], layer.num_shared, layer.scaling)  # lora_a, lora_b
        return _Entry(idx, gate, state, dtype, refs, tuple(t._version for t in refs), args)

    # -- one call ------------------------------------------------------------------------------
    def forward(self, layer, entry: _Entry, x: torch.Tensor, weight, bias, conv: dict | None) -> torch.Tensor:
        """``layer``'s output for ``x`` (operands already in the compute dtype); ``conv``: the conv settings.
        The path is decided once per entry and input size (the decision and its reason are kept)."""
        layer._modules["router"].__dict__.update(entry.router_state)  # what the router would record
        size = (x.shape, x.device)
        run = entry.runs.get(size)
        if run is None:
            run = entry.runs[size] = _decide(layer, entry, x, weight, conv)
        layer.__dict__["last_path"] = run[0]
        return run[1](x, weight, bias)


def _plan(layer, x: torch.Tensor, weight: torch.Tensor, conv: dict | None) -> tuple[str, str]:
    """``(path, why)`` for a call of ``layer`` on ``x``'s size: ``path`` is ``"merged"`` (the merged weights made
    from the rank factors), ``"merged_op"`` (made by the BLAS op ``mor::blas_merged_weights``: float32 where
    ``backend`` resolves to ``"blas"``), ``"reference"`` (the prepared low-rank path) or ``"fused"`` (the
    backend's op with the prepared routing). Depends on sizes and settings only, so :func:`_decide` keeps it on
    the layer across images."""
    batch = x.shape[0]
    if conv is None:
        tokens, c_in = x.numel() // max(batch * x.shape[-1], 1), x.shape[-1]
    else:
        tokens, c_in = _conv_tokens(x, weight, conv), weight.shape[1]
    plan = dispatch.merge_plan(x.device.type, tokens, c_in, weight.shape[0], mode=layer.merge,
                               backend=layer.config.backend, kernel=tuple(weight.shape[2:]))  # fmt: skip
    op = "mor_linear" if conv is None else "mor_conv2d"
    backend = dispatch.resolve(op, layer.config.backend, x.device, x.dtype).backend
    if plan.merge:
        if backend == "blas" and x.dtype == torch.float32:  # one C++ call: lists, gathers and the merge
            return "merged_op", f"merged (per-image weights, made by mor::blas_merged_weights): {plan.why}"
        return "merged", f"merged (per-image weights): {plan.why}"
    if backend == "reference":
        return "reference", f"low-rank (reference, rank factors prepared per image): {plan.why}"
    return "fused", f"low-rank (backend {backend!r}, routing prepared per image): {plan.why}"


_PLANS_KEPT = 64  # sizes a layer remembers (tiles of a few sizes, the GroupNorm statistics pass...)


def _decide(layer, entry: _Entry, x: torch.Tensor, weight: torch.Tensor, conv: dict | None):
    """``(what runs and why, fn(x, weight, bias))`` for this entry and input size. The plan is kept on the
    layer (sizes, device, dtype, merge mode, backend and dispatch's generation as the key), so only the first
    image of a size pays for the decision."""
    key = (x.shape, x.device, x.dtype, weight.shape, layer.merge, layer.config.backend, dispatch.generation())
    plans = layer.__dict__.setdefault("_path_plans", {})
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _PLANS_KEPT:
            plans.clear()
            layer.__dict__.pop("_checked_calls", None)
        plan = plans[key] = _plan(layer, x, weight, conv)
    path, why = plan
    if path in ("merged", "merged_op"):

        def merged(x, weight, bias):
            if entry.merged is None:  # built by the first call that wants it, kept for the image's later calls
                entry.merged = _merged_weights(weight, entry, path == "merged_op")
            if conv is None:
                return merged_linear(x, entry.merged, bias)
            return merged_conv2d(x, entry.merged, bias, conv["stride"], conv["padding"], conv["dilation"])

        return why, merged
    if path == "reference":
        if conv is None:
            return why, functools.partial(_lowrank_linear, f=entry.factors)
        s, p, d = conv["stride"], conv["padding"], conv["dilation"]

        def lowrank_conv(x, weight, bias):
            y = F.conv2d(x, weight, bias, s, p, d)
            return add_lowrank_conv2d(y, x, entry.factors, s, p, d)

        return why, lowrank_conv

    op = "mor_linear" if conv is None else "mor_conv2d"
    backend = layer.config.backend
    kw = dict(backend=backend, check_indices=False, merge="never")

    def public(x, weight, bias, a, b):
        args = (x, weight, bias, a, b, entry.idx, entry.gate, layer.num_shared, layer.scaling)
        if conv is None:
            return mor_kernels.mor_linear(*args, **kw)
        return mor_kernels.mor_conv2d(*args, conv["stride"], conv["padding"], conv["dilation"], **kw)

    if dispatch.resolve(op, backend, x.device, x.dtype).backend == "blas":  # its public op goes straight to C++

        def fused(x, weight, bias):
            return public(x, weight, bias, *_adapters(layer, x.dtype))

        return why, fused

    # After one call of this plan passed the public op's checks, the next ones (later images: a layer runs once
    # per image) call the backend directly with the same kinds of arguments: ~17 us of Python checks per layer
    # and image saved, on a GPU host time next to the kernels. Under autocast the public op runs (it casts).
    checked = layer.__dict__.setdefault("_checked_calls", {}).setdefault(key, {})  # stamp -> backend function

    def fused(x, weight, bias):
        a, b = _adapters(layer, x.dtype)
        idx, gate = entry.idx, entry.gate
        stamp = (weight.dtype, weight.device, None if bias is None else (bias.dtype, bias.device), a.shape, b.shape,
                 a.dtype, a.device, idx.shape, idx.dtype, idx.device, gate.dtype, gate.device)  # fmt: skip
        impl = checked.get(stamp)
        if impl is None or torch.is_autocast_enabled(x.device.type):
            y = public(x, weight, bias, a, b)
            if impl is None:  # operands in one dtype (what the stamp says): the backend's prepared entry point
                one = {weight.dtype, a.dtype, b.dtype, x.dtype, weight.dtype if bias is None else bias.dtype}
                get = (
                    dispatch.prepared_implementation
                    if len(one) == 1 and idx.dtype == torch.int32
                    else dispatch.implementation
                )
                checked[stamp] = get(op, backend, x.device, x.dtype)
            return y
        num_shared, scaling = int(layer.num_shared), float(layer.scaling)
        if conv is None:
            if x.dim() == 3:  # (B, T, C), as the attention and feed-forward layers give it: no reshaping (~3 us)
                return impl(x, weight, bias, a, b, idx, gate, num_shared, scaling)
            tokens = math.prod(x.shape[1:-1])
            y = impl(x.reshape(x.shape[0], tokens, x.shape[-1]), weight, bias, a, b, idx, gate, num_shared, scaling)
            return y.view(*x.shape[:-1], y.shape[-1])
        return impl(x, weight, bias, a, b, idx, gate, num_shared, scaling, conv["stride"], conv["padding"],
                    conv["dilation"])  # fmt: skip

    return why, fused


def _adapters(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``lora_a``, ``lora_b`` in ``dtype`` for the fused path: the parameters themselves when they are in it,
    else a cast copy kept on the layer until a parameter is replaced, moved or changed in place. A half-precision
    model keeps float32 adapters (``MoRLayer``), so casting per call would cost two kernel launches per layer and
    image on a GPU (516 in the SD 2.1 UNet) for the same two tensors every time."""
    p = layer._parameters
    a, b = p["lora_a"], p["lora_b"]
    if a.dtype == dtype and b.dtype == dtype:
        return a, b
    stamp = (dtype, a._version, b._version, a.data_ptr(), b.data_ptr())
    kept = layer.__dict__.get("_cast_adapters")
    if kept is not None and kept[0] is a and kept[1] is b and kept[2] == stamp:
        return kept[3], kept[4]
    with torch.no_grad():
        cast = (a.to(dtype), b.to(dtype))
    layer.__dict__["_cast_adapters"] = (a, b, stamp, *cast)
    return cast


def _merged_weights(weight: torch.Tensor, entry: _Entry, by_op: bool) -> torch.Tensor:
    """``(D, *weight.shape)``: ``W0 + B_act diag(g) A_act`` per distinct routing of the entry, by the BLAS op
    (``by_op``: lists, gathers and merge in one C++ call) or from the entry's rank factors."""
    if not by_op:
        return merge_weights(weight, entry.factors)
    lora_a, lora_b, num_shared, scaling = entry.args
    a, b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
    return torch.ops.mor.blas_merged_weights(weight, a, b, entry.idx, entry.gate, num_shared, float(scaling))


def _lowrank_linear(x, weight, bias, f: RankFactors) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    if f.single:
        return add_lowrank_linear(y, x, f, inplace=True)
    batch = x.shape[0]
    y3 = add_lowrank_linear(y.view(batch, -1, y.shape[-1]), x.reshape(batch, -1, x.shape[-1]), f, inplace=True)
    return y3.view(y.shape)


def _conv_tokens(x, weight, conv) -> int:
    out = 1
    for i in (0, 1):
        k, s, p, d = weight.shape[2 + i], conv["stride"][i], conv["padding"][i], conv["dilation"][i]
        out *= (x.shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1
    return out


def attach(layers, scores: torch.Tensor | None) -> None:
    """Gives ``layers`` a fresh shared :class:`ImageState` for ``scores`` (None: drops it, merged weights and
    all)."""
    layers = list(layers)
    state = None if scores is None else ImageState(layers, scores)
    for layer in layers:
        layer.__dict__["_image_state"] = state  # a plain attribute: nn.Module.__setattr__'s checks skipped
