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

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "DataConfig",
    "GANConfig",
    "LPIPSConfig",
    "TrainConfig",
    "VSDConfig",
    "apply_override",
    "load_config",
    "missing_sources",
]

LR_SCHEDULES = ("constant", "warmup", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
VAE_ADAPTERS = ("lora", "mor", "none")
KNOWN_LOSSES = ("l2", "lpips", "balance", "vsd", "gan")
#: the weight of a loss selected by name (``losses: "l2,lpips,vsd,gan,balance"``): OSEDiff's L2 1, LPIPS 2 and
#: VSD 1; the balance loss 1 (MOR_SPEC section 5); GAN 0.5 (S3Diff's and pix2pix-turbo's lambda_gan, see README)
DEFAULT_LOSS_WEIGHTS = {"l2": 1.0, "lpips": 2.0, "balance": 1.0, "vsd": 1.0, "gan": 0.5}
GAN_LOSSES = ("non_saturating", "hinge")
#: OSEDiff's training negative prompt (its train_osediff.py --neg_prompt default), for the VSD guidance
OSEDIFF_NEGATIVE_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, "
    "blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, "
    "lowres, over-smooth"
)


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


def _timestep_range(section: str, t_min: int, t_max: int) -> None:
    if not 0 <= t_min < 1000:
        raise ValueError(f"{section}.t_min must be in [0, 1000), got {t_min}")
    if not 0 < t_max <= 1000:
        raise ValueError(f"{section}.t_max must be in (0, 1000], got {t_max}")
    if t_min >= t_max:
        raise ValueError(
            f"{section}.t_min ({t_min}) must be < {section}.t_max ({t_max}): t is drawn from [t_min, t_max)"
        )


@dataclass
class VSDConfig:
    """``vsd``: variational score distillation as in OSEDiff (used when ``losses`` has ``vsd``).

    The generated latent is noised at ``t`` drawn uniformly from ``[t_min, t_max)`` (OSEDiff's
    ``torch.randint(20, 980)``); the pretrained score is the frozen UNet with every adapter off and
    classifier-free guidance ``guidance_scale`` against ``negative_prompt``; the fake score is the frozen
    UNet plus its own LoRA (rank ``lora_rank``, scaling ``lora_alpha / lora_rank``), trained with the
    diffusion loss at its own ``learning_rate`` (null: ``learning_rate``)."""

    t_min: int = 20
    t_max: int = 980
    guidance_scale: float = 7.5
    negative_prompt: str = OSEDIFF_NEGATIVE_PROMPT
    lora_rank: int = 4
    lora_alpha: float = 8.0  # PEFT's LoraConfig default, which OSEDiff's rank-4 LoRA runs with (scaling 2)
    learning_rate: float | None = None

    def __post_init__(self):
        _timestep_range("vsd", self.t_min, self.t_max)
        _positive("vsd.guidance_scale", self.guidance_scale, zero=True)
        _positive("vsd.lora_rank", self.lora_rank)
        _positive("vsd.lora_alpha", self.lora_alpha)
        if self.learning_rate is not None:
            _positive("vsd.learning_rate", self.learning_rate)


@dataclass
class GANConfig:
    """``gan``: the discriminator on frozen UNet features (used when ``losses`` has ``gan``).

    Features of the UNet's down blocks and mid block (the frozen weights, every adapter off) at a
    timestep drawn from ``[t_min, t_max)``, one small trainable head per scale (``head_channels`` wide);
    ``loss``: ``"non_saturating"`` (softplus) or ``"hinge"``; the heads' ``learning_rate`` (null:
    ``learning_rate``)."""

    loss: str = "non_saturating"
    t_min: int = 20
    t_max: int = 980
    head_channels: int = 128
    learning_rate: float | None = None

    def __post_init__(self):
        _choice("gan.loss", self.loss, GAN_LOSSES)
        _timestep_range("gan", self.t_min, self.t_max)
        _positive("gan.head_channels", self.head_channels)
        if self.learning_rate is not None:
            _positive("gan.learning_rate", self.learning_rate)


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
    # {name: weight}, or names with their default weights: "l2,lpips,vsd,gan,balance" (DEFAULT_LOSS_WEIGHTS)
    losses: dict | list[str] = field(default_factory=lambda: {"l2": 1.0, "lpips": 2.0, "balance": 1.0})
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)
    gan: GANConfig = field(default_factory=GANConfig)
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
        if isinstance(self.losses, list):
            self.losses = _losses_by_name(self.losses)
        if not self.losses:
            raise ValueError(f"losses must name at least one of {KNOWN_LOSSES} with its weight")
        for name, weight in self.losses.items():
            _choice("losses key", name, KNOWN_LOSSES)
            if not _is_real(weight) or weight < 0:
                raise ValueError(f"losses.{name} must be a number >= 0, got {weight!r}")
        self.losses = {k: float(v) for k, v in self.losses.items()}
        two_phase = self.losses.get("vsd", 0) > 0 or self.losses.get("gan", 0) > 0
        if self.mixed_precision == "fp16" and self.gradient_accumulation_steps > 1 and two_phase:
            # the three optimisers share accelerate's loss scale, updated at each optimiser step: inside an
            # accumulation window the fake-score and discriminator gradients would mix two scales
            raise ValueError(
                "mixed_precision 'fp16' with gradient_accumulation_steps > 1 is not supported with the vsd/gan "
                "losses (their optimisers share one loss scale): use mixed_precision 'bf16', or no accumulation"
            )
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


def _losses_by_name(names: list[str]) -> dict[str, float]:
    """``["l2,lpips", "vsd"]`` -> ``{"l2": 1.0, "lpips": 2.0, "vsd": 1.0}`` (the default weights)."""
    out: dict[str, float] = {}
    for name in (n.strip() for item in names for n in item.split(",")):
        if not name:
            continue
        _choice("losses key", name, KNOWN_LOSSES)
        if name in out:
            raise ValueError(f"losses names {name!r} twice")
        out[name] = DEFAULT_LOSS_WEIGHTS[name]
    return out


_NESTED = {"DataConfig": DataConfig, "LPIPSConfig": LPIPSConfig, "VSDConfig": VSDConfig, "GANConfig": GANConfig}


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
