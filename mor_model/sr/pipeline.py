"""One-step MoR super-resolution pipeline (OSEDiff-style, MOR_SPEC section 1).

    LQ (B, 3, h, w) in [0, 1]
      -> bicubic resize by ``scale`` -> pad (replicate) to a multiple of VAE factor x UNet factor
      -> VAE encode (optional VAE-encoder adapter), latent = (mode - shift) * scaling_factor
      -> degradation scores of the LQ input (CLIP estimator) -> set_degradation on the MoR layers
      -> one UNet pass at t = 999 with the (cached) prompt embedding, empty prompt by default
      -> x0 from the prediction (closed form with alphas_cumprod[999], = DDPMScheduler.step's
         pred_original_sample with one timestep, including the scheduler's clip_sample or dynamic
         thresholding when its config asks for them; no noise is drawn)
      -> VAE decode -> crop to exactly scale x (h, w) -> colour fix (adain | wavelet | none) -> clamp

Model directory (diffusers layout; see :func:`mor_model.testing.tiny_model` for a complete example):
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and, in the documented default
places, ``mor_adapter/`` (:data:`ADAPTER_DIR`, the UNet's MoR adapter), ``vae_encoder_adapter/``
(:data:`VAE_ADAPTER_DIR`, optional, a MoR adapter on the VAE's encoder convs and ``quant_conv``) and
``degradation_clip/`` (:data:`CLIP_DIR`, ``DegradationEstimator.save_local`` layout). The
``adapter``/``clip`` arguments override the defaults.

Large images: the VAE encoder, the UNet and the VAE decoder each run on overlapping tiles blended
with raised-cosine weights (:func:`mor_model.sr.tiling.tiled_apply`) when the image is larger than that
stage's tile: ``encoder_tile`` (pixels), ``tile`` (UNet, latent pixels) and ``decoder_tile`` (latent
pixels). ``None`` (default) picks each from the device's free memory (:mod:`mor_model.sr.tile_plan`,
capped at the sizes of the SR repositories: :data:`MAX_ENCODER_TILE`, :data:`MAX_UNET_TILE`,
:data:`MAX_DECODER_TILE`); ``0`` runs that stage whole; ``tile=0`` disables tiling everywhere. The
routing is per sample (the degradation scores come from the whole image), so every tile of an image
uses the same ranks. GroupNorm statistics: with ``tile_norm="global"`` (default) every GroupNorm of a
tiled stage normalises all tiles with one set of statistics, estimated from a pass over the whole
image subsampled to one tile's size (:class:`mor_model.sr.tiling.GroupNormStats`), instead of each
tile's own statistics (``tile_norm="tile"``), which is what makes tiles of different content come
out in different colours and brightness (seams). Attention layers still see only their tile, so tiled
and untiled results are close but not identical.

``fold_shared=True`` adds the shared ranks into the base weights once
(``W0 += scaling * B[:, :S] @ A[:S]``; for a conv the 1x1 x kxk composition) and keeps only the
routed ranks in the adapter, so inference pays for the routed part only (inference only: do not
save or train a folded model).

Per image, the MoR layers route once (the scores are the image's) and ``merge`` picks how each layer
applies its active ranks (:func:`mor_model.set_merge`): ``"auto"`` (default) folds them into per-image
merged weights ``W0 + scaling B_act diag(g) A_act`` where ``mor_kernels``' measured cost model says
that is faster than the low-rank path (layers with many tokens per weight), ``"always"``, or
``"never"``. Merged weights are made on the image's first use and reused by its tiles (and the
GroupNorm statistics pass), then dropped with its scores at the end of the call; ``layer.explain()``
says what each layer ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..control import set_degradation
from ..inference import MERGE_MODES
from ..layers import mor_layers
from ..merge import fold_shared_ranks, set_merge
from .color_fix import color_fix as apply_color_fix
from .loading import (
    ADAPTER_DIR,
    CLIP_DIR,
    VAE_ADAPTER_DIR,
    _cast_keeping_routers_fp32,
    _check_device,
    _load_estimator,
    _needs_scores,
    _resolve_adapter_path,
    resolve_dtype,
    resolve_model_dir,
)
from .tile_plan import (
    auto_tile_sizes,
    check_call_options,
    pixels_on_host,
    resolve_tile_sizes,
)
from .x0 import clip_x0, x0_from_prediction

__all__ = ["MoRSRPipeline"]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class MoRSRPipeline:
    """One-step MoR super-resolution; build it with :meth:`from_pretrained`.

    Call it with ``images (B, 3, h, w)`` in ``[0, 1]`` (any float dtype, any device); it returns
    ``(B, 3, round(scale h), round(scale w))`` float32 in ``[0, 1]`` on the device of ``images``, tiled
    or not (in a tiled call the full-resolution pixels stay in host memory and only tiles visit the
    pipeline's device, so device memory is bounded by the tile sizes).
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
        merge: str = "auto",
    ):
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
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
        self.merge = merge
        for m in (unet, vae):
            if mor_layers(m):
                set_merge(m, merge)

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
        merge: str = "auto",
        revision: str | None = None,
    ) -> MoRSRPipeline:
        """Loads the components of ``model_dir`` (diffusers layout, see the module docstring).

        Args:
            model_dir: the model directory, or a Hugging Face repo id (``revision``: its branch, tag or commit);
                a local directory of the same spelling wins (:func:`mor_model.sr.hub.resolve_source`).
            adapter: the UNet's MoR adapter directory (or its ``mor_adapter.safetensors`` file); None =
                ``model_dir/mor_adapter`` (required unless False, which runs the bare base model, e.g. as
                a baseline).
            clip: the degradation estimator: a ``DegradationEstimator.save_local`` directory, a
                checkpoint file with ``open_clip_config.json`` beside it, or an estimator;
                None = ``model_dir/degradation_clip``.
            vae_adapter: the VAE-encoder adapter (directory or file, as ``adapter``); None =
                ``model_dir/vae_encoder_adapter`` if it exists; False = none.
            dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` for the UNet, VAE and text encoder (the CLIP
                estimator and the routers, parameters included, stay float32).
            device: default ``"cuda"`` when available, else ``"cpu"``; a CUDA device without CUDA is a
                ``ValueError``.
            backend: the ``mor_kernels`` backend of the adapters (``"auto"``, ``"reference"``...).
            fold_shared: fold the shared ranks into the base weights (see :func:`fold_shared_ranks`).
            merge: per-image merged weights: ``"auto"`` (the measured cost model), ``"always"`` or
                ``"never"`` (see the module docstring and :func:`mor_model.set_merge`).
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..adapter_io import load_adapter

        model_dir = resolve_model_dir(model_dir, revision)
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (model_dir / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"{model_dir} is not a model directory: missing {missing} (diffusers layout)")
        torch_dtype = resolve_dtype(dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        _check_device(device)

        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")

        if adapter is not False:
            adapter_path = _resolve_adapter_path(adapter) if adapter not in (None, True) else model_dir / ADAPTER_DIR
            if not adapter_path.is_dir():
                raise FileNotFoundError(
                    f"MoR adapter {adapter_path} not found: pass --adapter/adapter= a directory written by "
                    f"mor_model.save_adapter, or put it at {model_dir / ADAPTER_DIR}"
                )
            load_adapter(unet, adapter_path, backend=backend)
        if vae_adapter is not False:
            vae_path = (
                _resolve_adapter_path(vae_adapter, "vae_adapter")
                if vae_adapter not in (None, True)
                else model_dir / VAE_ADAPTER_DIR
            )
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
            _cast_keeping_routers_fp32(m.requires_grad_(False).eval(), device, torch_dtype)
        return cls(
            unet, vae, text_encoder, tokenizer, scheduler, estimator, device=device, dtype=torch_dtype, merge=merge
        )

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
        """One UNet pass at ``self.timestep``; returns the x0 latent (float32) before :func:`clip_x0`."""
        b = latents.shape[0]
        t = torch.full((b,), self.timestep, device=latents.device, dtype=torch.long)
        pred = self.unet(latents.to(self.dtype), t, encoder_hidden_states=embeds.expand(b, -1, -1)).sample.float()
        abar = float(self.scheduler.alphas_cumprod[self.timestep].to(torch.float64))
        return x0_from_prediction(pred, latents.float(), abar, self.scheduler.config.prediction_type)

    # -- tiles -------------------------------------------------------------------------------------
    def auto_tile_sizes(self, batch: int = 1, *, free_bytes: int | None = None) -> dict[str, int]:
        """Tile sizes ``{"unet", "encoder", "decoder"}`` from the device's free memory (or ``free_bytes``);
        see :func:`mor_model.sr.tile_plan.auto_tile_sizes`."""
        return auto_tile_sizes(
            self.unet.config, self.vae.config, self.dtype, device=self.device, batch=batch, free_bytes=free_bytes
        )

    def check_call(self, **options) -> None:
        """Raises ``ValueError`` for call options (``scale``, ``color_fix``, ``tile``...) this pipeline cannot
        take (see :func:`mor_model.sr.tile_plan.check_call_options`)."""
        check_call_options(vae_factor=self.vae_scale_factor, unet_factor=self.unet_factor, **options)

    @staticmethod
    def _overlap(tile: int, fraction: int, multiple: int) -> int:
        return max(multiple, tile // fraction // multiple * multiple) if tile > multiple else 0

    def _run_stage(self, fn, x, *, norm_root, tile, overlap, scale, multiple, tile_norm, progress, out_device):
        """``fn(x)`` whole, or on tiles (with whole-image GroupNorm statistics unless ``tile_norm="tile"``)."""
        from .tiling import GroupNormStats, subsample_to, tiled_apply

        h, w = x.shape[-2:]
        if not tile or (h <= tile and w <= tile):
            return fn(x).to(out_device)
        kwargs = dict(tile_size=tile, overlap=overlap, scale=scale, multiple=multiple, progress=progress)
        if tile_norm == "tile":
            return tiled_apply(fn, x, out_device=out_device, **kwargs)
        stats = GroupNormStats(norm_root)
        with stats.recording():
            fn(subsample_to(x, tile * tile, multiple))
        with stats.applying():

            def tile_fn(t):
                stats.restart()
                return fn(t)

            return tiled_apply(tile_fn, x, out_device=out_device, **kwargs)

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
        encoder_tile: int | None = None,
        decoder_tile: int | None = None,
        tile_norm: str = "global",
        seed: int | None = None,
        sample_posterior: bool = False,
        scores: torch.Tensor | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> torch.Tensor:
        """Upscales ``images (B, 3, h, w)`` in ``[0, 1]``.

        Args:
            scale: output / input size (default 4); the output is ``(round(scale h), round(scale w))``.
            prompt: text prompt (empty by default); its embedding is cached.
            color_fix: ``"adain"`` (default), ``"wavelet"`` or ``"none"``.
            tile: UNet tile size in latent pixels (a multiple of the UNet factor); None = automatic
                (:meth:`auto_tile_sizes`); 0 = no tiling in any stage.
            tile_overlap: latent overlap between UNet tiles (default tile / 3, e.g. 32 for 96).
            encoder_tile: VAE-encoder tile size in pixels (a multiple of the VAE factor; overlap a
                quarter); None = automatic; 0 = the encoder runs on the whole image.
            decoder_tile: VAE-decoder tile size in latent pixels (overlap a quarter); None = automatic;
                0 = the decoder runs on the whole latent.
            tile_norm: ``"global"`` (default): in a tiled stage every tile is normalised with one set of
                GroupNorm statistics estimated from the whole image (see the module docstring);
                ``"tile"``: each tile with its own (seams likely).
            seed: seeds the VAE posterior sample when ``sample_posterior`` (otherwise the pipeline
                draws no random numbers and is deterministic anyway).
            sample_posterior: sample the VAE latent instead of taking its mode (OSEDiff samples).
            scores: ``(B, D)`` degradation scores to route with, instead of running the estimator
                (e.g. computed once with :meth:`degradation_scores`).
            progress: called as ``progress(stage, done, total)`` after each tile of a tiled stage.

        Returns:
            ``(B, 3, H, W)`` float32 in ``[0, 1]``, on the device of ``images``.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor (B, 3, h, w) in [0, 1], got {getattr(images, 'shape', images)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
        self.check_call(
            scale=scale,
            color_fix=color_fix,
            tile=tile,
            tile_overlap=tile_overlap,
            encoder_tile=encoder_tile,
            decoder_tile=decoder_tile,
            tile_norm=tile_norm,
        )
        lq = images.to(self.device, torch.float32).clamp(0, 1)
        b, _, h, w = lq.shape
        out_h, out_w = round(h * scale), round(w * scale)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"scale {scale} makes an empty output from a {h}x{w} input")
        if scores is not None and (not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != b):
            raise ValueError(f"scores must be a tensor (B={b}, D), got {getattr(scores, 'shape', scores)}")
        f = self.vae_scale_factor
        ph, pw = _round_up(out_h, self.multiple), _round_up(out_w, self.multiple)
        sizes = resolve_tile_sizes(tile, encoder_tile, decoder_tile, lambda: self.auto_tile_sizes(b))
        unet_ov = tile_overlap if tile_overlap is not None else self._overlap(sizes["unet"], 3, self.unet_factor)
        if sizes["unet"] and unet_ov >= sizes["unet"]:
            raise ValueError(f"tile_overlap ({unet_ov}) must be smaller than the UNet tile ({sizes['unet']})")
        # Tiled VAE stages on an accelerator: the full-resolution pixels (upscaled input, output) stay in
        # host memory and only tiles visit the device, so device memory is bounded by the tile sizes.
        pixel_device = torch.device("cpu") if pixels_on_host(sizes, ph, pw, f) else self.device
        up = F.interpolate(lq.to(pixel_device), size=(out_h, out_w), mode="bicubic", align_corners=False).clamp(0, 1)
        x = up * 2 - 1
        if (ph, pw) != (out_h, out_w):
            x = F.pad(x, (0, pw - out_w, 0, ph - out_h), mode="replicate")

        generator = None
        if sample_posterior:
            generator = torch.Generator(self.device).manual_seed(0 if seed is None else int(seed))
        embeds = self.encode_prompt(prompt)
        if scores is None:
            scores = self.degradation_scores(lq)
        dev = self.device

        def report(stage):
            return None if progress is None else (lambda done, total: progress(stage, done, total))

        for m in self.routed_modules:
            set_degradation(m, scores)
        try:
            z = self._run_stage(
                lambda t: self._encode(t.to(dev), generator).float(),
                x,
                norm_root=self.vae.encoder,
                tile=sizes["encoder"],
                overlap=self._overlap(sizes["encoder"], 4, f),
                scale=Fraction(1, f),
                multiple=f,
                tile_norm=tile_norm,
                progress=report("encode"),
                out_device=dev,
            )
            z0 = self._run_stage(
                lambda t: self._denoise(t, embeds),
                z,
                norm_root=self.unet,
                tile=sizes["unet"],
                overlap=unet_ov,
                scale=1,
                multiple=self.unet_factor,
                tile_norm=tile_norm,
                progress=report("unet"),
                out_device=dev,
            )
            z0 = clip_x0(z0, self.scheduler.config)  # on the whole latent: the thresholding quantile is per image
            out = self._run_stage(
                lambda t: self._decode(t.to(dev)).float().to(pixel_device),
                z0,
                norm_root=self.vae.decoder,
                tile=sizes["decoder"],
                overlap=self._overlap(sizes["decoder"], 4, 1),
                scale=f,
                multiple=1,
                tile_norm=tile_norm,
                progress=report("decode"),
                out_device=pixel_device,
            )
        finally:
            for m in self.routed_modules:
                set_degradation(m, None)
        out = ((out[..., :out_h, :out_w].float() + 1) / 2).clamp(0, 1)
        out = apply_color_fix(out, up, color_fix)
        return out.clamp(0, 1).to(images.device)
