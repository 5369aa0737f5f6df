"""The fake-score network of VSD, epsilon_psi: the frozen UNet plus a LoRA of its own (psi).

psi lives outside the UNet's module tree: :class:`FakeScoreLoRA` holds one low-rank pair per target
layer and adds ``scaling * B(A x)`` to that layer's output through forward hooks that exist only inside
``with psi.applied(unet):``. Outside the block the UNet is untouched (the generator's MoR adapters, its
state dict and its layer names are what they were), so the one set of frozen UNet weights serves as

- the generator: base + MoR (the default state);
- the pretrained score: base alone (``mor_model.control.adapters_disabled``);
- the fake score: base + psi (``adapters_disabled`` and ``psi.applied`` together, :func:`fake_score_mode`).

Targets are OSEDiff's UNet LoRA targets (:data:`mor_model.config.OSEDIFF_UNET_TARGETS`); a target that
carries a MoR adapter gets psi's hook on the MoR layer (its base layer gives the shapes). Initialisation
as PEFT's ``init_lora_weights="gaussian"`` that OSEDiff uses: ``A ~ N(0, 1/rank)``, ``B = 0``, so the fake
score starts equal to the pretrained score.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FakeScoreLoRA", "fake_score_mode"]


class _LowRank(nn.Module):
    """``scaling * B(A x)`` beside one frozen Linear or Conv2d (``A`` a conv with the base conv's geometry)."""

    def __init__(self, base: nn.Module, rank: int, scaling: float):
        super().__init__()
        w = base.weight
        self.is_conv = isinstance(base, nn.Conv2d)
        a_shape = (rank, *w.shape[1:]) if self.is_conv else (rank, w.shape[1])
        self.lora_a = nn.Parameter(torch.randn(a_shape, device=w.device, dtype=torch.float32) / rank)
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=torch.float32))
        self.scaling = scaling
        if self.is_conv:
            self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        a, b = self.lora_a.to(dtype), self.lora_b.to(dtype)
        if self.is_conv:
            h = F.conv2d(x.to(dtype), a, None, self.stride, self.padding, self.dilation)
            return F.conv2d(h, b[:, :, None, None]) * self.scaling
        return F.linear(F.linear(x.to(dtype), a), b) * self.scaling


def _base_of(module: nn.Module) -> nn.Module:
    from ..layers import MoRLayer

    return module.base_layer if isinstance(module, MoRLayer) else module


class FakeScoreLoRA(nn.Module):
    """psi: a rank-``rank`` LoRA on ``unet``'s target layers, applied only inside :meth:`applied`.

    Args:
        unet: the (frozen, possibly MoR-adapted) UNet whose layers psi adapts.
        rank: LoRA rank (OSEDiff: 4).
        alpha: scaling ``alpha / rank`` (PEFT's default alpha 8, as in OSEDiff).
        targets: module-name patterns (``mor_model.inject.match_target`` rules); default OSEDiff's.

    ``names`` lists the adapted layers in order; ``skipped`` maps matching layers psi cannot adapt to the
    reason. The parameters are float32 whatever the UNet's dtype.
    """

    def __init__(self, unet: nn.Module, rank: int = 4, alpha: float = 8.0, targets=None):
        super().__init__()
        from ..config import OSEDIFF_UNET_TARGETS
        from ..inject import match_target
        from ..layers import mor_layers

        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        targets = OSEDIFF_UNET_TARGETS if targets is None else tuple(targets)
        inside_mor = [f"{n}." for n in mor_layers(unet)]
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        layers = []
        for name, module in unet.named_modules():
            if not name or any(name.startswith(p) for p in inside_mor) or not match_target(name, targets):
                continue
            base = _base_of(module)
            if not isinstance(base, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
                self.skipped[name] = f"Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r}"
                continue
            self.names.append(name)
            layers.append(_LowRank(base, rank, alpha / rank))
        if not layers:
            raise ValueError(f"no UNet layer matches the fake-score LoRA targets {list(targets)}")
        self.layers = nn.ModuleList(layers)
        self.rank, self.alpha = rank, alpha
        self._applied_to: set[int] = set()  # ids of the UNets psi is applied to right now

    @contextlib.contextmanager
    def applied(self, unet: nn.Module):
        """Adds psi's delta to each target layer's output for the duration of the block (forward hooks).
        Re-entrant: a nested ``applied`` on the same UNet adds nothing more."""
        active = self._applied_to
        if id(unet) in active:
            yield unet
            return
        active.add(id(unet))
        handles = []
        try:
            for name, layer in zip(self.names, self.layers, strict=True):
                module = unet.get_submodule(name)
                handles.append(module.register_forward_hook(_delta_hook(layer)))
            yield unet
        finally:
            for handle in handles:
                handle.remove()
            active.discard(id(unet))

    def named_state(self) -> dict[str, torch.Tensor]:
        """``{"<layer name>.lora_a": A, "<layer name>.lora_b": B}`` (what checkpoints hold)."""
        out = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = layer.lora_a, layer.lora_b
        return out

    @torch.no_grad()
    def load_named_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads :meth:`named_state`'s layout; the layer set and shapes must match."""
        mine = self.named_state()
        if set(state) != set(mine):
            missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise ValueError(
                f"fake-score LoRA state does not match this model: missing {missing[:3]}, extra {extra[:3]}"
            )
        for key, param in mine.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"fake-score LoRA {key}: shape {tuple(state[key].shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(state[key])


def _delta_hook(layer: _LowRank):
    def hook(module, args, output):
        return output + layer(args[0]).to(output.dtype)

    return hook


@contextlib.contextmanager
def fake_score_mode(unet: nn.Module, psi: FakeScoreLoRA):
    """The fake score epsilon_psi: ``unet`` with its MoR adapters off and psi on, inside the block."""
    from ..control import adapters_disabled

    with adapters_disabled(unet), psi.applied(unet):
        yield unet
