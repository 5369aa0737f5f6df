"""Training data for super-resolution: HR images -> random crops -> LR made on the fly.

``SRDataset(sources, crop_size=512, scale=4, degradation="realesrgan")`` reads high-resolution images
from folders (searched recursively) and/or list files (one path per line, relative paths resolved
against the list file's folder, ``#`` comments), takes a random ``crop_size`` crop (flipped at random),
and makes the low-quality input with the degradation pipeline (``"realesrgan"``: the second-order
Real-ESRGAN pipeline of :mod:`mor_model.train.degradations`; ``"bicubic"``: plain bicubic downscaling).

Items are ``(lq, hr)``: float32 ``(3, crop/scale, crop/scale)`` and ``(3, crop, crop)`` in ``[0, 1]``.

Reproducibility: item ``i`` is a *global sample index*, unbounded: epoch ``i // len(dataset)``
visits the files in a permutation seeded by ``(seed, epoch)``, and the crop, flip and degradation
of item ``i`` draw from a generator seeded by ``(seed, i)``. The same ``(seed, i)`` therefore gives
the same pair in any process, worker or resumed run; :class:`StepBatchSampler` hands out these
indices step by step (and per process), so training resumes on exactly the batches it would have
seen.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..sr.image_io import ImageReadError, collect_images, is_image_file, load_image

__all__ = ["DEGRADATIONS", "SRDataset", "StepBatchSampler", "find_hr_images", "sample_seed"]

DEGRADATIONS = ("realesrgan", "bicubic")
#: a corrupt file is replaced by the next files of the permutation, at most this many times in a row
MAX_BAD_IN_A_ROW = 16


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (NumPy's SeedSequence: well mixed, platform independent)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def _read_list_file(path: Path) -> list[Path]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not is_image_file(p):
            raise ValueError(f"{path}:{n}: {line!r} is not an image file (png/jpg/jpeg/webp/bmp/tif/tiff)")
        out.append(p)
    return out


def find_hr_images(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image files from folders (recursive), image files, and list files (``.txt``/``.list``/``.lst``).

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: nothing found, or a list file names a non-image.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [Path(s).expanduser() for s in sources]
    if not sources:
        raise ValueError("no HR image sources given (data.hr must list folders, images or list files)")
    files: list[Path] = []
    for src in sources:
        if not src.exists():
            raise FileNotFoundError(f"HR image source {src} does not exist")
        if src.is_file() and src.suffix.lower() in (".txt", ".list", ".lst"):
            files.extend(_read_list_file(src))
            continue
        found = collect_images([src], recursive=True)
        if found.errors:
            path, reason = found.errors[0]
            raise ValueError(f"HR image source {path}: {reason}")
        files.extend(found.files)
    if not files:
        raise ValueError(f"no HR images found in {[str(s) for s in sources]}")
    return files


def _bicubic_down(hr: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
    del generator
    lq = F.interpolate(hr[None], scale_factor=1 / scale, mode="bicubic", align_corners=False, antialias=True)
    return lq[0].clamp(0, 1)


class _RealESRGAN:
    """Picklable ``(hr (3, H, W), generator) -> lq`` around :func:`mor_model.train.degradations.degrade`."""

    def __init__(self, scale: int, options: dict):
        from .degradations import DegradationConfig

        fields = set(DegradationConfig.__dataclass_fields__)
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown degradation_options {unknown}; known: {sorted(fields)}")
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        self.scale, self.config = scale, DegradationConfig(**opts)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from .degradations import degrade

        return degrade(hr[None], self.scale, self.config, generator)[0]


class SRDataset(torch.utils.data.Dataset):
    """``(lq, hr)`` training pairs from HR images (see the module docstring).

    Args:
        sources: folders, image files and list files of HR images.
        crop_size: side of the square HR crop (a multiple of ``scale``); images smaller than that are
            first enlarged (bicubic) so the shorter side equals ``crop_size``.
        scale: the SR factor; ``lq`` is ``crop_size / scale`` on a side.
        flip: random horizontal flips.
        degradation: ``"realesrgan"`` or ``"bicubic"``, or a callable ``(hr (3, H, W), generator) ->
            lq (3, H/scale, W/scale)``.
        degradation_options: keyword options of the Real-ESRGAN pipeline.
        seed: the base seed of permutations, crops, flips and degradations.

    ``len(dataset)`` is the number of files; any index ``>= 0`` is valid (see the module docstring).
    """

    def __init__(
        self,
        sources,
        *,
        crop_size: int = 512,
        scale: int = 4,
        flip: bool = True,
        degradation: str | Callable = "realesrgan",
        degradation_options: dict | None = None,
        seed: int = 0,
    ):
        for name, value in (("crop_size", crop_size), ("scale", scale)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if crop_size % scale:
            raise ValueError(f"crop_size ({crop_size}) must be a multiple of scale ({scale})")
        if degradation_options and degradation != "realesrgan":
            raise ValueError("degradation_options only apply to degradation='realesrgan'")
        self.files = find_hr_images(sources)
        self.crop_size, self.scale, self.flip, self.seed = crop_size, scale, bool(flip), int(seed)
        if callable(degradation):
            self._degrade = degradation
        elif degradation == "bicubic":
            self._degrade = functools.partial(_bicubic_down, scale=scale)
        elif degradation == "realesrgan":
            self._degrade = _RealESRGAN(scale, dict(degradation_options or {}))
        else:
            raise ValueError(f"degradation must be one of {DEGRADATIONS} or a callable, got {degradation!r}")

    def __len__(self) -> int:
        return len(self.files)

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_perm_cache", {})
        if epoch not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[epoch] = np.random.default_rng(sample_seed(self.seed, 0x5EED, epoch)).permutation(len(self.files))
        return cache[epoch]

    def file_for(self, index: int, offset: int = 0) -> Path:
        """The file that global sample ``index`` reads (``offset`` steps further in its epoch's order)."""
        epoch, pos = divmod(int(index), len(self.files))
        return self.files[int(self._permutation(epoch)[(pos + offset) % len(self.files)])]

    def _crop(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.crop_size
        h, w = img.shape[-2:]
        if min(h, w) < c:
            f = c / min(h, w)
            size = (max(c, round(h * f)), max(c, round(w * f)))
            img = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
            h, w = size
        top = int(torch.randint(0, h - c + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - c + 1, (1,), generator=gen))
        img = img[:, top : top + c, left : left + c]
        if self.flip and bool(torch.rand((), generator=gen) < 0.5):
            img = img.flip(-1)
        return img.contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        gen = torch.Generator().manual_seed(sample_seed(self.seed, index))
        for offset in range(MAX_BAD_IN_A_ROW):
            path = self.file_for(index, offset)
            try:
                img = load_image(path)
                break
            except ImageReadError as e:
                warnings.warn(f"skipping unreadable training image: {e}", stacklevel=2)
        else:
            raise RuntimeError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row near sample {index}; check the data")
        hr = self._crop(img, gen)
        lq = self._degrade(hr, generator=gen)
        expected = (3, self.crop_size // self.scale, self.crop_size // self.scale)
        if tuple(lq.shape) != expected:
            raise RuntimeError(f"the degradation returned {tuple(lq.shape)}, expected {expected}")
        return lq.float().clamp(0, 1).contiguous(), hr


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches of global sample indices, laid out by micro-step and process.

    Micro-step ``m`` of process ``rank`` (of ``world_size``) gets indices
    ``(m * world_size + rank) * batch_size + j`` for ``j < batch_size``; iteration starts at
    ``start_micro_step`` (``optimizer_step * gradient_accumulation_steps`` when resuming), so a resumed
    run reads exactly the samples the uninterrupted run would have.
    """

    def __init__(self, batch_size: int, *, start_micro_step: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or start_micro_step < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size}, start={start_micro_step}, rank={rank}")
        self.batch_size, self.start, self.rank, self.world = batch_size, start_micro_step, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            first = (m * self.world + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            m += 1
