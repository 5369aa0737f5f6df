"""Example inputs that work offline: photos that ship with scikit-image, cropped and degraded on the fly with
the Real-ESRGAN degradations of training (:func:`mor_model.train.degradations.degrade`) at three severities,
each with a fixed seed (the same examples every time)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SEVERITIES", "make_examples"]

#: photo name in skimage.data -> (top, left) of a 256 x 256 crop
PHOTOS = {"astronaut": (30, 150), "chelsea": (20, 120), "coffee": (60, 200)}
SEVERITIES = ("light", "medium", "heavy")


def _config(severity: str):
    from ..train.degradations import DegradationConfig

    if severity == "light":
        return DegradationConfig(
            blur_sigma=(0.2, 0.6), second_blur_prob=0.0, final_sinc_prob=0.0, resize_range=(0.9, 1.1),
            gaussian_noise_prob=1.0, noise_range=(1.0, 3.0), noise_range2=(1.0, 2.0), gray_noise_prob=0.0,
            gray_noise_prob2=0.0, jpeg_range=(90.0, 95.0), jpeg_range2=(90.0, 95.0), sinc_prob=0.0, sinc_prob2=0.0,
        )  # fmt: skip
    if severity == "heavy":
        return DegradationConfig(
            blur_sigma=(2.0, 3.0), second_blur_prob=1.0, blur_sigma2=(1.0, 1.5), gaussian_noise_prob=1.0,
            noise_range=(15.0, 30.0), gaussian_noise_prob2=1.0, noise_range2=(10.0, 25.0), jpeg_range=(30.0, 45.0),
            jpeg_range2=(30.0, 45.0),
        )  # fmt: skip
    return DegradationConfig()  # Real-ESRGAN's defaults


def make_examples(folder: str | os.PathLike, *, scale: int = 4, size: int = 256) -> dict[str, Path]:
    """Writes the examples as PNG files into ``folder``; returns ``{label: path}`` (empty without
    scikit-image, which holds the photos)."""
    try:
        import numpy as np
        from skimage import data
    except ImportError:
        return {}
    import torch

    from ..sr.image_io import save_image
    from ..train.degradations import degrade

    folder = Path(folder)
    examples = {}
    for name, (top, left) in PHOTOS.items():
        arr = np.asarray(getattr(data, name)())[top : top + size, left : left + size, :3]
        hr = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255
        for i, severity in enumerate(SEVERITIES):
            lq = degrade(hr, scale=scale, config=_config(severity), generator=1000 + i)
            examples[f"{name}, {severity} degradation"] = save_image(lq[0], folder / f"{name}_{severity}.png")
    return examples
