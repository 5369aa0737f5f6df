"""x0 of the one-step model: the closed form from the UNet's prediction and the scheduler's clipping.

Shared by the inference pipeline and the training forward, so both compute the same thing as
``DDPMScheduler.step(...).pred_original_sample`` at the model's single timestep.
"""

from __future__ import annotations

import math

import torch

__all__ = ["clip_x0", "x0_from_prediction"]


def x0_from_prediction(pred: torch.Tensor, z: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """Closed-form ``x0`` of ``z_t`` (= ``z``) from the model's prediction at a timestep with ``alpha_bar``."""
    sa, sb = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if prediction_type == "epsilon":
        return (z - sb * pred) / sa
    if prediction_type == "v_prediction":
        return sa * z - sb * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def _quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q, dim=1)`` (linear interpolation) for 2-D ``x`` of any size (torch.quantile
    refuses more than 2**24 elements)."""
    n = x.shape[1]
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = torch.kthvalue(x, lo + 1, dim=1).values
    v_hi = v_lo if hi == lo else torch.kthvalue(x, hi + 1, dim=1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


def clip_x0(x0: torch.Tensor, config) -> torch.Tensor:
    """What ``DDPMScheduler.step`` does to ``pred_original_sample``: dynamic thresholding when
    ``config.thresholding`` (per sample: ``s`` = the ``dynamic_thresholding_ratio`` quantile of ``|x0|``
    clamped to ``[1, sample_max_value]``, then ``clamp(x0, -s, s) / s``), else ``clamp`` to
    ``±clip_sample_range`` when ``config.clip_sample``, else nothing. Works on the whole latent (the
    quantile is per image, so it must not be taken per tile)."""
    if getattr(config, "thresholding", False):
        b = x0.shape[0]
        flat = x0.float().reshape(b, -1)
        s = _quantile_rows(flat.abs(), float(config.dynamic_thresholding_ratio))
        s = s.clamp(min=1, max=float(config.sample_max_value))[:, None]
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)
    if getattr(config, "clip_sample", False):
        r = float(config.clip_sample_range)
        return x0.clamp(-r, r)
    return x0
