"""The GAN term: a discriminator made of the frozen UNet's encoder and small trainable heads.

Features: the outputs of every down block and of the mid block of the *same* frozen UNet the generator
and the scores use, run with every adapter off (:func:`mor_model.control.adapters_disabled`) on a latent
noised at a random timestep (the DMD2 / ADD idea of a discriminator on diffusion features). Heads: one
per scale, ``conv3x3 -> GroupNorm -> SiLU -> conv1x1``, giving a map of patch logits. Only the heads
train; the discriminator loss reaches nothing else and the generator's GAN loss reaches only the
generator (the heads are frozen while it is computed).

Losses (``gan.loss``): ``"non_saturating"`` (default; ``softplus(-D(real)) + softplus(D(fake))`` for D,
``softplus(-D(fake))`` for G, the loss of DMD2 and of S3Diff's "multilevel_sigmoid_s") or ``"hinge"``
(``relu(1 - D(real)) + relu(1 + D(fake))``, G: ``-D(fake)``, as ADD/StyleGAN-T). Each is the mean over
positions and samples, averaged over the heads.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiscriminatorHeads", "discriminator_loss", "feature_channels", "generator_loss", "unet_features"]


def _check_plain_unet(unet) -> None:
    cfg = unet.config
    extras = {
        k: getattr(cfg, k, None)
        for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "num_class_embeds")
        if getattr(cfg, k, None) is not None
    }
    if extras:
        raise ValueError(f"the GAN features support SD-style UNets without extra conditioning; this UNet has {extras}")


def feature_channels(unet) -> list[int]:
    """Channels of the features :func:`unet_features` returns (down blocks, then the mid block)."""
    chans = list(unet.config.block_out_channels)
    return chans + [chans[-1]]


def unet_features(unet, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """The UNet's encoder half: ``[down block 0 output, ..., mid block output]`` for ``sample (B, C, h, w)``.

    The same computation as ``UNet2DConditionModel.forward`` up to the mid block (time embedding,
    ``conv_in``, down blocks, mid block), for SD-style UNets (no class or added embeddings).
    """
    _check_plain_unet(unet)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timesteps)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(sample)
    feats = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        feats.append(h)
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = unet.mid_block(h, emb)
        feats.append(h)
    return feats


@contextlib.contextmanager
def no_checkpointing(module: nn.Module):
    """Turns diffusers' gradient checkpointing off inside the block (so a backward after the block does not
    recompute these blocks in another adapter state)."""
    flagged = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield module
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``requires_grad`` off for ``module``'s parameters inside the block (restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


class DiscriminatorHeads(nn.Module):
    """One head per feature scale: ``conv3x3(C -> hidden) -> GroupNorm -> SiLU -> conv1x1(hidden -> 1)``.

    ``forward(features) -> list of (B, 1, h_i, w_i)`` float32 logit maps.
    """

    def __init__(self, channels: list[int], hidden: int = 128):
        super().__init__()
        groups = math.gcd(32, hidden)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, hidden, 3, padding=1),
                nn.GroupNorm(groups, hidden),
                nn.SiLU(),
                nn.Conv2d(hidden, 1, 1),
            )
            for c in channels
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        return [head(f).float() for head, f in zip(self.heads, features, strict=True)]


def generator_loss(fake_logits: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The generator's GAN loss on the logits of its samples."""
    if kind == "non_saturating":
        per_head = [F.softplus(-logit).mean() for logit in fake_logits]
    elif kind == "hinge":
        per_head = [-logit.mean() for logit in fake_logits]
    else:
        raise ValueError(f"unknown GAN loss {kind!r}")
    return torch.stack(per_head).mean()


def discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The discriminator's loss: real samples up, generated ones down."""
    if kind == "non_saturating":
        per_head = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real_logits, fake_logits, strict=True)]
    elif kind == "hinge":
        per_head = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits, strict=True)]
    else:
        raise ValueError(f"unknown GAN loss {kind!r}")
    return torch.stack(per_head).mean()
