"""Tile sizes and call options of the SR pipeline: the memory model, the automatic choice, the checks.

``auto_tile_sizes`` picks, per stage (VAE encoder in pixels, UNet and VAE decoder in latent pixels), the
largest square tile whose modelled peak memory fits the budget (:func:`mor_model.sr.tiling.choose_tile_size`),
capped at the tile sizes of the SR repositories. ``check_call_options`` validates what a caller passes
to :meth:`mor_model.sr.pipeline.MoRSRPipeline.__call__`; with :func:`model_factors` (read from the model's
config files, no weights loaded) the CLI checks its arguments before it reads a single image.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .color_fix import COLOR_FIX_METHODS

__all__ = [
    "MAX_DECODER_TILE",
    "MAX_ENCODER_TILE",
    "MAX_SCALE",
    "MAX_UNET_TILE",
    "TILE_NORMS",
    "JobMemory",
    "auto_tile_sizes",
    "check_call_options",
    "job_memory",
    "memory_shortfall",
    "model_factors",
    "pixels_on_host",
    "resolve_tile_sizes",
    "tile_costs",
]

#: caps of the automatic tile sizes (the tiling knobs of the OSEDiff/StableSR code: UNet latent tiles of
#: 96 with overlap 32, VAE encoder tiles of 1024 pixels, decoder tiles of 224 latent pixels)
MAX_UNET_TILE = 96
MAX_ENCODER_TILE = 1024
MAX_DECODER_TILE = 224
TILE_NORMS = ("global", "tile")
CPU_BUDGET = 4 << 30  # choose_tile_size's default budget on the CPU
_FRACTION = 0.6  # choose_tile_size's default memory_fraction
#: the largest upscaling factor accepted (outputs grow with scale^2; SR models are trained for 2-8)
MAX_SCALE = 16


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def model_factors(model_dir: str | os.PathLike) -> tuple[int, int]:
    """``(vae_scale_factor, unet_factor)`` from ``model_dir/vae/config.json`` and ``unet/config.json``."""
    out = []
    for part in ("vae", "unet"):
        path = Path(model_dir) / part / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a model directory: {path} is missing (diffusers layout)")
        try:
            channels = json.loads(path.read_text())["block_out_channels"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} has no usable block_out_channels: {e}") from None
        out.append(2 ** (len(channels) - 1))
    return out[0], out[1]


def tile_costs(unet_config, vae_config, dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """Memory model of one tile per stage and sample: ``(a, q)`` with peak bytes ``~ a n^2 + q n^4`` for a
    square tile of side ``n`` (pixels for the encoder, latent pixels for the UNet and the decoder).

    Activations (linear in the tile's pixels; heuristic): UNet ``64 * sum(block_out_channels)``, VAE
    encoder ``16 * block_out_channels[0]`` per pixel, VAE decoder ``24 * block_out_channels[0] *
    factor^2`` per latent pixel, times the dtype's size. Attention (quadratic in the tokens ``T``,
    counted as if the score matrix and its softmax were materialised, ``2 * heads * T^2`` elements, as
    PyTorch's math path does on the CPU; memory-efficient kernels need less): the UNet's highest
    resolution with attention, and the VAE's mid-block attention (one head over all
    ``block_out_channels[-1]`` channels) at latent resolution.
    """
    item = torch.finfo(dtype).bits // 8
    unet_channels = list(_get(unet_config, "block_out_channels"))
    heads = _get(unet_config, "num_attention_heads") or _get(unet_config, "attention_head_dim")  # SD 2.x: heads
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(unet_channels)
    kinds = list(_get(unet_config, "down_block_types"))
    unet_q = max((2 * heads[i] * item / 16**i for i, kind in enumerate(kinds) if "Attn" in kind), default=0.0)
    vae_channels = list(_get(vae_config, "block_out_channels"))
    f = 2 ** (len(vae_channels) - 1)
    ch0 = vae_channels[0]
    return {
        "unet": (64 * sum(unet_channels) * item, unet_q),
        "encoder": (16 * ch0 * item, 2 * item / f**4),
        "decoder": (24 * ch0 * f**2 * item, 2 * item),
    }


def auto_tile_sizes(
    unet_config,
    vae_config,
    dtype: torch.dtype,
    *,
    device: torch.device | str = "cpu",
    batch: int = 1,
    free_bytes: int | None = None,
) -> dict[str, int]:
    """Tile sizes ``{"unet", "encoder", "decoder"}`` that fit the memory budget of ``batch`` images (see
    :func:`tile_costs` and :func:`mor_model.sr.tiling.choose_tile_size`; ``free_bytes`` replaces the device
    query; on the CPU the budget is 4 GiB, or 60 % of the host's available memory when that is less),
    capped at :data:`MAX_UNET_TILE`, :data:`MAX_ENCODER_TILE` pixels and :data:`MAX_DECODER_TILE`."""
    from .tiling import choose_tile_size

    costs = tile_costs(unet_config, vae_config, dtype)
    f = 2 ** (len(_get(vae_config, "block_out_channels")) - 1)
    m = 2 ** (len(_get(unet_config, "block_out_channels")) - 1)
    if free_bytes is None and torch.device(device).type == "cpu":
        from .host_memory import host_available_bytes

        host = host_available_bytes()  # the CPU budget (4 GiB), unless the host has less to give
        free_bytes = None if host is None or host * _FRACTION >= CPU_BUDGET else host
    limits = {  # stage: (multiple, smallest, largest)
        "unet": (m, 4 * m, MAX_UNET_TILE),
        "encoder": (f, 4 * f * m, MAX_ENCODER_TILE),
        "decoder": (1, 4 * m, MAX_DECODER_TILE),
    }
    sizes = {}
    for stage, (multiple, lo, hi) in limits.items():
        a, q = costs[stage]
        lo = max(multiple, lo // multiple * multiple)
        sizes[stage] = choose_tile_size(
            a * batch,
            bytes_per_pixel_sq=q * batch,
            device=device,
            multiple=multiple,
            min_tile=lo,
            max_tile=max(hi // multiple * multiple, lo),
            free_bytes=free_bytes,
        )
    return sizes


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_call_options(
    *,
    vae_factor: int,
    unet_factor: int,
    scale: float = 4,
    color_fix: str = "adain",
    tile: int | None = None,
    tile_overlap: int | None = None,
    encoder_tile: int | None = None,
    decoder_tile: int | None = None,
    tile_norm: str = "global",
) -> None:
    """Raises ``ValueError`` naming the option when a call option does not suit a model with these factors."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if scale > MAX_SCALE:
        raise ValueError(f"scale must be at most {MAX_SCALE} (the output grows with scale^2), got {scale!r}")
    if color_fix not in COLOR_FIX_METHODS:
        raise ValueError(f"color_fix must be one of {COLOR_FIX_METHODS}, got {color_fix!r}")
    if tile_norm not in TILE_NORMS:
        raise ValueError(f"tile_norm must be one of {TILE_NORMS}, got {tile_norm!r}")
    for name, value, m, what in (
        ("tile", tile, unet_factor, "the UNet's downsampling factor"),
        ("encoder_tile", encoder_tile, vae_factor, "the VAE factor"),
        ("decoder_tile", decoder_tile, 1, "any size"),
    ):
        if value is not None and (not _is_int(value) or value < 0 or value % m):
            raise ValueError(f"{name} must be None, 0 or a positive multiple of {m} ({what}), got {value!r}")
    if tile_overlap is not None:
        if not _is_int(tile_overlap) or tile_overlap < 0 or tile_overlap % unet_factor:
            raise ValueError(f"tile_overlap must be a non-negative multiple of {unet_factor}, got {tile_overlap!r}")
        if tile and tile_overlap >= tile:
            raise ValueError(f"tile_overlap ({tile_overlap}) must be smaller than tile ({tile})")


def resolve_tile_sizes(
    tile: int | None, encoder_tile: int | None, decoder_tile: int | None, auto: Callable[[], dict[str, int]]
) -> dict[str, int]:
    """The tile sizes a pipeline call uses (:meth:`MoRSRPipeline.__call__` and the memory plan of a job call
    this): ``tile=0`` turns every stage off, None entries come from ``auto()`` (:func:`auto_tile_sizes`),
    the rest as given."""
    sizes = {"unet": tile, "encoder": encoder_tile, "decoder": decoder_tile}
    if tile == 0:
        return dict.fromkeys(sizes, 0)
    if any(v is None for v in sizes.values()):
        found = auto()
        sizes = {k: found[k] if v is None else v for k, v in sizes.items()}
    return sizes


def pixels_on_host(tiles: dict[str, int], height: int, width: int, vae_factor: int) -> bool:
    """Whether a call keeps its full-resolution pixels (the upscaled input, the output) in host memory: when
    the VAE encoder or decoder runs on tiles of the padded ``height x width`` image (tile sizes ``tiles`` of
    :func:`resolve_tile_sizes`), only tiles visit the device, so device memory is bounded by the tile sizes
    (the placement of :meth:`MoRSRPipeline.__call__`, and of :func:`job_memory`)."""
    longest = max(height, width)
    return 0 < (tiles.get("encoder") or 0) < longest or 0 < (tiles.get("decoder") or 0) * vae_factor < longest


#: float32 RGB copies of the output image alive at the peak of a call, counting the CLI's: the bicubic
#: upscale, the encoder input, the decoder's blend buffers (sum, weights, quotient), the colour-fix
#: temporaries and the 8-bit copy being written. Measured with the tiny model on the CPU (peak RSS over
#: the loaded model, auto tiles): 617 MiB for a 2048x2048 output, 12.9 copies of 48 MiB with the tiles'
#: activations included, about 9 without them
PIXEL_COPIES = 12
#: float32 copies of the latent alive at the peak (encoder result, UNet blend buffers, x0, its clip)
LATENT_COPIES = 6


@dataclass(frozen=True)
class JobMemory:
    """Planned peak memory of one pipeline call (:func:`job_memory`), in bytes: ``host`` and ``device``
    (0 when the device is the CPU: everything is then host memory), and the ``output`` size (H, W)."""

    host: int
    device: int
    output: tuple[int, int]


def job_memory(
    height: int,
    width: int,
    *,
    unet_config,
    vae_config,
    dtype: torch.dtype,
    device: torch.device | str,
    tiles: dict[str, int],
    scale: float = 4,
    batch: int = 1,
) -> JobMemory:
    """Planned peak memory of upscaling ``batch`` images of ``height x width`` pixels (input, the output
    and its float32 copies, the latents, and the largest stage's activations for the tile plan
    ``tiles`` of :func:`resolve_tile_sizes`, per :func:`tile_costs`); the model's weights are not
    counted (they are loaded already). Follows the pipeline's placement: with a tiled VAE stage the
    full-resolution pixels stay in host memory and only tiles visit the device."""
    f = 2 ** (len(_get(vae_config, "block_out_channels")) - 1)
    m = 2 ** (len(_get(unet_config, "block_out_channels")) - 1)
    latent_channels = _get(vae_config, "latent_channels", 4) or 4
    out_h, out_w = round(height * scale), round(width * scale)
    ph, pw = -(-out_h // (f * m)) * (f * m), -(-out_w // (f * m)) * (f * m)
    lh, lw = ph // f, pw // f
    costs = tile_costs(unet_config, vae_config, dtype)

    def stage(name: str, rows: int, cols: int) -> float:
        n = tiles.get(name) or 0
        area = (min(n, rows) * min(n, cols)) if n else rows * cols
        a, q = costs[name]
        return batch * (a * area + q * area * area)

    activations = max(stage("encoder", ph, pw), stage("unet", lh, lw), stage("decoder", lh, lw))
    pixels = batch * PIXEL_COPIES * 12 * ph * pw
    latents = batch * LATENT_COPIES * 4 * latent_channels * lh * lw
    inputs = batch * 2 * 12 * height * width  # the decoded image and the pipeline's float32 copy
    if torch.device(device).type == "cpu":
        return JobMemory(int(pixels + latents + inputs + activations), 0, (out_h, out_w))
    if pixels_on_host(tiles, ph, pw, f):
        return JobMemory(int(pixels + inputs), int(latents + activations), (out_h, out_w))
    return JobMemory(int(inputs), int(pixels + latents + activations), (out_h, out_w))


def memory_shortfall(job: JobMemory, *, host_free: int | None, device_free: int | None) -> str | None:
    """Why ``job`` cannot fit (``"needs about 93.1 GiB of host memory for a 36000x36000 output; 20.2 GiB is
    available"``), or None when it fits or the free memory is unknown."""
    from .host_memory import format_bytes

    size = f"a {job.output[1]}x{job.output[0]} output"
    if host_free is not None and job.host > host_free:
        return f"needs about {format_bytes(job.host)} of host memory for {size}; {format_bytes(host_free)} is available"
    if device_free is not None and job.device > device_free:
        return (
            f"needs about {format_bytes(job.device)} of device memory for {size}; {format_bytes(device_free)} is "
            "free (a smaller --tile / --decoder-tile / --encoder-tile, or --scale, would need less)"
        )
    return None
