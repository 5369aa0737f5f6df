"""The model directory of the SR application and how its parts are loaded: default places of the
adapters and the degradation CLIP inside a diffusers-layout directory, dtype names, device checks, and
the cast that keeps the MoR routers in float32 (used by :class:`mor_model.sr.pipeline.MoRSRPipeline`, the
trainer and :func:`mor_model.testing.tiny_model`; importing it loads no diffusers)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..layers import mor_layers

__all__ = ["ADAPTER_DIR", "CLIP_DIR", "VAE_ADAPTER_DIR", "resolve_dtype"]

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


def _load_estimator(clip, device: torch.device):
    from ..estimator import CONFIG_NAME, DegradationEstimator

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


def _resolve_adapter_path(path) -> Path:
    """An adapter directory, or a file inside one (``.../mor_adapter/mor_adapter.safetensors``) -> the directory."""
    path = Path(path)
    return path.parent if path.is_file() else path


def _cast_keeping_routers_fp32(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)`` except the MoR routers' tensors, which stay float32 (the routing maths is
    float32; rounding the router weights to fp16/bf16 could change which ranks are picked)."""
    routers = [layer.router for layer in mor_layers(module).values()]
    saved = [{k: v.detach().clone() for k, v in r.state_dict().items()} for r in routers]
    # nn.Module.to: diffusers' override warns about fp32-kept modules on every dtype cast, even when there
    # are none (diffusers 0.42); these models have none
    nn.Module.to(module, device=device, dtype=dtype)
    for r, state in zip(routers, saved, strict=True):
        nn.Module.to(r, dtype=torch.float32)
        r.load_state_dict(state)  # the exact float32 values, not the rounded ones cast back


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here (use 'cpu')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist ({torch.cuda.device_count()} CUDA devices)")


def _needs_scores(module: nn.Module) -> bool:
    """True when a MoR layer under ``module`` routes on the degradation vector."""
    return any(layer.config.uses_degradation for layer in mor_layers(module).values())
