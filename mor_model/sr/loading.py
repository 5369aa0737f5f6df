"""The model directory of the SR application and how its parts are loaded: default places of the
adapters and the degradation CLIP inside a diffusers-layout directory, dtype names, device checks, and
the cast that keeps the MoR routers in float32 (used by :class:`mor_model.sr.pipeline.MoRSRPipeline`, the
trainer and :func:`mor_model.testing.tiny_model`; importing it loads no diffusers). Each place also takes a
Hugging Face repo id (:func:`mor_model.sr.hub.resolve_source`), and the CLIP an open_clip ``MODEL:TAG``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..layers import mor_layers
from .hub import resolve_source

__all__ = ["ADAPTER_DIR", "CLIP_DIR", "VAE_ADAPTER_DIR", "open_clip_name", "resolve_dtype", "resolve_model_dir"]

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


def open_clip_name(clip) -> tuple[str, str] | None:
    """``(model, tag)`` when ``clip`` is an open_clip ``"MODEL:TAG"`` (``"ViT-L-14-quickgelu:openai"``; the tag
    may be a weights file) and no file of that name exists; otherwise None (a path or a repo id)."""
    if not isinstance(clip, str) or ":" not in clip or Path(clip).exists() or clip.startswith("hf-hub:"):
        return None
    name, _, tag = clip.partition(":")
    return (name, tag) if name and tag and "/" not in name else None


def _open_clip_pretrained(name: str, tag: str):
    import open_clip

    from ..estimator import DegradationEstimator

    if name not in open_clip.list_models():
        raise ValueError(f"--clip {name}:{tag}: {name!r} is not an open_clip architecture (open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags and not Path(tag).is_file():
        raise ValueError(f"--clip {name}:{tag}: open_clip knows no pretrained tag {tag!r} for {name}; known: {tags}")
    try:
        return DegradationEstimator.from_pretrained(name, tag)
    except Exception as e:  # noqa: BLE001 - offline, no network, a broken cache: one clear message
        raise FileNotFoundError(
            f"open_clip weights {name}:{tag} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "open_clip keeps them in the Hugging Face cache: with HF_HUB_OFFLINE=1 they must be there already"
        ) from None


def _load_estimator(clip, device: torch.device):
    from ..estimator import CONFIG_NAME, DegradationEstimator

    if isinstance(clip, DegradationEstimator):
        return clip.to(device)
    named = open_clip_name(clip)
    if named is not None:
        return _open_clip_pretrained(*named).to(device)
    path = resolve_source(clip, kind="clip")
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


def _resolve_adapter_path(path, kind: str = "adapter") -> Path:
    """An adapter directory, a file inside one (``.../mor_adapter/mor_adapter.safetensors``) or a Hugging Face
    repo id (``kind`` "adapter" or "vae_adapter" picks the repo's folder) -> the directory."""
    path = resolve_source(path, kind=kind)
    return path.parent if path.is_file() else path


def resolve_model_dir(model_dir, revision: str | None = None) -> Path:
    """A model directory, or the cached snapshot of a Hugging Face repo id at ``revision``."""
    return resolve_source(model_dir, kind="model", revision=revision)


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
