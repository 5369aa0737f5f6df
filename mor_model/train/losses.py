"""Training loss terms: a list of ``(name, weight, term)``; the total is the weighted sum.

Each term is a callable ``term(batch: LossInputs) -> scalar tensor``. The built-in terms:

- ``"l2"``: MSE between prediction and HR, both in ``[-1, 1]`` (OSEDiff's pixel loss), weight 1;
- ``"lpips"``: LPIPS (the ``lpips`` package, VGG by default) in ``[-1, 1]``, weight 2; the backbone
  weights are read from a local file, never downloaded (:func:`build_lpips`);
- ``"balance"``: the degradation-aware load-balancing loss of the last forward
  (:func:`mor_model.balance_loss`, already scaled by ``MoRConfig.balance_alpha``), weight 1.

The VSD and GAN terms of the generator come from :class:`mor_model.train.objective.Objective`; more
terms plug in as entries of the list (``Trainer(cfg, extra_terms=[LossTerm(...)])``).

On several processes the balance loss counts the selections ``f`` over the whole global batch (one
all-reduce of the counts), so the run matches one process with the same global batch; ``P`` is a
per-unit mean and averages with the gradients.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LPIPS_NETS",
    "LPIPSWeightsError",
    "LossInputs",
    "LossTerm",
    "LPIPSLoss",
    "build_lpips",
    "compute_losses",
]

LPIPS_NETS = ("vgg", "alex")


@dataclass
class LossInputs:
    """What a loss term may look at: ``pred``/``hr`` ``(B, 3, H, W)`` in ``[-1, 1]``, ``lq`` ``(B, 3, h, w)``
    in ``[0, 1]``, the degradation ``scores`` ``(B, D)``, and the model (for routing state)."""

    pred: torch.Tensor
    hr: torch.Tensor
    lq: torch.Tensor
    scores: torch.Tensor | None
    model: nn.Module
    extras: dict = field(default_factory=dict)


@dataclass
class LossTerm:
    """One weighted loss term. ``fn(inputs) -> scalar``; ``module`` (optional) holds frozen or trainable
    parts the term owns (moved to the device by the trainer)."""

    name: str
    weight: float
    fn: Callable[[LossInputs], torch.Tensor]
    module: nn.Module | None = None


def compute_losses(terms: list[LossTerm], inputs: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted total and ``{name: unweighted value}`` (floats, for the log)."""
    total = None
    values = {}
    for term in terms:
        value = term.fn(inputs).float()
        values[term.name] = float(value.detach())
        contribution = term.weight * value
        total = contribution if total is None else total + contribution
    if total is None:
        raise ValueError("no loss terms configured")
    return total, values


def l2_loss(inputs: LossInputs) -> torch.Tensor:
    return F.mse_loss(inputs.pred.float(), inputs.hr.float())


def balance_term(model_attr: str | None = "unet") -> Callable[[LossInputs], torch.Tensor]:
    """The MoR balance loss (mean over the MoR layers) of ``inputs.model.<model_attr>``, or of the whole
    model when ``model_attr`` is None."""
    from ..losses import balance_loss

    def fn(inputs: LossInputs) -> torch.Tensor:
        from .distributed import is_distributed

        model = getattr(inputs.model, "module", inputs.model)  # unwrap DDP
        model = model if model_attr is None else getattr(model, model_attr)
        return global_balance_loss(model) if is_distributed() else balance_loss(model)

    return fn


def global_balance_loss(module: nn.Module) -> torch.Tensor:
    """:func:`mor_model.balance_loss` with the selection fractions ``f`` of every layer counted over all
    processes (``P``, the mean router probability, stays local: averaging the gradients over the
    processes averages it). Every process must have routed the same layers: checked first (one small
    all-reduce of the layer count and the slot count), so that processes that differ get a RuntimeError each
    instead of collectives of different sizes that never complete."""
    import torch.distributed as dist

    from ..layers import mor_layers
    from ..losses import top_k_slots

    everything = list(mor_layers(module).values())
    layers = [m for m in everything if m.router.last_probs is not None]
    device = layers[0].router.last_probs.device if layers else next(module.parameters()).device
    mine = [len(layers), sum(m.router.last_probs.shape[1] + 1 for m in layers)]
    spread = torch.tensor([*mine, *(-v for v in mine)], dtype=torch.float64, device=device)
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)  # the largest counts, and minus the smallest
    most, least = spread[:2].tolist(), (-spread[2:]).tolist()
    if most != least:
        raise RuntimeError(
            f"the balance loss needs every process to have routed the same MoR layers, but they differ: "
            f"between {int(least[0])} and {int(most[0])} of {len(everything)} layers routed (this process: "
            f"{mine[0]}); every process must run the same forward before the loss"
        )
    if not layers:
        raise RuntimeError("no MoR layer under this module has routed anything yet: run a forward pass first")
    counts = []
    for layer in layers:
        probs = layer.router.last_probs
        chosen = top_k_slots(probs, layer.config.top_k).reshape(-1)
        c = torch.zeros(probs.shape[1] + 1, device=probs.device)
        c.index_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float32))
        c[-1] = probs.shape[0]  # units
        counts.append(c)
    flat = torch.cat(counts)
    dist.all_reduce(flat)
    losses, offset = [], 0
    for layer in layers:
        router, cfg = layer.router, layer.config
        probs = router.last_probs.float()
        slots = probs.shape[1]
        c = flat[offset : offset + slots + 1]
        offset += slots + 1
        f = c[:slots] / (c[slots] * cfg.top_k)
        sev = router.last_severity.detach().to(device=probs.device, dtype=torch.float32)
        weighted = torch.cat([probs[:, : cfg.num_routed], probs[:, cfg.num_routed :] * sev[:, None]], dim=1)
        losses.append(slots * (f * (cfg.balance_alpha * weighted.mean(dim=0))).sum())
    return torch.stack(losses).mean()


class LPIPSWeightsError(FileNotFoundError):
    """The LPIPS backbone weights are not available locally."""


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _backbone_state(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Maps torchvision keys (``features.N.weight``), bare feature keys (``N.weight``) or LPIPS keys
    (``[net.]sliceK.N.weight``) onto the LPIPS trunk's ``sliceK.N.weight``."""
    out, missing = {}, []
    for key in net.state_dict():
        slice_name, rest = key.split(".", 1)  # sliceK, N.weight
        for cand in (f"features.{rest}", rest, key, f"net.{key}"):
            if cand in state:
                out[key] = state[cand]
                break
        else:
            missing.append(f"features.{rest}")
    if missing:
        raise ValueError(
            f"{path} is not a matching backbone checkpoint: keys {missing[:4]} are missing "
            "(expected a torchvision vgg16/alexnet state dict such as vgg16-397923af.pth)"
        )
    return out


def build_lpips(net: str = "vgg", backbone_weights: str | os.PathLike | None = None, linear_weights=None) -> nn.Module:
    """A frozen ``lpips.LPIPS`` whose backbone comes from the local file ``backbone_weights``.

    Args:
        net: ``"vgg"`` (OSEDiff's choice) or ``"alex"``.
        backbone_weights: a torchvision ``vgg16``/``alexnet`` checkpoint (``.pth``/``.safetensors``; the
            file torchvision would download, e.g. ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``).
        linear_weights: the LPIPS linear-layer file; default: the one shipped in the ``lpips`` package.

    Raises:
        LPIPSWeightsError: no ``backbone_weights`` given, or the file does not exist.
        ImportError: the ``lpips`` package is missing (``pip install 'mor-sr[train]'``).
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"lpips net must be one of {LPIPS_NETS}, got {net!r}")
    if backbone_weights is None or not Path(backbone_weights).is_file():
        where = (
            "no path was given (lpips.backbone_weights)"
            if backbone_weights is None
            else f"{backbone_weights} does not exist"
        )
        raise LPIPSWeightsError(
            f"LPIPS needs the ImageNet weights of its {net} backbone from a local file, and {where}. Copy "
            f"torchvision's {'vgg16-397923af.pth' if net == 'vgg' else 'alexnet-owt-7be5be79.pth'} to this machine "
            "and set lpips.backbone_weights to it, or set lpips.allow_missing: true to train without LPIPS."
        )
    try:
        import lpips
    except ImportError as e:
        raise ImportError("the LPIPS loss needs the lpips package: pip install 'mor-sr[train]'") from e
    if linear_weights is not None and not Path(linear_weights).is_file():
        raise LPIPSWeightsError(f"LPIPS linear weights {linear_weights} do not exist")
    import warnings

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, model_path=linear_weights, verbose=False)
    path = Path(backbone_weights)
    model.net.load_state_dict(_backbone_state(model.net, _load_state(path), path))
    return model.eval().requires_grad_(False)


class LPIPSLoss(nn.Module):
    """``lpips(pred, hr).mean()`` with inputs in ``[-1, 1]`` (computed in float32)."""

    def __init__(self, lpips_model: nn.Module):
        super().__init__()
        self.lpips = lpips_model

    def train(self, mode: bool = True):
        super().train(mode)
        self.lpips.eval()  # frozen: dropout stays off
        return self

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        return self.lpips(inputs.pred.float(), inputs.hr.float()).mean()
