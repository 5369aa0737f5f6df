"""One-step MoR super-resolution pipeline (OSEDiff-style, MOR_SPEC section 1).

    LQ (B, 3, h, w) in [0, 1]
      -> bicubic resize by ``scale`` -> pad (replicate) to a multiple of VAE factor x UNet factor
      -> VAE encode (optional VAE-encoder adapter), latent = (mode - shift) * scaling_factor
      -> degradation scores of the LQ input (CLIP estimator) -> set_degradation on the MoR layers
      -> one UNet pass at t = 999 with the (cached) prompt embedding, empty prompt by default
      -> x0 from the prediction (closed form with alphas_cumprod[999], = DDPMScheduler.step's
         pred_original_sample with one timestep; no noise is drawn)
      -> VAE decode -> crop to exactly scale x (h, w) -> colour fix (adain | wavelet | none) -> clamp

Model directory (diffusers layout; see :func:`mor_model.testing.tiny_model` for a complete example):
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and, in the documented default
places, ``mor_adapter/`` (:data:`ADAPTER_DIR`, the UNet's MoR adapter), ``vae_encoder_adapter/``
(:data:`VAE_ADAPTER_DIR`, optional, a MoR adapter on the VAE's encoder convs and ``quant_conv``) and
``degradation_clip/`` (:data:`CLIP_DIR`, ``DegradationEstimator.save_local`` layout). The
``adapter``/``clip`` arguments override the defaults.

Large images: ``tile`` (latent pixels) runs the VAE encoder, the UNet and the VAE decoder on
overlapping tiles blended with raised-cosine weights (:func:`mor_model.tiling.tiled_apply`); the
routing is per sample (the degradation scores come from the whole image), so every tile of an image
uses the same ranks. ``tile=None`` picks the size from the device's free memory; ``tile=0`` disables
tiling. Note that the VAE and UNet attention layers see only their tile, so tiled and untiled
results are close but not identical.

``fold_shared=True`` adds the shared ranks into the base weights once
(``W0 += scaling * B[:, :S] @ A[:S]``; for a conv the 1x1 x kxk composition) and keeps only the
routed ranks in the adapter, so inference pays for the routed part only (inference only: do not
save or train a folded model).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .color_fix import COLOR_FIX_METHODS
from .color_fix import color_fix as apply_color_fix
from .control import set_degradation
from .layers import MoRLinear, mor_layers

__all__ = [
    "ADAPTER_DIR",
    "CLIP_DIR",
    "VAE_ADAPTER_DIR",
    "MoRSRPipeline",
    "fold_shared_ranks",
    "resolve_dtype",
]

#: default places inside a model directory
ADAPTER_DIR = "mor_adapter"
VAE_ADAPTER_DIR = "vae_encoder_adapter"
CLIP_DIR = "degradation_clip"

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` (or the long names, or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")


@torch.no_grad()
def fold_shared_ranks(module: nn.Module) -> list[str]:
    """Folds the shared ranks of every MoR layer under ``module`` into its base weight (inference only).

    For each layer with ``S > 0`` shared ranks: ``W0 <- W0 + scaling * B[:, :S] @ A[:S]`` (Linear) or
    ``W0[o] <- W0[o] + scaling * sum_r B[o, r] A[r]`` (Conv2d: a 1x1 conv after a kxk conv with the same
    stride/padding/dilation is one kxk conv), computed in float32, then ``lora_a``/``lora_b`` keep only
    the routed ranks and the layer runs with ``num_shared = 0``. Routed slot ``j`` was rank ``S + j``
    and is now rank ``j``, so the routing is unchanged. New tensors replace the old ones (nothing is
    written into tensors another model might share). Returns the names of the folded layers.
    """
    folded = []
    for name, layer in mor_layers(module).items():
        s = layer.num_shared
        if s == 0:
            continue
        a, b = layer.lora_a.detach(), layer.lora_b.detach()
        w = layer.base_layer.weight
        if isinstance(layer, MoRLinear):
            delta = b[:, :s].float() @ a[:s].float()
        else:
            delta = torch.einsum("or,rchw->ochw", b[:, :s].float(), a[:s].float())
        layer.base_layer.weight = nn.Parameter((w.float() + layer.scaling * delta).to(w.dtype), requires_grad=False)
        layer.lora_a = nn.Parameter(a[s:].clone(), requires_grad=False)
        layer.lora_b = nn.Parameter(b[:, s:].clone(), requires_grad=False)
        layer.num_shared = 0
        layer.folded_shared_ranks = s
        folded.append(name)
    return folded


def _load_estimator(clip, device: torch.device):
    from .estimator import CONFIG_NAME, DegradationEstimator

    if isinstance(clip, DegradationEstimator):
        return clip.to(device)
    path = Path(clip)
    if path.is_dir():
        return DegradationEstimator.from_local(path).to(device)
    if path.is_file():
        import json

        cfg_file = path.parent / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"CLIP checkpoint {path} has no {CONFIG_NAME} next to it; pass a directory written by "
                "DegradationEstimator.save_local, or put the open_clip config beside the checkpoint"
            )
        meta = json.loads(cfg_file.read_text())
        pre = meta.get("preprocess_cfg", {})
        kwargs = {k: tuple(pre[k]) for k in ("mean", "std") if k in pre}
        return DegradationEstimator.from_config(meta.get("model_cfg", meta), checkpoint=path, **kwargs).to(device)
    raise FileNotFoundError(f"CLIP model {clip} does not exist (expected a directory or a checkpoint file)")


def _needs_scores(module: nn.Module) -> bool:
    """True when a MoR layer under ``module`` routes on the degradation vector."""
    return any(layer.config.uses_degradation for layer in mor_layers(module).values())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class MoRSRPipeline:
    """One-step MoR super-resolution; build it with :meth:`from_pretrained`.

    Call it with ``images (B, 3, h, w)`` in ``[0, 1]`` (any float dtype, any device); it returns
    ``(B, 3, round(scale h), round(scale w))`` float32 in ``[0, 1]`` on the pipeline's device (on the
    CPU for tiled calls: only tiles visit the device, so device memory is bounded by the tile size).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        scheduler,
        estimator: nn.Module | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        timestep: int = 999,
    ):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler, self.estimator = tokenizer, scheduler, estimator
        self.device, self.dtype, self.timestep = device, dtype, int(timestep)
        if not 0 <= self.timestep < scheduler.config.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {scheduler.config.num_train_timesteps}), got {timestep}")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        self.multiple = self.vae_scale_factor * self.unet_factor  # pixel padding multiple
        self.routed_modules = [m for m in (unet, vae) if _needs_scores(m)]
        if self.routed_modules and estimator is None:
            raise ValueError("the model has MoR adapters routed on degradation scores: an estimator (clip) is needed")
        if estimator is not None:
            dims = {layer.config.num_degradation_dims for m in self.routed_modules for layer in mor_layers(m).values()}
            n = len(estimator.prompt_pairs)
            if dims and dims != {n}:
                raise ValueError(f"the adapters expect {sorted(dims)} degradation scores but the estimator gives {n}")
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        adapter: str | os.PathLike | bool | None = None,
        clip=None,
        *,
        vae_adapter: str | os.PathLike | bool | None = None,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device | None = None,
        backend: str = "auto",
        fold_shared: bool = False,
    ) -> MoRSRPipeline:
        """Loads the components of ``model_dir`` (diffusers layout, see the module docstring).

        Args:
            model_dir: the model directory.
            adapter: the UNet's MoR adapter directory; None = ``model_dir/mor_adapter`` (required
                unless False, which runs the bare base model, e.g. as a baseline).
            clip: the degradation estimator: a ``DegradationEstimator.save_local`` directory, a
                checkpoint file with ``open_clip_config.json`` beside it, or an estimator;
                None = ``model_dir/degradation_clip``.
            vae_adapter: the VAE-encoder adapter; None = ``model_dir/vae_encoder_adapter`` if it
                exists; False = none.
            dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for the UNet, VAE and text encoder (the CLIP
                estimator and the routers run in float32).
            device: default ``"cuda"`` when available, else ``"cpu"``.
            backend: the ``mor_kernels`` backend of the adapters (``"auto"``, ``"reference"``...).
            fold_shared: fold the shared ranks into the base weights (see :func:`fold_shared_ranks`).
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from .adapter_io import load_adapter

        model_dir = Path(model_dir)
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (model_dir / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"{model_dir} is not a model directory: missing {missing} (diffusers layout)")
        torch_dtype = resolve_dtype(dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")

        if adapter is not False:
            adapter_path = Path(adapter) if adapter not in (None, True) else model_dir / ADAPTER_DIR
            if not adapter_path.is_dir():
                raise FileNotFoundError(
                    f"MoR adapter {adapter_path} not found: pass --adapter/adapter= a directory written by "
                    f"mor_model.save_adapter, or put it at {model_dir / ADAPTER_DIR}"
                )
            load_adapter(unet, adapter_path, backend=backend)
        if vae_adapter is not False:
            vae_path = Path(vae_adapter) if vae_adapter not in (None, True) else model_dir / VAE_ADAPTER_DIR
            if vae_path.is_dir():
                load_adapter(vae, vae_path, backend=backend)
            elif vae_adapter not in (None, True):
                raise FileNotFoundError(f"VAE-encoder adapter {vae_path} not found")
        if fold_shared:
            for m in (unet, vae):
                fold_shared_ranks(m)

        estimator = None
        if _needs_scores(unet) or _needs_scores(vae):
            clip_path = clip if clip is not None else model_dir / CLIP_DIR
            estimator = _load_estimator(clip_path, device)

        for m in (unet, vae, text_encoder):
            # nn.Module.to: diffusers' override warns about fp32-kept modules on every dtype cast, even
            # when there are none (diffusers 0.42); these models have none
            nn.Module.to(m.requires_grad_(False).eval(), device=device, dtype=torch_dtype)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, estimator, device=device, dtype=torch_dtype)

    # -- pieces ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str = "") -> torch.Tensor:
        """``(1, L, D)`` text-encoder hidden states of ``prompt`` (cached per prompt)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if prompt not in self._prompt_cache:
            ids = self.tokenizer(
                [prompt],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            self._prompt_cache[prompt] = self.text_encoder(ids)[0].to(self.dtype)
        return self._prompt_cache[prompt]

    @torch.no_grad()
    def degradation_scores(self, images: torch.Tensor) -> torch.Tensor | None:
        """``(B, D)`` float32 degradation scores of the LQ ``images`` (None without an estimator)."""
        if self.estimator is None:
            return None
        return self.estimator(images.to(self.device, torch.float32))

    def _encode(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        cfg = self.vae.config
        dist = self.vae.encode(pixels.to(self.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (z - shift) * cfg.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return self.vae.decode((latents / cfg.scaling_factor + shift).to(self.dtype)).sample

    def _denoise(self, latents: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """One UNet pass at ``self.timestep``; returns the x0 latent (float32)."""
        b = latents.shape[0]
        t = torch.full((b,), self.timestep, device=latents.device, dtype=torch.long)
        pred = self.unet(latents.to(self.dtype), t, encoder_hidden_states=embeds.expand(b, -1, -1)).sample.float()
        abar = self.scheduler.alphas_cumprod[self.timestep].to(torch.float64)
        sa, sb = float(abar.sqrt()), float((1 - abar).sqrt())
        z = latents.float()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (z - sb * pred) / sa
        if kind == "v_prediction":
            return sa * z - sb * pred
        if kind == "sample":
            return pred
        raise ValueError(f"unsupported scheduler prediction_type {kind!r}")

    def auto_tile_size(self) -> int:
        """Latent tile size from the device's free memory (a heuristic per-pixel cost, see below).

        Cost model (bytes per latent pixel of a tile): UNet ``64 * sum(block_out_channels) * itemsize``
        (about 0.4 MB for SD 2.1 in fp16, i.e. ~1.5 GB of activations for a 64x64 latent) and VAE
        ``16 * block_out_channels[0] * factor^2 * itemsize``; the larger one decides.
        """
        from .tiling import choose_tile_size

        item = torch.finfo(self.dtype).bits // 8
        unet_cost = 64 * sum(self.unet.config.block_out_channels) * item
        vae_cost = 16 * self.vae.config.block_out_channels[0] * self.vae_scale_factor**2 * item
        return choose_tile_size(
            max(unet_cost, vae_cost), device=self.device, multiple=self.unet_factor, min_tile=8 * self.unet_factor
        )

    def _tile_overlap(self, tile: int, overlap: int | None) -> int:
        m = self.unet_factor
        if overlap is None:
            overlap = max(m, tile // 4 // m * m)
        if overlap % m or not 0 <= overlap < tile:
            raise ValueError(f"tile_overlap must be a multiple of {m} in [0, tile={tile}), got {overlap}")
        return overlap

    # -- the whole thing -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        *,
        scale: float = 4,
        prompt: str = "",
        color_fix: str = "adain",
        tile: int | None = None,
        tile_overlap: int | None = None,
        seed: int | None = None,
        sample_posterior: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> torch.Tensor:
        """Upscales ``images (B, 3, h, w)`` in ``[0, 1]``.

        Args:
            scale: output / input size (default 4); the output is ``(round(scale h), round(scale w))``.
            prompt: text prompt (empty by default); its embedding is cached.
            color_fix: ``"adain"`` (default), ``"wavelet"`` or ``"none"``.
            tile: latent tile size (a multiple of the UNet factor; output pixels per tile = tile x VAE
                factor); None = automatic from free memory; 0 = no tiling.
            tile_overlap: latent overlap between tiles (default tile / 4).
            seed: seeds the VAE posterior sample when ``sample_posterior`` (otherwise the pipeline
                draws no random numbers and is deterministic anyway).
            sample_posterior: sample the VAE latent instead of taking its mode (OSEDiff samples).
            progress: called as ``progress(stage, done, total)`` after each tile of each stage.

        Returns:
            ``(B, 3, H, W)`` float32 in ``[0, 1]``, on the pipeline's device, or on the CPU when the
            call was tiled (the full-resolution tensors then live in host memory).
        """
        from .tiling import tiled_apply

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor (B, 3, h, w) in [0, 1], got {getattr(images, 'shape', images)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
        if tile is not None and (not isinstance(tile, int) or tile < 0 or tile % self.unet_factor):
            raise ValueError(f"tile must be None, 0 or a positive multiple of {self.unet_factor}, got {tile!r}")

        lq = images.to(self.device, torch.float32).clamp(0, 1)
        b, _, h, w = lq.shape
        out_h, out_w = round(h * scale), round(w * scale)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"scale {scale} makes an empty output from a {h}x{w} input")
        ph, pw = _round_up(out_h, self.multiple), _round_up(out_w, self.multiple)
        lat_h, lat_w = ph // self.vae_scale_factor, pw // self.vae_scale_factor
        if tile is None:
            tile = self.auto_tile_size()
        tiled = tile != 0 and (tile < lat_h or tile < lat_w)
        # Tiled on an accelerator: the full-resolution images (upscaled input, output) stay in host
        # memory and only tiles visit the device, so device memory is bounded by the tile size.
        pixel_device = torch.device("cpu") if tiled else self.device
        up = F.interpolate(lq.to(pixel_device), size=(out_h, out_w), mode="bicubic", align_corners=False).clamp(0, 1)
        x = up * 2 - 1
        if (ph, pw) != (out_h, out_w):
            x = F.pad(x, (0, pw - out_w, 0, ph - out_h), mode="replicate")

        generator = None
        if sample_posterior:
            generator = torch.Generator(self.device).manual_seed(0 if seed is None else int(seed))
        embeds = self.encode_prompt(prompt)
        scores = self.degradation_scores(lq)
        for m in self.routed_modules:
            set_degradation(m, scores)
        try:
            if not tiled:
                z = self._encode(x, generator)
                z0 = self._denoise(z, embeds)
                out = self._decode(z0).float()
            else:
                ov = self._tile_overlap(tile, tile_overlap)
                f, dev = self.vae_scale_factor, self.device

                def report(stage):
                    return None if progress is None else (lambda done, total: progress(stage, done, total))

                z = tiled_apply(
                    lambda t: self._encode(t.to(dev), generator).float().to(pixel_device),
                    x,
                    tile_size=tile * f,
                    overlap=ov * f,
                    scale=Fraction(1, f),
                    multiple=self.multiple,
                    progress=report("encode"),
                )
                z0 = tiled_apply(
                    lambda t: self._denoise(t, embeds),
                    z.to(dev),
                    tile_size=tile,
                    overlap=ov,
                    multiple=self.unet_factor,
                    progress=report("unet"),
                )
                out = tiled_apply(
                    lambda t: self._decode(t.to(dev)).float().to(pixel_device),
                    z0.to(pixel_device),
                    tile_size=tile,
                    overlap=ov,
                    scale=f,
                    multiple=self.unet_factor,
                    progress=report("decode"),
                )
        finally:
            for m in self.routed_modules:
                set_degradation(m, None)
        out = ((out[..., :out_h, :out_w].float() + 1) / 2).clamp(0, 1)
        out = apply_color_fix(out, up, color_fix)
        return out.clamp(0, 1)
