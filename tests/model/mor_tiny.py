"""Tiny random-weight models built from config dicts for the mor_model tests (no downloads)."""

from __future__ import annotations

import torch

from mor_model import MoRConfig

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True,  # SD 2.x
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=16,
)
#: a tiny open_clip CLIP (standard text transformer, so open_clip's bundled tokenizer works offline)
CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def small_config(**overrides) -> MoRConfig:
    """S=2, E=4, Z=2, k=3 on the reference backend (CPU oracle)."""
    kw = dict(num_shared=2, num_routed=4, num_zero=2, top_k=3, backend="reference")
    kw.update(overrides)
    return MoRConfig(**kw)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG).eval()


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 999)
    enc = torch.randn(batch, 3, 8, generator=g)
    return x, t, enc


def randomize_adapters(module, seed: int = 3, scale: float = 0.1) -> None:
    """Non-zero lora_b (and fresh lora_a/routers) so the adapters change the output."""
    import mor_model

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mor_model.trainable_parameters(module).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
