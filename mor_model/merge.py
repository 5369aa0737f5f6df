"""Folding adapter ranks into the frozen base weights (inference only): the shared ranks once for good
(:func:`fold_shared_ranks`), or each image's active ranks for that image (:func:`set_merge`, the
per-sample merged inference of ``mor_model.inference`` and ``mor_kernels.merge_decision``)."""

from __future__ import annotations

import torch
from torch import nn

from .inference import MERGE_MODES
from .layers import MoRLinear, mor_layers

__all__ = ["fold_shared_ranks", "set_merge"]


def set_merge(module: nn.Module, mode: str) -> list[str]:
    """Sets how every MoR layer under ``module`` runs in inference with sample routing:

    - ``"auto"`` (the layers' default): per-sample merged weights ``W0 + scaling B_act diag(g) A_act`` where
      the measured cost model of ``mor_kernels.dispatch.merge_plan`` says they beat the low-rank path for
      the call's size and device (one base GEMM/conv per sample; built once per image, reused across its
      tiles, dropped with its scores);
    - ``"always"``: merged weights whenever the call is eligible (sample routing, no gradient);
    - ``"never"``: the low-rank path always.

    Training forwards (a gradient needed) and token routing never merge. Returns the layers' names.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
    layers = mor_layers(module)
    if not layers:
        raise ValueError("no MoR layers under this module: call mor_model.inject_mor(module, config) first")
    for layer in layers.values():
        layer.merge = mode
    return list(layers)


@torch.no_grad()
def fold_shared_ranks(module: nn.Module) -> list[str]:
    """Folds the shared ranks of every MoR layer under ``module`` into its base weight (inference only).

    For each layer with ``S > 0`` shared ranks: ``W0 <- W0 + scaling * B[:, :S] @ A[:S]`` (Linear) or
    ``W0[o] <- W0[o] + scaling * sum_r B[o, r] A[r]`` (Conv2d: a 1x1 conv after a kxk conv with the same
    stride/padding/dilation is one kxk conv), computed in float32, then ``lora_a``/``lora_b`` keep only
    the routed ranks and the layer runs with ``num_shared = 0``. Routed slot ``j`` was rank ``S + j``
    and is now rank ``j``, so the routing is unchanged. New tensors replace the old ones (nothing is
    written into tensors another model might share). Returns the names of the folded layers.
    """
    folded = []
    for name, layer in mor_layers(module).items():
        s = layer.num_shared
        if s == 0:
            continue
        a, b = layer.lora_a.detach(), layer.lora_b.detach()
        w = layer.base_layer.weight
        if isinstance(layer, MoRLinear):
            delta = b[:, :s].float() @ a[:s].float()
        else:
            delta = torch.einsum("or,rchw->ochw", b[:, :s].float(), a[:s].float())
        layer.base_layer.weight = nn.Parameter((w.float() + layer.scaling * delta).to(w.dtype), requires_grad=False)
        layer.lora_a = nn.Parameter(a[s:].clone(), requires_grad=False)
        layer.lora_b = nn.Parameter(b[:, s:].clone(), requires_grad=False)
        layer.num_shared = 0
        layer.folded_shared_ranks = s
        folded.append(name)
    return folded
