"""How the degradation vector reaches the routers: ``set_degradation`` and the ``degradation``
context manager (MOR_SPEC section 6); and ``adapters_disabled``, which runs a model as its frozen base
(the pretrained model) without a second copy of the weights."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .inference import attach
from .layers import mor_layers
from .router import check_scores, checked_severity


def _layers(module: nn.Module):
    layers = mor_layers(module)
    if not layers:
        raise ValueError("no MoR layers under this module: call mor_model.inject_mor(module, config) first")
    return list(layers.values())


def _routers(module: nn.Module):
    return [layer.router for layer in _layers(module)]


def set_degradation(module: nn.Module, scores: torch.Tensor | None, severity: torch.Tensor | None = None) -> None:
    """Gives every MoR router under ``module`` the degradation scores of the next batch.

    Args:
        module: a model with MoR layers (or a single MoR layer).
        scores: ``(B, D)`` degradation scores (``D = num_degradation_dims``, e.g. from
            :class:`~mor_model.estimator.DegradationEstimator`), or None to clear them.
        severity: optional ``(B,)`` severity per sample for the balance loss; defaults to
            ``scores.mean(-1)`` (MOR_SPEC section 3).

    The scores stay set until changed or cleared; every forward checks that their batch size
    matches the layer input's. In inference the layers route once per scores and may keep per-image
    merged weights (:mod:`mor_model.inference`): setting new scores, or None, drops them.
    """
    layers = _layers(module)
    routers = [layer._modules["router"] for layer in layers]  # the module dicts: once per image for every layer
    if scores is None:
        severity = None
    else:  # MoRRouter.set_degradation's checks and default, once for every router
        dims = {router.num_degradation_dims for router in routers}
        if len(dims) > 1:
            raise ValueError(f"the MoR layers under this module route on different num_degradation_dims {sorted(dims)}")
        severity = checked_severity(check_scores(scores, dims.pop()), severity)
    for router in routers:
        router._set_checked(scores, severity)
    attach(layers, scores)


@contextlib.contextmanager
def degradation(module: nn.Module, scores: torch.Tensor, severity: torch.Tensor | None = None):
    """``with degradation(model, scores): model(...)``: sets the scores, restores the previous ones on exit."""
    layers = _layers(module)
    previous = [(layer.router._scores, layer.router._severity, layer._image_state) for layer in layers]
    set_degradation(module, scores, severity)
    try:
        yield module
    finally:
        for layer, (s, sev, state) in zip(layers, previous, strict=True):
            layer.router._scores, layer.router._severity, layer._image_state = s, sev, state


def clear_routing(module: nn.Module) -> None:
    """Forgets the stored routing of the last forward in every MoR layer (frees the autograd graph)."""
    for router in _routers(module):
        router.clear_state()


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """``with adapters_disabled(model): model(...)`` runs every MoR layer under ``module`` as its frozen base layer.

    Inside the block each MoR layer's forward is its ``base_layer`` (hooks on the MoR layer itself still
    run); routers are not called, so no degradation scores are needed, and the routing each router
    stored in the last adapted forward (``last_probs``, ``last_idx``... which the balance loss and the
    routing statistics read) is put back on exit even if a forward inside the block cleared it. The
    same frozen weights therefore serve as the pretrained model without holding a second copy.

    A module without MoR layers is left as it is. Nesting is allowed. Backward through a forward run
    inside the block sees the same base layers only if it runs inside the block too, or if the forward
    stored its activations (under gradient checkpointing the blocks are recomputed at backward time).

    Raises:
        ValueError: a layer's base weight holds folded shared ranks (:func:`mor_model.fold_shared_ranks`),
            so its base layer is no longer the pretrained one.
    """
    layers = list(mor_layers(module).values())
    folded = [name for name, layer in mor_layers(module).items() if getattr(layer, "folded_shared_ranks", 0)]
    if folded:
        raise ValueError(
            f"adapters_disabled: {len(folded)} MoR layers (e.g. {folded[0]!r}) have shared ranks folded into their "
            "base weights (fold_shared_ranks), so switching the adapters off would not give the pretrained layer"
        )
    saved = [(layer.__dict__.get("forward"), _routing_state(layer.router)) for layer in layers]
    for layer in layers:
        layer.__dict__["forward"] = layer.base_layer.__call__  # an instance attribute wins over the class method
    try:
        yield module
    finally:
        for layer, (forward, state) in zip(layers, saved, strict=True):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = forward
            layer.router.last_probs, layer.router.last_idx, layer.router.last_severity, layer.router.last_batch = state


def _routing_state(router):
    return router.last_probs, router.last_idx, router.last_severity, router.last_batch
