"""Routing statistics of the last forward: active real ranks and chosen slots per layer and sample,
and a heatmap (layers x samples) rendered with matplotlib."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .layers import mor_layers
from .losses import top_k_slots


@dataclass
class RoutingStats:
    """Per MoR layer (rows, in ``layers`` order) and per sample (columns).

    Attributes:
        layers: qualified names of the layers that routed in the last forward.
        active_ranks: ``(L, B)`` float, ``S`` + the number of selected non-zero slots (averaged over
            the tokens of a sample for token routing), i.e. the real ranks that did work: a selected real
            slot whose probability (so its gate) is exactly 0 counts as a zero slot, as every backend runs it.
        slots: ``{layer: (B, k)}`` chosen router slots (``>= E`` is a zero slot), descending
            probability; ``(B, T, k)`` for token routing.
        max_ranks: ``{layer: S + k}`` the most ranks a unit can use (for the colour scale).
    """

    layers: list[str]
    active_ranks: torch.Tensor
    slots: dict[str, torch.Tensor]
    max_ranks: dict[str, int]

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "layers": list(self.layers),
            "active_ranks": self.active_ranks.tolist(),
            "slots": {k: v.tolist() for k, v in self.slots.items()},
            "max_ranks": dict(self.max_ranks),
        }


def routing_stats(module: nn.Module) -> RoutingStats:
    """Collects :class:`RoutingStats` from every MoR layer under ``module`` that ran a forward."""
    names, rows, slots, max_ranks = [], [], {}, {}
    batch = None
    for name, layer in mor_layers(module).items():
        router = layer.router
        if router.last_probs is None:
            continue
        cfg = layer.config
        b = router.last_batch
        if batch is not None and b != batch:
            raise ValueError(f"layers routed different batch sizes ({batch} and {b} in {name!r}); clear_routing first")
        batch = b
        chosen = top_k_slots(router.last_probs, cfg.top_k)  # (U, k)
        works = (chosen < cfg.num_routed) & (router.last_probs.detach().gather(-1, chosen) > 0)  # gate 0: no work
        per_sample = chosen.reshape(b, -1, cfg.top_k)  # (B, T, k), T = 1 for sample routing
        real = works.reshape(b, -1, cfg.top_k).sum(dim=-1).float().mean(dim=1)  # (B,)
        names.append(name)
        rows.append(cfg.num_shared + real.cpu())
        slots[name] = (per_sample[:, 0] if per_sample.shape[1] == 1 else per_sample).cpu()
        max_ranks[name] = cfg.num_shared + cfg.top_k
    if not names:
        raise RuntimeError("no MoR layer under this module has routed anything yet: run a forward pass first")
    return RoutingStats(names, torch.stack(rows), slots, max_ranks)


def save_routing_heatmap(stats: RoutingStats, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Writes a PNG heatmap of ``stats.active_ranks`` (layers x samples); returns the path."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend and global state alone

    data = stats.active_ranks.numpy()
    num_layers, num_samples = data.shape
    fig_h = min(2 + 0.18 * num_layers, 60)
    label_w = 0.06 * max(len(n) for n in stats.layers) if num_layers <= 120 else 0.5
    fig = Figure(figsize=(min(60, 3 + label_w + 0.35 * num_samples), fig_h))
    ax = fig.add_subplot()
    vmax = max(stats.max_ranks.values())
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xlabel("sample")
    ax.set_ylabel("MoR layer")
    ax.set_xticks(range(num_samples) if num_samples <= 64 else range(0, num_samples, max(1, num_samples // 16)))
    if num_layers <= 120:
        ax.set_yticks(range(num_layers))
        ax.set_yticklabels(stats.layers, fontsize=6)
    ax.set_title(title or "active real ranks", fontsize=9)
    fig.colorbar(im, ax=ax, label="active real ranks (S + selected non-zero slots)", shrink=min(1.0, 6 / fig_h + 0.2))
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    return os.fspath(path)
