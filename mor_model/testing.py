"""A tiny random-weight model directory for tests, demos and first runs (MOR_SPEC section 6).

``tiny_model(path)`` writes, offline and in a few seconds on a CPU, a model directory in the layout
:class:`mor_model.sr.pipeline.MoRSRPipeline` and ``mor-sr upscale --model`` load::

    path/
      model_index.json          diffusers-style index (informative)
      unet/                     UNet2DConditionModel, SD 2.1-like structure, tiny widths
      vae/                      AutoencoderKL, 4 latent channels, 3 levels (scale factor 4, not 8: the
                                pipeline reads the factor from the config)
      text_encoder/             transformers CLIPTextModel (tiny)
      tokenizer/                CLIPTokenizer files written here (vocab.json + merges.txt: the 256
                                byte symbols, their end-of-word forms and a few merges)
      scheduler/                DDPMScheduler config of SD 2.1-base (epsilon prediction)
      mor_adapter/              MoR adapter of the UNet (mor_model.save_adapter layout)   <- default adapter
      vae_encoder_adapter/      MoR adapter of the VAE encoder convs + quant_conv (optional in real models)
      degradation_clip/         tiny open_clip model (DegradationEstimator.save_local layout) <- default CLIP

The three last names are the documented default places the pipeline and the CLI look in
(``--adapter`` and ``--clip`` override the first and the last). All weights are random: the outputs
are meaningless, but every code path (routing, tiling, colour fix, CLI) runs as with a real model.

    python -c "from mor_model.testing import tiny_model; tiny_model('tiny')"
    mor-sr upscale photo.png -o out --model tiny
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .sr.loading import ADAPTER_DIR, CLIP_DIR, VAE_ADAPTER_DIR

__all__ = ["tiny_model", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG", "TINY_CLIP_CONFIG", "TINY_MOR_CONFIG"]

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4],  # diffusers' name for the number of heads in SD 2.x configs
    "use_linear_projection": True,
}

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

TINY_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "gelu",
}

#: SD 2.1-base's scheduler/scheduler_config.json
SD21_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

#: open_clip config: a 1-layer ViT on 32x32 images and a 1-layer text transformer (open_clip's own
#: tokenizer, vocabulary 49408, which ships with the package)
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

#: UNet adapter: S=2 shared + E=4 routed ranks, 2 zero slots, top-3, routed on the 7 CLIP scores
TINY_MOR_CONFIG = {"num_shared": 2, "num_routed": 4, "num_zero": 2, "top_k": 3}
#: VAE-encoder adapter (OSEDiff's encoder LoRA, here as a small MoR adapter)
TINY_VAE_MOR_CONFIG = {
    "num_shared": 2,
    "num_routed": 2,
    "num_zero": 1,
    "top_k": 2,
    "target_modules": ["re:^encoder\\..*conv", "quant_conv"],
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_tokenizer(path: Path) -> int:
    """Writes a complete (any text tokenizes, no unknown token) CLIP BPE tokenizer; returns its vocab size."""
    path.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = ["p h", "ph o", "pho t", "phot o</w>", "t h", "th e</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def _randomise_adapter(module: torch.nn.Module, std: float) -> None:
    from .layers import mor_layers

    for layer in mor_layers(module).values():
        torch.nn.init.normal_(layer.lora_b, std=std)


def tiny_model(path: str | os.PathLike, *, seed: int = 0, vae_adapter: bool = True) -> Path:
    """Writes the tiny random model directory described in the module docstring; returns its path.

    Args:
        path: the directory to create (existing files in it are overwritten).
        seed: seed of the random weights (the global RNG state is left untouched).
        vae_adapter: also write ``vae_encoder_adapter/``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .adapter_io import save_adapter
    from .config import MoRConfig
    from .estimator import DegradationEstimator
    from .inject import inject_mor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocab_size = _write_tokenizer(path / "tokenizer")
        eos = vocab_size - 1
        text_cfg = CLIPTextConfig(
            vocab_size=vocab_size, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos, **TINY_TEXT_CONFIG
        )
        CLIPTextModel(text_cfg).save_pretrained(path / "text_encoder")

        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        unet.save_pretrained(path / "unet")
        inject_mor(unet, MoRConfig(**TINY_MOR_CONFIG))
        _randomise_adapter(unet, 0.05)
        save_adapter(unet, path / ADAPTER_DIR)

        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        vae.save_pretrained(path / "vae")
        if vae_adapter:
            inject_mor(vae, MoRConfig(**TINY_VAE_MOR_CONFIG))
            _randomise_adapter(vae, 0.02)
            save_adapter(vae, path / VAE_ADAPTER_DIR)

        DDPMScheduler(**SD21_SCHEDULER_CONFIG).save_config(path / "scheduler")
        DegradationEstimator.from_config(TINY_CLIP_CONFIG).save_local(path / CLIP_DIR)
    index = {
        "_class_name": "MoRSRPipeline",
        "_note": "tiny random-weight model written by mor_model.testing.tiny_model (for tests and demos)",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
