"""The VSD and GAN parts of the training objective, on the one set of frozen weights of :class:`OneStepSR`.

``Objective(cfg, model, seed)`` builds what the configured terms need: the fake-score LoRA psi
(``vsd``) and the discriminator heads (``gan``). It gives

- the generator's loss terms (:meth:`generator_terms`: ``vsd`` and ``gan``, read ``inputs.extras["latent"]``
  and ``inputs.extras["ids"]``), whose gradients reach only the generator's adapters;
- :meth:`fake_score_loss`, the diffusion loss that trains psi (and nothing else);
- :meth:`discriminator_loss`, the loss that trains the heads (and nothing else).

Timesteps and noise are drawn per sample from ``(seed, stream, global sample index)``
(:mod:`mor_model.train.noise`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..control import adapters_disabled
from .config import TrainConfig
from .fake_score import FakeScoreLoRA
from .gan import (
    DiscriminatorHeads,
    discriminator_loss,
    feature_channels,
    frozen,
    generator_loss,
    no_checkpointing,
    unet_features,
)
from .losses import LossInputs, LossTerm
from .noise import add_noise, draw
from .vsd import fake_score_loss, vsd_gradient, vsd_loss

__all__ = ["Objective"]


class Objective:
    """psi and the discriminator heads for ``cfg``'s ``vsd`` / ``gan`` terms (None when a term is off).

    Args:
        cfg: the training config (``vsd``, ``gan`` sections and the ``losses`` weights).
        model: the :class:`~mor_model.train.model.OneStepSR` whose frozen UNet and VAE everything shares.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        self.cfg, self.seed = cfg, cfg.seed
        self.model = model
        num_t = len(model.alphas_cumprod)
        for section in ("vsd", "gan"):
            if cfg.losses.get(section, 0) > 0 and getattr(cfg, section).t_max > num_t:
                raise ValueError(
                    f"{section}.t_max ({getattr(cfg, section).t_max}) exceeds the scheduler's {num_t} steps"
                )
        self.psi: FakeScoreLoRA | None = None
        self.heads: DiscriminatorHeads | None = None
        if cfg.losses.get("vsd", 0) > 0:
            if model.negative_prompt_embeds is None:
                raise ValueError("VSD needs the negative prompt's embedding: build the model with losses.vsd > 0")
            self.psi = FakeScoreLoRA(model.unet, rank=cfg.vsd.lora_rank, alpha=cfg.vsd.lora_alpha)
        if cfg.losses.get("gan", 0) > 0:
            self.heads = DiscriminatorHeads(feature_channels(model.unet), cfg.gan.head_channels)

    def to(self, device) -> Objective:
        for m in (self.psi, self.heads):
            if m is not None:
                m.to(device)
        return self

    @property
    def unet(self):
        return self.model.unet

    def _embeds(self, b: int) -> torch.Tensor:
        return self.model.prompt_embeds.expand(b, -1, -1)

    def _draw(self, stream: str, ids: list[int], latent: torch.Tensor, t_range: tuple[int, int]):
        return draw(self.seed, stream, ids, tuple(latent.shape[1:]), t_range, latent.device)

    # -- the generator's terms -------------------------------------------------------------------
    def generator_terms(self) -> dict[str, LossTerm]:
        terms = {}
        if self.psi is not None:
            terms["vsd"] = LossTerm("vsd", self.cfg.losses["vsd"], self.vsd_term)
        if self.heads is not None:
            terms["gan"] = LossTerm("gan", self.cfg.losses["gan"], self.gan_term)
        return terms

    def vsd_term(self, inputs: LossInputs) -> torch.Tensor:
        x, ids = inputs.extras["latent"], inputs.extras["ids"]
        v = self.cfg.vsd
        t, noise = self._draw("vsd", ids, x, (v.t_min, v.t_max))
        b = x.shape[0]
        grad = vsd_gradient(
            self.unet,
            self.psi,
            x,
            t,
            noise,
            self._embeds(b),
            self.model.negative_prompt_embeds.expand(b, -1, -1),
            guidance_scale=v.guidance_scale,
            alphas_cumprod=self.model.alphas_cumprod,
            prediction_type=self.model.prediction_type,
        )
        return vsd_loss(x, grad)

    def _logits(self, z_t: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """Heads on the frozen UNet's encoder features (every adapter off, no gradient checkpointing: a
        backward after this call must not recompute the blocks with the adapters back on)."""
        with adapters_disabled(self.unet), no_checkpointing(self.unet):
            feats = unet_features(self.unet, z_t, t, self._embeds(z_t.shape[0]))
        return self.heads(feats)

    def gan_term(self, inputs: LossInputs) -> torch.Tensor:
        x, ids = inputs.extras["latent"], inputs.extras["ids"]
        g = self.cfg.gan
        t, noise = self._draw("gan_fake", ids, x, (g.t_min, g.t_max))
        with frozen(self.heads):  # the generator's GAN loss must not train the discriminator
            logits = self._logits(add_noise(x, noise, t, self.model.alphas_cumprod), t)
        return generator_loss(logits, g.loss)

    # -- the fake score and the discriminator -------------------------------------------------------
    def fake_score_loss(self, latent: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """psi's diffusion loss on the detached generated latents (OSEDiff: ``t ~ U[0, T)``). Run the
        backward inside ``fake_score_mode(model.unet, psi)`` when gradient checkpointing is on."""
        t, noise = self._draw("fake_score", ids, latent, (0, len(self.model.alphas_cumprod)))
        return fake_score_loss(
            self.unet,
            self.psi,
            latent,
            t,
            noise,
            self._embeds(latent.shape[0]),
            alphas_cumprod=self.model.alphas_cumprod,
            prediction_type=self.model.prediction_type,
        )

    def discriminator_loss(self, latent: torch.Tensor, hr: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, dict]:
        """The heads' loss on real latents (the HR images through the frozen VAE encoder, adapters off) and the
        detached generated ones; returns the loss and the mean logits ``{"d_real", "d_fake"}`` for the log."""
        g = self.cfg.gan
        fake = latent.detach().float()
        real = self.model.base_latents(hr * 2 - 1)
        t_f, n_f = self._draw("gan_fake", ids, fake, (g.t_min, g.t_max))  # what the generator's term saw
        t_r, n_r = self._draw("gan_real", ids, real, (g.t_min, g.t_max))
        ac = self.model.alphas_cumprod
        z_t = torch.cat([add_noise(real, n_r, t_r, ac), add_noise(fake, n_f, t_f, ac)])
        with torch.no_grad(), adapters_disabled(self.unet):
            feats = unet_features(self.unet, z_t, torch.cat([t_r, t_f]), self._embeds(z_t.shape[0]))
        logits = self.heads([f.detach() for f in feats])
        b = real.shape[0]
        real_logits, fake_logits = [x[:b] for x in logits], [x[b:] for x in logits]
        loss = discriminator_loss(real_logits, fake_logits, g.loss)
        means = {
            "d_real": float(torch.stack([x.detach().mean() for x in real_logits]).mean()),
            "d_fake": float(torch.stack([x.detach().mean() for x in fake_logits]).mean()),
        }
        return loss, means
