"""Evaluation of super-resolved images: PSNR/SSIM as BasicSR computes them (:mod:`.metrics`) and the
folder-against-folder evaluation with optional pyiqa metrics (:mod:`.evaluate`)."""

from .evaluate import evaluate
from .metrics import psnr, ssim

__all__ = ["evaluate", "psnr", "ssim"]
