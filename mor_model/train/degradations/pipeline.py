"""Real-ESRGAN second-order degradation model in plain torch (no basicsr), seeded and reproducible.

``degrade(hr, scale=4, config=DegradationConfig(), generator=g)`` turns a batch of clean images into
realistic low-quality inputs the way Real-ESRGAN (Wang et al. 2021, ``RealESRGANModel.feed_data``)
and the one-step SR systems trained with it (OSEDiff, S3Diff, ...) do:

1. blur with a random kernel (isotropic/anisotropic Gaussian, generalised Gaussian, plateau, or a
   2-D sinc with probability ``sinc_prob``), sampled per image;
2. random resize (up / down / keep, area / bilinear / bicubic), one choice per batch;
3. Gaussian or Poisson noise (one choice per batch; strength per image; grey with ``gray_noise_prob``
   per image);
4. JPEG compression with a random quality per image;
5. a second pass of 1-4 with its own probabilities and ranges (the blur only with
   ``second_blur_prob``; the resize is relative to the final size);
6. the final resize to ``HR / scale``, a sinc filter (with ``final_sinc_prob``, else identity) and
   JPEG, in one of the two orders (resize+sinc then JPEG, or JPEG then resize+sinc) with equal odds;
7. clamp to [0, 1] and round to 8-bit levels.

Defaults are those of Real-ESRGAN's ``train_realesrgan_x4plus.yml`` (see ``DegradationConfig``).
The kernel formulas follow BasicSR's ``degradations.py`` (re-implemented here); JPEG goes through
Pillow (libjpeg, 4:2:0 chroma subsampling like Real-ESRGAN's DiffJPEG) with an integer quality, on CPU.

Randomness: every random draw comes from the ``generator`` argument (a ``torch.Generator``), in a
fixed order, so the same seed gives the same LR on the same device and torch version. Scalars are
drawn on the generator's device; noise is drawn on the generator's device and moved to the images'
device (pass a CUDA generator for CUDA images to keep the noise on the GPU).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import DegradationConfig, _Rng
from .kernels import _final_sinc_kernel, random_blur_kernel

__all__ = ["add_gaussian_noise", "add_poisson_noise", "degrade", "filter2d", "jpeg_compress", "random_resize"]


# --------------------------------------------------------------------------------------------------
# operations on image batches (B, C, H, W) in [0, 1]


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel: img (B, C, H, W), kernels (B, k, k) or (k, k), k odd.

    Reflect padding (replicate when the image is too small to reflect), like BasicSR's ``filter2D``.
    """
    b, c, h, w = img.shape
    if kernels.dim() == 2:
        kernels = kernels.expand(b, -1, -1)
    k = kernels.shape[-1]
    if k % 2 == 0 or kernels.shape[0] != b or kernels.shape[-2] != k:
        raise ValueError(f"kernels must be (B={b}, k, k) or (k, k) with k odd, got {tuple(kernels.shape)}")
    # drop the all-zero border the kernels were padded with (sampled sizes are 7..21, the pulse is 1x1):
    # the result is the same, the depthwise convolution much cheaper
    nz = (kernels != 0).any(dim=0)
    if nz.any():
        rows, cols = nz.any(dim=1).nonzero(), nz.any(dim=0).nonzero()
        c0 = k // 2
        r = int(max(c0 - rows.min(), rows.max() - c0, c0 - cols.min(), cols.max() - c0))
        kernels = kernels[:, c0 - r : c0 + r + 1, c0 - r : c0 + r + 1]
        k = 2 * r + 1
    p = k // 2
    mode = "reflect" if p < h and p < w else "replicate"
    x = F.pad(img, (p, p, p, p), mode=mode)
    weight = kernels.to(img.dtype).to(img.device).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    # correlation (conv2d) with the kernel as in BasicSR; all our kernels are point-symmetric anyway
    out = F.conv2d(x.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c)
    return out.view(b, c, h, w)


def _interpolate(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(img, size=size, mode=mode, align_corners=False)
    return F.interpolate(img, size=size, mode=mode)


def random_resize(img: torch.Tensor, generator, prob, scale_range, base_size: tuple[int, int], modes) -> torch.Tensor:
    """Resize by a random factor (up / down / keep with ``prob``) relative to ``base_size``, random mode."""
    rng = _Rng.wrap(generator)
    kind = rng.choice(["up", "down", "keep"], list(prob))
    if kind == "up":
        s = rng.uniform(1.0, scale_range[1])
    elif kind == "down":
        s = rng.uniform(scale_range[0], 1.0)
    else:
        s = 1.0
    mode = rng.choice(list(modes))
    return _interpolate(img, (int(base_size[0] * s), int(base_size[1] * s)), mode)


def _noise_tensor(rng: _Rng, shape, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=rng.g, device=rng.device, dtype=torch.float32).to(device, dtype)


def add_gaussian_noise(img: torch.Tensor, generator, sigma_range, gray_prob: float) -> torch.Tensor:
    """Additive Gaussian noise, sigma (0-255 scale) and grey/colour drawn per image; clipped to [0, 1]."""
    rng = _Rng.wrap(generator)
    b = img.shape[0]
    sigma = torch.tensor(rng.uniform(*sigma_range, n=b), dtype=img.dtype, device=img.device).view(b, 1, 1, 1) / 255.0
    gray = torch.tensor([u < gray_prob for u in rng.uniform(0.0, 1.0, n=b)], dtype=img.dtype, device=img.device)
    gray = gray.view(b, 1, 1, 1)
    noise = _noise_tensor(rng, img.shape, img.device, img.dtype) * sigma
    if gray.any():  # like BasicSR, the grey noise is only drawn when some image uses it
        noise_gray = _noise_tensor(rng, (b, 1) + tuple(img.shape[2:]), img.device, img.dtype) * sigma
        noise = noise_gray * gray + noise * (1 - gray)
    return (img + noise).clamp(0, 1)


def _rgb_to_gray(img: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def _poisson_noise(img: torch.Tensor, rng: _Rng) -> torch.Tensor:
    # BasicSR generate_poisson_noise_pt: the photon count scale is the number of distinct 8-bit levels,
    # rounded up to a power of two, per image
    img = (img * 255.0).round().clamp(0, 255) / 255.0
    vals = torch.tensor(
        [2.0 ** math.ceil(math.log2(max(len(torch.unique(img[i])), 1))) for i in range(img.shape[0])],
        dtype=img.dtype,
        device=img.device,
    ).view(-1, 1, 1, 1)
    rate = (img * vals).to(rng.device, torch.float32)
    out = torch.poisson(rate, generator=rng.g).to(img.device, img.dtype) / vals
    return out - img


def add_poisson_noise(img: torch.Tensor, generator, scale_range, gray_prob: float) -> torch.Tensor:
    """Poisson (shot) noise scaled by a per-image factor, grey or colour per image; clipped to [0, 1]."""
    rng = _Rng.wrap(generator)
    b = img.shape[0]
    scale = torch.tensor(rng.uniform(*scale_range, n=b), dtype=img.dtype, device=img.device).view(b, 1, 1, 1)
    gray = torch.tensor([u < gray_prob for u in rng.uniform(0.0, 1.0, n=b)], dtype=img.dtype, device=img.device)
    gray = gray.view(b, 1, 1, 1)
    noise = _poisson_noise(img, rng)
    if gray.any():
        noise_gray = _poisson_noise(_rgb_to_gray(img), rng).expand_as(img)
        noise = noise_gray * gray + noise * (1 - gray)
    noise = noise * scale
    return (img + noise).clamp(0, 1)


def jpeg_compress(img: torch.Tensor, quality) -> torch.Tensor:
    """JPEG round trip through Pillow, per image: img (B, 3, H, W) in [0, 1], quality a number or one per image.

    Values are rounded to 8 bits before encoding; the result is on 8-bit levels, same dtype/device.
    """
    from PIL import Image

    b = img.shape[0]
    qs = [quality] * b if isinstance(quality, (int, float)) else list(quality)
    if len(qs) != b:
        raise ValueError(f"quality must be a number or have one entry per image ({b}), got {len(qs)}")
    arr = (img.detach().clamp(0, 1) * 255.0).round().to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(arr)
    for i in range(b):
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=int(round(qs[i])))
        buf.seek(0)
        with Image.open(buf) as dec:
            out[i] = np.asarray(dec.convert("RGB"))
    res = torch.from_numpy(out).permute(0, 3, 1, 2).to(img.device, img.dtype) / 255.0
    return res


def _random_noise(img, rng, cfg, second):
    if rng.uniform(0.0, 1.0) < (cfg.gaussian_noise_prob2 if second else cfg.gaussian_noise_prob):
        return add_gaussian_noise(
            img,
            rng,
            cfg.noise_range2 if second else cfg.noise_range,
            cfg.gray_noise_prob2 if second else cfg.gray_noise_prob,
        )
    return add_poisson_noise(
        img,
        rng,
        cfg.poisson_scale_range2 if second else cfg.poisson_scale_range,
        cfg.gray_noise_prob2 if second else cfg.gray_noise_prob,
    )


def _random_jpeg(img, rng, jpeg_range):
    qualities = rng.uniform(*jpeg_range, n=img.shape[0])
    return jpeg_compress(img.clamp(0, 1), qualities)


@torch.no_grad()
def degrade(
    hr: torch.Tensor,
    scale: int = 4,
    config: DegradationConfig | None = None,
    generator: torch.Generator | int | np.random.Generator | None = None,
) -> torch.Tensor:
    """Real-ESRGAN second-order degradation of a batch (see the module docstring for the steps).

    Args:
        hr: (B, 3, H, W) float images in [0, 1]; H and W multiples of ``scale``; not modified.
        scale: the downscaling factor of the result.
        config: probabilities and ranges (``DegradationConfig()``: Real-ESRGAN's defaults).
        generator: the source of all randomness: a ``torch.Generator`` (its state advances), an int
            seed, a ``numpy.random.Generator`` (one seed is drawn from it), or ``None`` (a fresh
            unseeded CPU generator: not reproducible).

    Returns:
        (B, 3, H / scale, W / scale) in [0, 1], on 8-bit levels, dtype and device of ``hr``.
    """
    if not isinstance(hr, torch.Tensor):
        raise TypeError(f"hr must be a torch.Tensor (B, 3, H, W), got {type(hr).__name__}")
    if hr.dim() != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr must have shape (B, 3, H, W), got {tuple(hr.shape)}")
    if not hr.is_floating_point():
        raise TypeError(f"hr must be a float tensor in [0, 1], got {hr.dtype}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"hr height and width must be multiples of scale={scale}, got {(h, w)}")
    cfg = config if config is not None else DegradationConfig()
    if not isinstance(cfg, DegradationConfig):
        raise TypeError(f"config must be a DegradationConfig or None, got {type(cfg).__name__}")
    rng = _Rng.wrap(generator)
    b = hr.shape[0]
    in_dtype = hr.dtype
    out = hr.to(torch.float32)

    # kernels are drawn per image, as the dataset does (first, second, final sinc for each sample)
    k1, k2, ks = [], [], []
    for _ in range(b):
        k1.append(random_blur_kernel(rng, cfg, second=False))
        k2.append(random_blur_kernel(rng, cfg, second=True))
        ks.append(_final_sinc_kernel(rng, cfg))
    k1, k2, ks = torch.stack(k1), torch.stack(k2), torch.stack(ks)

    # first stage
    out = filter2d(out, k1)
    out = random_resize(out, rng, cfg.resize_prob, cfg.resize_range, (h, w), cfg.resize_modes)
    out = _random_noise(out, rng, cfg, second=False)
    out = _random_jpeg(out, rng, cfg.jpeg_range)

    # second stage
    if rng.uniform(0.0, 1.0) < cfg.second_blur_prob:
        out = filter2d(out, k2)
    out = random_resize(out, rng, cfg.resize_prob2, cfg.resize_range2, (h // scale, w // scale), cfg.resize_modes)
    out = _random_noise(out, rng, cfg, second=True)

    # final resize + sinc and JPEG, in random order
    final_size = (h // scale, w // scale)
    if rng.uniform(0.0, 1.0) < 0.5:
        out = _interpolate(out, final_size, rng.choice(list(cfg.resize_modes)))
        out = filter2d(out, ks)
        out = _random_jpeg(out, rng, cfg.jpeg_range2)
    else:
        out = _random_jpeg(out, rng, cfg.jpeg_range2)
        out = _interpolate(out, final_size, rng.choice(list(cfg.resize_modes)))
        out = filter2d(out, ks)

    out = (out * 255.0).round().clamp(0, 255) / 255.0
    return out.to(in_dtype)
