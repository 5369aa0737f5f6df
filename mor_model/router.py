"""The per-layer MoR router (MOR_SPEC 2.1 and 2.3): logits from the degradation vector and/or the
tokens, then ``mor_kernels.route``. It keeps what the losses and statistics need from the last
forward (``last_probs``, ``last_idx``, ``last_severity``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import mor_kernels

from .config import MoRConfig


def check_scores(scores, num_dims: int, name: str = "scores") -> torch.Tensor:
    """Checks a degradation score batch ``(B, D)``; returns it unchanged."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, {num_dims}) or None, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[1] != num_dims:
        raise ValueError(f"{name} must have shape (B, {num_dims}) (num_degradation_dims), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    return scores


def checked_severity(scores: torch.Tensor, severity: torch.Tensor | None) -> torch.Tensor:
    """``severity (B,)`` for checked ``scores (B, D)`` as the routers keep it (float32, detached); None gives the
    default ``scores.mean(-1)`` (MOR_SPEC section 3)."""
    if severity is None:
        return scores.detach().float().mean(dim=-1)
    if not isinstance(severity, torch.Tensor) or tuple(severity.shape) != (scores.shape[0],):
        raise ValueError(f"severity must be a tensor of shape ({scores.shape[0]},) matching scores")
    return severity.detach().float()


class MoRRouter(nn.Module):
    """Router of one MoR layer.

    Args:
        config: the adapter settings (``router_input``, ``routing``, slots, ``top_k``).
        in_features: the layer's input features (needed when the router reads the tokens).
        token_routing_allowed: False for layers that only support sample routing (Conv2d).

    ``forward(x)`` returns ``(idx, gate)`` for ``mor_kernels``: ``(B, k)`` for sample routing,
    ``(B, *tokens, k)`` for token routing (``x`` is ``(B, *tokens, d_in)``; for a conv pass
    ``channels_last=False`` and ``x (B, C, H, W)``, which is pooled over ``H, W`` for a token router).
    """

    def __init__(self, config: MoRConfig, in_features: int, *, token_routing_allowed: bool = True):
        super().__init__()
        if config.routing == "token" and not token_routing_allowed:
            raise ValueError(
                "routing='token' is not supported for this layer type (Conv2d layers route per sample; "
                "per-pixel routing is not implemented): use routing='sample'"
            )
        self.num_zero = config.num_zero
        self.top_k = config.top_k
        self.routing = config.routing
        self.renormalize = config.renormalize
        self.backend = config.backend
        self.num_degradation_dims = config.num_degradation_dims
        self.degradation = nn.Linear(config.num_degradation_dims, config.num_slots) if config.uses_degradation else None
        self.token = nn.Linear(in_features, config.num_slots) if config.uses_token_input else None
        self._scores: torch.Tensor | None = None
        self._severity: torch.Tensor | None = None
        self.clear_state()

    # -- degradation input -------------------------------------------------------------------
    def set_degradation(self, scores: torch.Tensor | None, severity: torch.Tensor | None = None) -> None:
        """Sets (or with None clears) the degradation scores ``(B, D)`` used by the next forwards.

        ``severity (B,)`` defaults to ``scores.mean(-1)`` (MOR_SPEC section 3); it weights the zero
        slots in the balance loss.
        """
        if scores is None:
            self._scores = self._severity = None
            return
        check_scores(scores, self.num_degradation_dims)
        self._scores, self._severity = scores, checked_severity(scores, severity)

    def _set_checked(self, scores: torch.Tensor | None, severity: torch.Tensor | None) -> None:
        """:meth:`set_degradation` for arguments ``mor_model.set_degradation`` checked and converted once for every
        router of a model (``severity`` float32, detached): two attribute writes, without ``nn.Module``'s
        ``__setattr__`` (~8 us a router with the checks; 258 routers per SD 2.1 UNet image)."""
        self.__dict__["_scores"], self.__dict__["_severity"] = scores, severity

    def clear_state(self) -> None:
        """Forgets the routing of the last forward."""
        self.last_probs: torch.Tensor | None = None  # (U, E+Z) float32, differentiable
        self.last_idx: torch.Tensor | None = None  # (U, k) int32, -1 = zero slot
        self.last_severity: torch.Tensor | None = None  # (U,) float32
        self.last_batch: int = 0  # samples in the last forward; U = last_batch * tokens

    # -- routing -----------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        # float32 logits even inside torch.autocast (F.linear would run in the autocast dtype there), so
        # a layer routes the same in float32 training and under mixed precision
        with torch.autocast(x.device.type, enabled=False):
            return self._logits_float32(x, channels_last)

    def _logits_float32(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        batch = x.shape[0]
        logits = None
        if self.token is not None:
            feats = x if channels_last else x.movedim(1, -1)
            if self.routing == "sample":  # one decision per sample: average its tokens
                feats = feats.reshape(batch, -1, feats.shape[-1]).mean(dim=1)
            logits = F.linear(feats.float(), self.token.weight.float(), self.token.bias.float())
        if self.degradation is not None:
            if self._scores is None:
                raise RuntimeError(
                    "this MoR layer routes on the degradation vector but none was set: call "
                    "mor_model.set_degradation(model, scores) (scores (B, num_degradation_dims), e.g. from "
                    "DegradationEstimator) or use `with mor_model.degradation(model, scores):` before the forward"
                )
            scores = self._scores
            if scores.shape[0] != batch:
                raise ValueError(
                    f"the degradation scores have batch size {scores.shape[0]} but the layer input has batch size "
                    f"{batch}: call set_degradation with scores of shape ({batch}, {self.num_degradation_dims})"
                )
            w = self.degradation.weight.float()
            deg = F.linear(scores.to(device=w.device, dtype=torch.float32), w, self.degradation.bias.float())
            if logits is not None and logits.dim() > 2:  # token logits (B, *tokens, N): broadcast per sample
                deg = deg.reshape(batch, *([1] * (logits.dim() - 2)), deg.shape[-1])
            logits = deg if logits is None else logits + deg
        return logits

    def forward(self, x: torch.Tensor, *, channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        logits = self._logits(x, channels_last)
        idx, gate, probs = mor_kernels.route(logits, self.top_k, self.num_zero, self.renormalize, backend=self.backend)
        units_per_sample = probs.numel() // max(batch * probs.shape[-1], 1)
        if self._severity is not None:
            if self._severity.shape[0] != batch:
                raise ValueError(
                    f"the degradation scores have batch size {self._severity.shape[0]} but the layer input has batch "
                    f"size {batch}: call set_degradation with scores of shape ({batch}, {self.num_degradation_dims})"
                )
            severity = self._severity.to(probs.device).repeat_interleave(units_per_sample)
        else:  # no degradation information: every unit counts as fully degraded (the standard loss)
            severity = torch.ones(batch * units_per_sample, device=probs.device)
        self.last_probs = probs.reshape(-1, probs.shape[-1])
        self.last_idx = idx.detach().reshape(-1, idx.shape[-1])
        self.last_severity = severity
        self.last_batch = batch
        return idx, gate

    def extra_repr(self) -> str:
        return f"routing={self.routing!r}, top_k={self.top_k}, num_zero={self.num_zero}"
