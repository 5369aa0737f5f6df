"""Timesteps and noise of the VSD, fake-score and GAN terms, drawn per training sample.

Each draw comes from a generator seeded by ``(seed, stream, global sample index)`` (the index the data
sampler gave the sample, :class:`mor_model.train.data.StepBatchSampler`). So a sample gets the same
timestep and noise whichever process and batch it lands in: a run on N processes draws what a run on
one process with the N-times larger batch draws, and a resumed run what the uninterrupted one drew,
without depending on the global RNG state.
"""

from __future__ import annotations

import torch

from .data import sample_seed

__all__ = ["STREAMS", "add_noise", "diffusion_target", "draw", "x0_at"]

#: one stream per use, so the draws of different terms are independent
STREAMS = {"vsd": 1, "fake_score": 2, "gan_real": 3, "gan_fake": 4}


def draw(
    seed: int, stream: str, ids: list[int], shape: tuple[int, ...], t_range: tuple[int, int], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t (B,) int64 in [t_min, t_max), noise (B, *shape) float32)`` for the samples ``ids``, on ``device``."""
    ts, noises = [], []
    for i in ids:
        gen = torch.Generator().manual_seed(sample_seed(seed, 0x75D, STREAMS[stream], int(i)))
        ts.append(torch.randint(t_range[0], t_range[1], (1,), generator=gen))
        noises.append(torch.randn(shape, generator=gen))
    return torch.cat(ts).to(device), torch.stack(noises).to(device)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``DDPMScheduler.add_noise``), in float32."""
    abar = _expand(alphas_cumprod.to(x0.device, torch.float32)[t], x0)
    return abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()


def x0_at(pred: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str):
    """x0 from the UNet's prediction at per-sample timesteps ``t`` (OSEDiff's ``eps_to_mu`` for epsilon)."""
    abar = _expand(alphas_cumprod.to(z_t.device, torch.float32)[t], z_t)
    sa, sb = abar.sqrt(), (1 - abar).sqrt()
    pred, z_t = pred.float(), z_t.float()
    if prediction_type == "epsilon":
        return (z_t - sb * pred) / sa
    if prediction_type == "v_prediction":
        return sa * z_t - sb * pred
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def diffusion_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
):
    """What the UNet is trained to predict at ``t``: the noise, the velocity, or x0."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        abar = _expand(alphas_cumprod.to(x0.device, torch.float32)[t], x0)
        return abar.sqrt() * noise.float() - (1 - abar).sqrt() * x0.float()
    if prediction_type == "sample":
        return x0.float()
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
