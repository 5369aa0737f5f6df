"""The training configuration: a JSON (or YAML, with PyYAML installed) file mapped onto dataclasses.

Every field is type-checked on load; unknown keys, missing required keys and bad values raise
``ValueError``/``TypeError`` naming the key (``data.crop_size``...). See :class:`TrainConfig` for the
fields and defaults, and ``mor-sr train --help`` for the command line overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DataConfig", "LPIPSConfig", "TrainConfig", "load_config", "apply_override", "missing_sources"]

LR_SCHEDULES = ("constant", "warmup", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
VAE_ADAPTERS = ("lora", "mor", "none")
KNOWN_LOSSES = ("l2", "lpips", "balance")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


_CHECKS = {
    "int": (_is_int, "an int"),
    "float": (_is_real, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "a mapping"),
}


def _check_type(where: str, value, annotation: str):
    """Checks ``value`` against a field annotation string (``"int"``, ``"str | None"``, ``"list[str]"``...)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise TypeError(f"{where} is required (got null)")
    if "list[str]" in kinds:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    for kind in kinds:
        check = _CHECKS.get(kind)
        if check and check[0](value):
            return float(value) if kind == "float" else value
    wanted = " or ".join(
        _CHECKS[k][1] if k in _CHECKS else ("null" if k == "None" else "a list of strings") for k in kinds
    )
    raise TypeError(f"{where} must be {wanted}, got {value!r}")


def _from_dict(cls, data, where: str):
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{where}{k}' for k in unknown]}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing required key {key!r}")
            continue
        value = data[name]
        nested = _NESTED.get(f.type)
        kwargs[name] = _from_dict(nested, value, key + ".") if nested else _check_type(key, value, f.type)
    return cls(**kwargs)


def _positive(where: str, value, *, zero: bool = False):
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{where} must be {'>= 0' if zero else '> 0'}, got {value}")


def _choice(where: str, value, choices):
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}")


@dataclass
class DataConfig:
    """``data``: where the HR images are and how the pairs are made (:class:`mor_model.train.data.SRDataset`)."""

    hr: list[str]  # folders (recursive), image files, list files (.txt/.list/.lst)
    crop_size: int = 512
    scale: int = 4
    flip: bool = True
    degradation: str = "realesrgan"  # "realesrgan" | "bicubic"
    degradation_options: dict = field(default_factory=dict)  # DegradationConfig fields
    num_workers: int = 4

    def __post_init__(self):
        if not self.hr:
            raise ValueError("data.hr must list at least one folder, image or list file")
        _positive("data.crop_size", self.crop_size)
        _positive("data.scale", self.scale)
        _positive("data.num_workers", self.num_workers, zero=True)
        if self.crop_size % self.scale:
            raise ValueError(f"data.crop_size ({self.crop_size}) must be a multiple of data.scale ({self.scale})")
        _choice("data.degradation", self.degradation, ("realesrgan", "bicubic"))


@dataclass
class LPIPSConfig:
    """``lpips``: the perceptual loss's network and its local weight files."""

    net: str = "vgg"  # "vgg" (OSEDiff) | "alex"
    backbone_weights: str | None = None  # torchvision vgg16/alexnet checkpoint (local file)
    linear_weights: str | None = None  # default: the LPIPS v0.1 weights shipped in the lpips package
    allow_missing: bool = False  # true: train without LPIPS (with a warning) when the weights are absent

    def __post_init__(self):
        _choice("lpips.net", self.net, ("vgg", "alex"))


@dataclass
class TrainConfig:
    """The whole training configuration (one JSON/YAML file; paths relative to the file's folder)."""

    model: str  # base model directory (diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    output_dir: str  # checkpoints/, final/, train_log.jsonl
    data: DataConfig
    adapter: str | None = None  # UNet MoR adapter to start from (default: model/mor_adapter, else fresh)
    mor: dict | None = None  # MoRConfig fields of a fresh UNet adapter (overrides model/mor_adapter)
    clip: str | None = None  # degradation CLIP directory (default: model/degradation_clip)
    vae_adapter: str = "lora"  # "lora": plain LoRA on the VAE encoder; "mor": model/vae_encoder_adapter; "none"
    vae_lora_rank: int = 4
    prompt: str = ""
    timestep: int = 999
    backend: str = "auto"  # mor_kernels backend of the adapters
    batch_size: int = 4  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 25000  # optimiser steps
    learning_rate: float = 5e-5
    lr_schedule: str = "constant"  # "constant" | "warmup" (linear warm-up, then constant) | "cosine"
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0  # null: no clipping
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    losses: dict = field(default_factory=lambda: {"l2": 1.0, "lpips": 2.0, "balance": 1.0})
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # 0: keep all
    log_every: int = 1
    layer_stats_every: int = 1  # per-layer active ranks in the log every N steps (0: never)
    resume: str | None = None  # null | "latest" | a checkpoint directory
    overwrite: bool = False  # start although output_dir holds another run (its conflicting files are deleted)
    cpu: bool = False  # train on the CPU even when a GPU is present

    def __post_init__(self):
        for name in ("vae_lora_rank", "batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every"):
            _positive(name, getattr(self, name))
        for name in ("warmup_steps", "keep_checkpoints", "log_every", "layer_stats_every", "seed"):
            _positive(name, getattr(self, name), zero=True)
        _positive("learning_rate", self.learning_rate)
        _positive("weight_decay", self.weight_decay, zero=True)
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        if not 0 <= self.timestep < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {self.timestep}")
        _choice("vae_adapter", self.vae_adapter, VAE_ADAPTERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("backend", self.backend, ("auto", "reference", "triton", "cuda", "cpp"))
        if self.lr_schedule == "warmup" and self.warmup_steps == 0:
            raise ValueError("lr_schedule 'warmup' needs warmup_steps > 0")
        if not self.losses:
            raise ValueError(f"losses must name at least one of {KNOWN_LOSSES} with its weight")
        for name, weight in self.losses.items():
            _choice("losses key", name, KNOWN_LOSSES)
            if not _is_real(weight) or weight < 0:
                raise ValueError(f"losses.{name} must be a number >= 0, got {weight!r}")
        self.losses = {k: float(v) for k, v in self.losses.items()}
        if self.mor is not None:
            from ..config import MoRConfig

            MoRConfig.from_dict({**self.mor, "backend": self.backend})  # validate now, with clear errors

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | os.PathLike | None = None) -> TrainConfig:
        """Validates ``data``; relative paths are resolved against ``base_dir`` (the config file's folder)."""
        cfg = _from_dict(cls, data, "")
        if base_dir is not None:
            cfg.resolve_paths(Path(base_dir))
        return cfg

    def resolve_paths(self, base: Path) -> None:
        def fix(p):
            return p if p is None else str(base / Path(p).expanduser())

        for name in ("model", "output_dir", "adapter", "clip"):
            setattr(self, name, fix(getattr(self, name)))
        if self.resume not in (None, "latest"):
            self.resume = fix(self.resume)
        self.data.hr = [fix(p) for p in self.data.hr]
        self.lpips.backbone_weights = fix(self.lpips.backbone_weights)
        self.lpips.linear_weights = fix(self.lpips.linear_weights)


_NESTED = {"DataConfig": DataConfig, "LPIPSConfig": LPIPSConfig}


def read_config_file(path: str | os.PathLike) -> dict:
    """The raw mapping of a ``.json``, ``.yaml`` or ``.yml`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml (or use JSON)") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Applies ``"a.b=value"`` to the raw mapping (``value`` parsed as JSON when it can be, else a string)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE (e.g. data.crop_size=256), got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike, overrides: dict | None = None, sets: list[str] | None = None) -> TrainConfig:
    """Reads, overrides (``{"max_steps": 10}`` and ``["data.crop_size=256"]``) and validates a config file."""
    data = read_config_file(path)
    for assignment in sets or []:
        apply_override(data, assignment)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    from ..sr.hub import resolve_config_sources

    resolve_config_sources(data, Path(path).resolve().parent)  # Hugging Face repo ids -> their cached folders
    return TrainConfig.from_dict(data, base_dir=Path(path).resolve().parent)


def missing_sources(cfg: TrainConfig) -> list[str]:
    """What the config reads that is not there (``mor-sr train`` and ``--check`` stop on these before any
    loading): the model folder, each ``data.hr`` source, and ``adapter``, ``clip`` and ``resume`` when set."""
    problems = []
    if not Path(cfg.model).is_dir():
        problems.append(f"model {cfg.model} is not a folder")
    problems += [f"data.hr source {src} does not exist" for src in cfg.data.hr if not Path(src).exists()]
    for key in ("adapter", "clip"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            problems.append(f"{key} {value} does not exist")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        problems.append(f"resume {cfg.resume} is not a folder")
    return problems
