"""How the degradation vector reaches the routers: ``set_degradation`` and the ``degradation``
context manager (MOR_SPEC section 6)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .inference import attach
from .layers import mor_layers
from .router import check_scores


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
    if scores is not None:
        check_scores(scores, layers[0].router.num_degradation_dims)
    for layer in layers:
        layer.router.set_degradation(scores, severity)
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
