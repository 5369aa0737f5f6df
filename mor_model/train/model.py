"""The trained network: the one-step SR forward as an ``nn.Module`` (:class:`OneStepSR`) and
:func:`build_model`, which loads the base model, puts on the adapters and freezes the rest."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..sr.loading import ADAPTER_DIR, CLIP_DIR, VAE_ADAPTER_DIR
from ..sr.x0 import clip_x0, x0_from_prediction
from .config import TrainConfig

__all__ = ["VAE_LORA_TARGETS", "OneStepSR", "build_model", "cast_frozen_matmul_weights"]

#: the VAE-encoder modules a plain LoRA adapts (OSEDiff: encoder convs, attention projections, quant_conv)
VAE_LORA_TARGETS = (r"re:^encoder\..*(conv(1|2|_in|_out|_shortcut)?|to_q|to_k|to_v|to_out\.0)$", "quant_conv")


class OneStepSR(nn.Module):
    """The differentiable one-step SR forward (same maths as :class:`mor_model.sr.pipeline.MoRSRPipeline`
    with ``tile=0``, ``color_fix="none"``, no clamping of the returned prediction's gradient path
    beyond the ``[-1, 1]`` clamp).

    ``forward(lq (B, 3, h, w) in [0, 1]) -> (pred (B, 3, scale h, scale w) in [-1, 1], scores (B, D))``;
    with ``return_latent=True`` also the clean latent ``x0`` the decoder got (``(B, C, H/f, W/f)`` float32,
    what VSD and the GAN look at). ``scale h`` must be a multiple of the VAE factor times the UNet factor
    (no padding in training). ``negative_prompt_embeds`` (optional) is kept for the VSD guidance.
    """

    def __init__(
        self,
        unet,
        vae,
        estimator,
        prompt_embeds,
        alphas_cumprod,
        prediction_type,
        *,
        scale,
        timestep=999,
        scheduler_config=None,
        negative_prompt_embeds=None,
    ):
        super().__init__()
        from ..layers import mor_layers

        self.unet, self.vae, self.estimator = unet, vae, estimator
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float(), persistent=False)
        negative = None if negative_prompt_embeds is None else negative_prompt_embeds.detach().float()
        self.register_buffer("negative_prompt_embeds", negative, persistent=False)
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod).detach().float(), persistent=False)
        abar = float(alphas_cumprod[timestep])
        self.alpha_bar = abar
        self.sqrt_abar, self.sqrt_one_minus_abar = math.sqrt(abar), math.sqrt(1 - abar)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
        self.prediction_type, self.scale, self.timestep = prediction_type, scale, int(timestep)
        self.scheduler_config = scheduler_config  # its clip_sample / thresholding apply to x0, as in the pipeline
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        self.routed = [name for name in ("unet", "vae") if mor_layers(getattr(self, name))]

    def train(self, mode: bool = True):
        """Only the adapters train; the frozen networks stay in eval mode (no dropout anywhere)."""
        super().train(mode)
        for m in (self.unet, self.vae, self.estimator):
            m.eval()
        return self

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """The latents of ``images (B, 3, H, W)`` in ``[-1, 1]`` (VAE mode, shifted and scaled, float32)."""
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return ((self.vae.encode(images).latent_dist.mode() - shift) * cfg.scaling_factor).float()

    def base_latents(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`latents` through the frozen VAE encoder with every adapter off (no gradient): where real
        images live for the discriminator."""
        from ..control import adapters_disabled

        with torch.no_grad(), adapters_disabled(self.vae):
            return self.latents(images)

    def forward(self, lq: torch.Tensor, return_latent: bool = False):
        from ..control import set_degradation

        b, _, h, w = lq.shape
        size = (h * self.scale, w * self.scale)
        if size[0] % (self.vae_factor * self.unet_factor) or size[1] % (self.vae_factor * self.unet_factor):
            raise ValueError(
                f"the upscaled size {size} must be a multiple of {self.vae_factor * self.unet_factor} "
                "(VAE factor x UNet factor): choose data.crop_size accordingly"
            )
        with torch.no_grad():
            scores = self.estimator(lq.float())
        for name in self.routed:
            set_degradation(getattr(self, name), scores)
        up = F.interpolate(lq.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        z = (self.vae.encode(up * 2 - 1).latent_dist.mode() - shift) * cfg.scaling_factor
        t = torch.full((b,), self.timestep, device=z.device, dtype=torch.long)
        pred = self.unet(z, t, encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1)).sample.float()
        z = z.float()
        x0 = x0_from_prediction(pred, z, self.alpha_bar, self.prediction_type)
        if self.scheduler_config is not None:
            x0 = clip_x0(x0, self.scheduler_config)
        out = self.vae.decode(x0 / cfg.scaling_factor + shift).sample
        if return_latent:
            return out.float().clamp(-1, 1), scores, x0
        return out.float().clamp(-1, 1), scores


def _plain_lora_config(rank: int, backend: str):
    from ..config import MoRConfig

    # all ranks always on: rank - 1 shared + 1 routed rank, no zero slot, top-1 (gate 1 after renormalising)
    return MoRConfig(
        num_shared=rank - 1, num_routed=1, num_zero=0, top_k=1, target_modules=VAE_LORA_TARGETS, backend=backend
    )


#: the autocast dtype of each mixed-precision mode
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cast_frozen_matmul_weights(module: nn.Module, dtype: torch.dtype, keep: set[int]) -> int:
    """Casts the frozen ``weight``/``bias`` of every ``nn.Linear``/``nn.Conv2d`` under ``module`` (MoR base layers
    included) to ``dtype``, in place; parameters whose ``id`` is in ``keep`` (the trainable ones) and everything
    else (norms, adapters, routers) stay as they are. Returns the number of elements cast.

    Exact under ``torch.autocast(dtype=dtype)``: autocast casts a linear's or a conv's weight and bias to that
    dtype at every call anyway (and caches the cast only for leaves that require grad, so a frozen weight was
    re-cast at each call), so the forward and every gradient stay bitwise the same while the float32 copy of
    these weights is no longer held. Outside autocast the model then no longer runs in float32."""
    cast = 0
    for layer in module.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        for name, p in list(layer.named_parameters(recurse=False)):
            if name in ("weight", "bias") and id(p) not in keep and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast += p.numel()
    return cast


def build_model(cfg: TrainConfig, log=print) -> tuple[OneStepSR, dict[str, nn.Parameter]]:
    """Loads the base model, puts on the adapters, freezes the rest; returns the model and its trainable
    parameters by name (``unet.*`` and ``vae.*``). With ``mixed_precision`` bf16/fp16 the frozen Linear/Conv2d
    weights of the UNet and the VAE are held in that dtype (:func:`cast_frozen_matmul_weights`); the adapters,
    routers and norms stay float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..adapter_io import load_adapter
    from ..config import MoRConfig
    from ..estimator import DegradationEstimator
    from ..inject import inject_mor
    from ..layers import trainable_parameters

    model_dir = Path(cfg.model)
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (model_dir / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"model {model_dir} is not a model directory: missing {missing} (diffusers layout)")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    unet.requires_grad_(False)
    vae.requires_grad_(False)

    if cfg.adapter is not None:
        load_adapter(unet, cfg.adapter, backend=cfg.backend)
        log(f"UNet MoR adapter: loaded from {cfg.adapter}")
    elif cfg.mor is not None:
        report = inject_mor(unet, MoRConfig.from_dict({**cfg.mor, "backend": cfg.backend}))
        log(f"UNet MoR adapter: new, from the config's 'mor' section; {report}")
    elif (model_dir / ADAPTER_DIR).is_dir():
        load_adapter(unet, model_dir / ADAPTER_DIR, backend=cfg.backend)
        log(f"UNet MoR adapter: loaded from {model_dir / ADAPTER_DIR}")
    else:
        report = inject_mor(unet, MoRConfig(backend=cfg.backend))
        log(f"UNet MoR adapter: new, MoRConfig defaults; {report}")

    vae_params: dict[str, nn.Parameter] = {}
    if cfg.vae_adapter == "lora":
        report = inject_mor(vae, _plain_lora_config(cfg.vae_lora_rank, cfg.backend))
        vae_params = {k: p for k, p in trainable_parameters(vae).items() if k.endswith(("lora_a", "lora_b"))}
        log(f"VAE encoder: plain LoRA rank {cfg.vae_lora_rank} on {len(report.replaced)} layers")
    elif cfg.vae_adapter == "mor":
        path = model_dir / VAE_ADAPTER_DIR
        if not path.is_dir():
            raise FileNotFoundError(f"vae_adapter 'mor' trains {path}, which does not exist")
        load_adapter(vae, path, backend=cfg.backend)
        vae_params = trainable_parameters(vae)
        log(f"VAE encoder: MoR adapter loaded from {path}")

    clip_dir = Path(cfg.clip) if cfg.clip is not None else model_dir / CLIP_DIR
    if not clip_dir.is_dir():
        raise FileNotFoundError(f"degradation CLIP {clip_dir} not found (set 'clip' to a DegradationEstimator dir)")
    estimator = DegradationEstimator.from_local(clip_dir)

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
    # VSD guides the pretrained score against a negative prompt (OSEDiff's by default)
    prompts = [cfg.prompt] + ([cfg.vsd.negative_prompt] if cfg.losses.get("vsd", 0) > 0 else [])
    with torch.no_grad():
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeds = text_encoder(ids)[0]
    del text_encoder
    embeds, negative = embeds[:1], (embeds[1:] if len(prompts) > 1 else None)

    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = OneStepSR(
        unet,
        vae,
        estimator,
        embeds,
        scheduler.alphas_cumprod,
        scheduler.config.prediction_type,
        scale=cfg.data.scale,
        timestep=cfg.timestep,
        scheduler_config=scheduler.config,
        negative_prompt_embeds=negative,
    )
    multiple = model.vae_factor * model.unet_factor
    if cfg.data.crop_size % multiple:
        raise ValueError(
            f"data.crop_size ({cfg.data.crop_size}) must be a multiple of {multiple} for this model "
            f"(VAE factor {model.vae_factor} x UNet factor {model.unet_factor})"
        )
    model.requires_grad_(False)
    params = {f"unet.{k}": p for k, p in trainable_parameters(unet).items()}
    params.update({f"vae.{k}": p for k, p in vae_params.items()})
    for p in params.values():
        p.requires_grad_(True)
    dtype = AUTOCAST_DTYPES.get(cfg.mixed_precision)
    if dtype is not None:
        keep = {id(p) for p in params.values()}
        n = sum(cast_frozen_matmul_weights(getattr(model, part), dtype, keep) for part in ("unet", "vae"))
        log(f"frozen UNet/VAE Linear and Conv2d weights held in {cfg.mixed_precision}: {n / 1e6:.1f} M parameters")
    return model, params
