"""Can this machine upscale that image now? The check every front end (``mor-sr upscale``, ``route-stats``,
the demo) runs before it decodes an image file.

``memory_problem(pipe, height, width, **options)`` compares the planned peak memory of the job
(:func:`mor_model.sr.tile_plan.job_memory`, with the tile sizes the pipeline call would use) with what the
host and the device have free now. ``load_checked(pipe, path, **options)`` reads the size the file's header
declares, refuses the image with :class:`ImageTooLargeError` when the job cannot fit, and only then decodes
it (:func:`mor_model.sr.image_io.load_image`, which raises :class:`~mor_model.sr.image_io.ImageReadError`
for an unreadable file).
"""

from __future__ import annotations

import os

import torch

from .image_io import _DEFAULT

__all__ = ["ImageTooLargeError", "load_checked", "memory_problem"]


class ImageTooLargeError(ValueError):
    """The job of an image cannot fit in the memory this machine has; ``str()`` is the reason, e.g. "too large
    for this machine (4000x4000 input): it needs about 93.1 GiB of host memory for ...; ... is available"."""

    def __init__(self, path, width: int, height: int, why: str):
        self.path, self.width, self.height, self.why = path, width, height, why
        super().__init__(f"too large for this machine ({width}x{height} input): it {why}")


def memory_problem(
    pipe,
    height: int,
    width: int,
    *,
    scale: float = 4,
    tile: int | None = None,
    encoder_tile: int | None = None,
    decoder_tile: int | None = None,
    batch: int = 1,
) -> str | None:
    """Why ``pipe(images, scale=..., tile=..., encoder_tile=..., decoder_tile=...)`` on ``batch`` images of
    ``height x width`` cannot fit in the memory the host and ``pipe``'s device have now, or None."""
    from . import host_memory
    from .tile_plan import job_memory, memory_shortfall, resolve_tile_sizes

    tiles = resolve_tile_sizes(tile, encoder_tile, decoder_tile, lambda: pipe.auto_tile_sizes(batch))
    job = job_memory(
        height,
        width,
        unet_config=pipe.unet.config,
        vae_config=pipe.vae.config,
        dtype=pipe.dtype,
        device=pipe.device,
        tiles=tiles,
        scale=scale,
        batch=batch,
    )
    return memory_shortfall(
        job, host_free=host_memory.host_available_bytes(), device_free=host_memory.device_free_bytes(pipe.device)
    )


def load_checked(
    pipe,
    path: str | os.PathLike,
    *,
    max_pixels=_DEFAULT,
    scale: float = 4,
    tile: int | None = None,
    encoder_tile: int | None = None,
    decoder_tile: int | None = None,
) -> torch.Tensor:
    """The image file ``path`` as ``(3, H, W)`` float32 in ``[0, 1]``, decoded only once its declared size is
    known to fit a ``pipe`` call with these options (:func:`memory_problem`).

    Raises:
        ImageReadError: an unreadable file (from its header, or when decoded; ``max_pixels`` as for
            :func:`~mor_model.sr.image_io.load_image`).
        ImageTooLargeError: the job cannot fit (nothing was decoded).
    """
    from . import image_io  # looked up at call time (tests wrap image_io.load_image)

    width, height = image_io.image_size(path)
    why = memory_problem(
        pipe, height, width, scale=scale, tile=tile, encoder_tile=encoder_tile, decoder_tile=decoder_tile
    )
    if why:
        raise ImageTooLargeError(path, width, height, why)
    return image_io.load_image(path) if max_pixels is _DEFAULT else image_io.load_image(path, max_pixels=max_pixels)
