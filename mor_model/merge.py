"""Folding adapter ranks into the frozen base weights (inference only)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import MoRLinear, mor_layers

__all__ = ["fold_shared_ranks"]


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
