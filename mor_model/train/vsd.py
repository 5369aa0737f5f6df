"""Variational score distillation (VSD) as in OSEDiff, and the fake score's diffusion loss.

For the generated clean latent ``x`` (the one-step model's x0, before decoding) and a timestep
``t ~ U[t_min, t_max)`` with noise ``eps``, ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps``:

- the pretrained score: the frozen UNet with every adapter off, classifier-free guided,
  ``e = e(x_t, negative) + s (e(x_t, prompt) - e(x_t, negative))``, gives ``x0_real``;
- the fake score epsilon_psi (the frozen UNet + psi's LoRA, :mod:`.fake_score`) gives ``x0_fake``;
- OSEDiff's per-sample normaliser ``w = mean |x - x0_real|`` over the latent's elements, and the VSD
  gradient on ``x`` is ``grad = (x0_fake - x0_real) / w`` (no gradient through either score);
- the loss ``0.5 * mse(x, (x - grad).detach())``, whose gradient w.r.t. ``x`` is ``grad / numel(x)``.

OSEDiff's code writes ``F.mse_loss(...)`` without the ``0.5``: its VSD gradient at weight 1 is twice
ours, so ``losses.vsd: 2`` reproduces it exactly (see the README).

The fake score trains with the ordinary diffusion loss on the generator's latents (detached), noised
at ``t ~ U[0, T)`` (OSEDiff: ``torch.randint(0, num_train_timesteps)``), with the training prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..control import adapters_disabled
from .fake_score import FakeScoreLoRA, fake_score_mode
from .noise import add_noise, diffusion_target, x0_at

__all__ = ["fake_score_loss", "pretrained_x0", "vsd_gradient", "vsd_loss"]


def pretrained_x0(unet, z_t, t, embeds, negative_embeds, guidance_scale, alphas_cumprod, prediction_type):
    """x0 of the pretrained score (every adapter off), guided against ``negative_embeds`` (one batched call)."""
    with adapters_disabled(unet):
        pred = unet(
            torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([negative_embeds, embeds])
        ).sample.float()
    uncond, cond = pred.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    return x0_at(guided, z_t, t, alphas_cumprod, prediction_type)


def vsd_gradient(
    unet,
    psi: FakeScoreLoRA,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    *,
    guidance_scale: float,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The VSD gradient ``(x0_fake - x0_real) / w`` on ``x (B, C, h, w)`` (float32, no graph)."""
    with torch.no_grad():
        x = x.detach().float()
        z_t = add_noise(x, noise, t, alphas_cumprod)
        with fake_score_mode(unet, psi):
            fake = unet(z_t, t, encoder_hidden_states=embeds).sample
        x0_fake = x0_at(fake, z_t, t, alphas_cumprod, prediction_type)
        x0_real = pretrained_x0(unet, z_t, t, embeds, negative_embeds, guidance_scale, alphas_cumprod, prediction_type)
        # OSEDiff's normaliser; the clamp only guards a division by zero
        w = (x - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-12)
        return (x0_fake - x0_real) / w


def vsd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mse(x, (x - grad).detach())``: a loss whose gradient on ``x`` is ``grad / x.numel()``."""
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def fake_score_loss(
    unet,
    psi: FakeScoreLoRA,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    embeds: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The diffusion loss of the fake score on the (detached) generated latents ``x``.

    Run the backward inside ``fake_score_mode(unet, psi)`` too when the UNet uses gradient checkpointing
    (its blocks are recomputed then, and must see psi on and the MoR adapters off)."""
    x = x.detach().float()
    z_t = add_noise(x, noise, t, alphas_cumprod)
    with fake_score_mode(unet, psi):
        pred = unet(z_t, t, encoder_hidden_states=embeds).sample
    return F.mse_loss(pred.float(), diffusion_target(x, noise, t, alphas_cumprod, prediction_type))
