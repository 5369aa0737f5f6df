"""Adapter files: ``save_adapter`` / ``load_adapter`` (a directory with safetensors + a JSON config).

Layout of ``path``:

- ``mor_adapter.safetensors``: ``<layer>.lora_a``, ``<layer>.lora_b``, ``<layer>.router.*``;
- ``mor_adapter.json``: ``{"format", "version", "config" (MoRConfig.to_dict()), "targets"
  ({layer: {"type", "base_weight_shape"}})}``.

Only adapter and router tensors are stored; the base model comes from its own checkpoint.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import MoRConfig
from .layers import MoRLayer, mor_layers

FORMAT = "mor-sr-adapter"
VERSION = 1
WEIGHTS_NAME = "mor_adapter.safetensors"
CONFIG_NAME = "mor_adapter.json"
#: fields that choose how the adapter runs, not what it is; they may differ between save and load
RUNTIME_FIELDS = ("backend",)


def _shared_config(layers: dict[str, MoRLayer]) -> MoRConfig:
    configs = {json.dumps(m.config.to_dict(), sort_keys=True) for m in layers.values()}
    if len(configs) != 1:
        raise ValueError(
            "the MoR layers under this module use different configs; save each submodule (e.g. the UNet and the "
            "VAE encoder) with its own save_adapter call"
        )
    return next(iter(layers.values())).config


def _targets(layers: dict[str, MoRLayer]) -> dict[str, dict]:
    return {
        name: {"type": type(m).__name__, "base_weight_shape": list(m.base_layer.weight.shape)}
        for name, m in layers.items()
    }


def save_adapter(module: nn.Module, path: str | os.PathLike) -> Path:
    """Writes the MoR adapters of ``module`` (all sharing one config) to the directory ``path``."""
    from safetensors.torch import save_file

    layers = mor_layers(module)
    if not layers:
        raise ValueError("no MoR layers under this module: nothing to save (call inject_mor first)")
    config = _shared_config(layers)
    tensors = {}
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        for pname, p in layer.adapter_parameters().items():
            tensors[prefix + pname] = p.detach().contiguous().cpu()
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "targets": _targets(layers)}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT, "version": str(VERSION)})
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[MoRConfig, dict]:
    """The :class:`MoRConfig` and the full JSON metadata of the adapter directory ``path``."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a MoR adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{cfg_file} has version {meta.get('version')!r}; this mor_model reads version {VERSION}")
    return MoRConfig.from_dict(meta["config"]), meta


def _differences(layers: dict[str, MoRLayer], config: MoRConfig, meta: dict, tensors: dict) -> list[str]:
    problems = []
    for layer in layers.values():
        diff = {k: v for k, v in layer.config.diff(config).items() if k not in RUNTIME_FIELDS}
        if diff:
            text = ", ".join(f"{k}: model {a!r} vs file {b!r}" for k, (a, b) in diff.items())
            problems.append(f"config differs ({text})")
            break
    saved, present = meta["targets"], _targets(layers)
    missing = sorted(set(saved) - set(present))
    extra = sorted(set(present) - set(saved))
    if missing:
        problems.append(f"{len(missing)} target layers of the file are not MoR layers of the model: {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} MoR layers of the model are not in the file: {extra[:5]}")
    for name in sorted(set(saved) & set(present)):
        if saved[name] != present[name]:
            problems.append(f"layer {name!r}: file {saved[name]} vs model {present[name]}")
    if not problems:
        expected = set()
        for name, layer in layers.items():
            prefix = f"{name}." if name else ""
            for pname, p in layer.adapter_parameters().items():
                expected.add(prefix + pname)
                t = tensors.get(prefix + pname)
                if t is None:
                    problems.append(f"tensor {prefix + pname!r} is missing from the file")
                elif t.shape != p.shape:
                    problems.append(f"tensor {prefix + pname!r}: file {tuple(t.shape)} vs model {tuple(p.shape)}")
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            problems.append(
                f"{len(unexpected)} tensors of the file belong to no MoR layer of the model: {unexpected[:5]}"
            )
    return problems


def load_adapter(module: nn.Module, path: str | os.PathLike, *, backend: str | None = None):
    """Loads an adapter directory written by :func:`save_adapter` into ``module``.

    If ``module`` has no MoR layers yet, they are injected first with the saved config (``backend``
    overrides its backend); otherwise the model's config and MoR layers must match the file's.

    Returns:
        The :class:`~mor_model.inject.InjectionReport` when it injected, else None.

    Raises:
        ValueError: listing every difference (config fields, missing/extra layers, shapes).
    """
    from safetensors.torch import load_file

    from .inject import inject_mor

    config, meta = read_adapter_config(path)
    if backend is not None:
        config = MoRConfig.from_dict({**config.to_dict(), "backend": backend})
    report = None
    if not mor_layers(module):
        report = inject_mor(module, config)
    elif backend is not None:
        for layer in mor_layers(module).values():
            layer.set_backend(backend)
    layers = mor_layers(module)
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    problems = _differences(layers, config, meta, tensors)
    if problems:
        if report is not None:  # leave the model as it was given
            from .inject import remove_mor

            remove_mor(module)
        raise ValueError(f"the adapter in {path} does not match this model:\n  - " + "\n  - ".join(problems))
    cast = []
    with torch.no_grad():
        for name, layer in layers.items():
            prefix = f"{name}." if name else ""
            for pname, p in layer.adapter_parameters().items():
                t = tensors[prefix + pname]
                if t.dtype != p.dtype:
                    cast.append(f"{prefix + pname} ({str(t.dtype).replace('torch.', '')})")
                p.copy_(t)
    if cast:
        warnings.warn(
            f"load_adapter: {len(cast)} tensors of {path} were cast to the model's parameter dtype, so outputs "
            f"are not bitwise those of the saved model: {cast[:3]}",
            stacklevel=2,
        )
    return report
