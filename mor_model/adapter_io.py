"""Adapter files: ``save_adapter`` / ``load_adapter`` (a directory with safetensors + a JSON config).

Layout of ``path``:

- ``mor_adapter.safetensors``: ``<layer>.lora_a``, ``<layer>.lora_b``, ``<layer>.router.*`` (float tensors);
- ``mor_adapter.json``: ``{"format", "version", "config" (MoRConfig.to_dict()), "targets"
  ({layer: {"type", "base_weight_shape"}}), "weights_sha256"}``; the last is the SHA-256 of the
  safetensors file, verified on load (files written before it existed load with a warning).

Only adapter and router tensors are stored; the base model comes from its own checkpoint. Both files
are written atomically (a temporary file, then a rename).

Loading checks everything before it changes the model: the JSON (an object with ``format``,
``version``, a complete ``config`` and ``targets``; each problem names the file and the key), the
safetensors header against the file's size (:mod:`mor_model.safetensors_header`; nothing is read or
allocated before), every tensor's name, dtype (floats only) and shape against what the config and
targets give, the checksum, and then the model's MoR layers against the file. A failed
``load_adapter`` leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic_write import atomic_path, write_text_atomic
from .config import MoRConfig
from .layers import MoRLayer, mor_layers
from .safetensors_header import FLOAT_DTYPES, HeaderError, read_header

FORMAT = "mor-sr-adapter"
VERSION = 1
WEIGHTS_NAME = "mor_adapter.safetensors"
CONFIG_NAME = "mor_adapter.json"
#: fields that choose how the adapter runs, not what it is; they may differ between save and load
RUNTIME_FIELDS = ("backend",)
#: config fields an adapter file must spell out (fields added later get their defaults)
REQUIRED_CONFIG_FIELDS = (
    "num_shared", "num_routed", "num_zero", "top_k", "alpha", "routing", "router_input", "target_modules",
    "balance_alpha", "num_degradation_dims", "renormalize",
)  # fmt: skip
TARGET_TYPES = {"MoRLinear": 2, "MoRConv2d": 4}  # layer type: dimensions of its base weight


class AdapterFileError(ValueError):
    """An adapter file is missing, damaged or inconsistent; the message names the file and the key."""


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
    path = Path(path)
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
        digest = _sha256(tmp.read_bytes())
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "targets": _targets(layers),
        "weights_sha256": digest,
    }
    write_text_atomic(path / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_adapter_config(path: str | os.PathLike) -> tuple[MoRConfig, dict]:
    """The :class:`MoRConfig` and the full JSON metadata of the adapter directory ``path``.

    Raises:
        FileNotFoundError: ``path`` lacks one of the two files.
        AdapterFileError: the JSON is not an object of this format and version, or a key is missing or
            bad (``config.top_k``, ``targets``...); the message names the file and the key.
    """
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a MoR adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")

    def bad(why: str) -> AdapterFileError:
        return AdapterFileError(f"{cfg_file}: {why}")

    try:
        meta = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise bad(f"must hold a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise bad(f"key 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise bad(f"key 'version' is {meta.get('version')!r}; this mor_model reads version {VERSION}")
    for key in ("config", "targets"):
        if key not in meta:
            raise bad(f"lacks the key {key!r}")
        if not isinstance(meta[key], dict):
            raise bad(f"key {key!r} must be an object, got {type(meta[key]).__name__}")
    missing = [k for k in REQUIRED_CONFIG_FIELDS if k not in meta["config"]]
    if missing:
        raise bad(f"'config' lacks {', '.join(repr(k) for k in missing)} (an adapter file spells out its whole config)")
    try:
        config = MoRConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise bad(f"key 'config': {e}") from None
    if not meta["targets"]:
        raise bad("key 'targets' lists no layers")
    for name, t in meta["targets"].items():
        shape = t.get("base_weight_shape") if isinstance(t, dict) else None
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in TARGET_TYPES:
            raise bad(f"targets[{name!r}].type must be one of {tuple(TARGET_TYPES)}, got {kind!r}")
        if (
            not isinstance(shape, list)
            or len(shape) != TARGET_TYPES[kind]
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise bad(f"targets[{name!r}].base_weight_shape must be {TARGET_TYPES[kind]} positive ints, got {shape!r}")
    digest = meta.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise bad(f"key 'weights_sha256' must be a hex SHA-256, got {digest!r}")
    return config, meta


def expected_tensors(config: MoRConfig, targets: dict) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` that an adapter with this config on these targets stores."""
    ranks, slots = config.num_ranks, config.num_slots
    out = {}
    for name, t in targets.items():
        w = t["base_weight_shape"]
        prefix = f"{name}." if name else ""
        out[prefix + "lora_a"] = (ranks, *w[1:])
        out[prefix + "lora_b"] = (w[0], ranks)
        if config.uses_degradation:
            out[prefix + "router.degradation.weight"] = (slots, config.num_degradation_dims)
            out[prefix + "router.degradation.bias"] = (slots,)
        if config.uses_token_input:
            out[prefix + "router.token.weight"] = (slots, w[1])
            out[prefix + "router.token.bias"] = (slots,)
    return out


def _check_weights_file(path: Path, config: MoRConfig, meta: dict) -> None:
    """The safetensors header against the file's size, the dtypes and the shapes the JSON gives (reads the
    header only, allocates nothing); :class:`AdapterFileError` naming both files and the key."""
    weights, cfg_file = path / WEIGHTS_NAME, path / CONFIG_NAME
    try:
        header, _ = read_header(weights)
    except HeaderError as e:
        raise AdapterFileError(str(e)) from None
    ints = [f"{n} ({i.dtype})" for n, i in header.items() if i.dtype not in FLOAT_DTYPES]
    if ints:
        raise AdapterFileError(f"{weights}: adapter tensors must be floats (F16/BF16/F32/F64), got {ints[:3]}")
    expected = expected_tensors(config, meta["targets"])
    a_name = next(n for n in expected if n.endswith("lora_a"))
    if a_name in header and header[a_name].shape[:1] != (config.num_ranks,):
        raise AdapterFileError(
            f"{cfg_file}: config.num_shared + config.num_routed = {config.num_ranks} ranks, but {weights} holds "
            f"{header[a_name].shape[0]} ({a_name!r} has shape {header[a_name].shape})"
        )
    router = next(
        (n for n in expected if n.endswith("router.degradation.weight") or n.endswith("router.token.weight")), None
    )
    if router in header and header[router].shape[:1] != (config.num_slots,):
        raise AdapterFileError(
            f"{cfg_file}: config.num_routed + config.num_zero = {config.num_slots} router slots, but {weights} "
            f"holds {header[router].shape[0]} ({router!r} has shape {header[router].shape})"
        )
    problems = [f"{n!r} is missing" for n in expected if n not in header]
    problems += [f"{n!r} belongs to no target of the JSON" for n in header if n not in expected]
    problems += [
        f"{n!r} has shape {header[n].shape}, the JSON's config and targets give {shape}"
        for n, shape in expected.items()
        if n in header and header[n].shape != shape
    ]
    if problems:
        raise AdapterFileError(
            f"{weights} does not match {cfg_file} ({len(problems)} problems): " + "; ".join(problems[:5])
        )


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The tensors, after the file's SHA-256 is checked against the JSON's ``weights_sha256``."""
    from safetensors.torch import load as load_bytes

    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    digest = meta.get("weights_sha256")
    if digest is None:
        warnings.warn(
            f"{path / CONFIG_NAME} has no weights_sha256 (written before adapter checksums): the tensors of "
            f"{weights} are not verified; save the adapter again with save_adapter to add one",
            stacklevel=3,
        )
    elif _sha256(data) != digest.lower():
        raise AdapterFileError(
            f"{weights} is damaged: its SHA-256 differs from weights_sha256 in {path / CONFIG_NAME} (a changed "
            "byte, or a weights file that belongs to another JSON)"
        )
    try:
        return load_bytes(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterFileError(f"{weights}: {type(e).__name__}: {e}") from None


def _differences(layers: dict[str, MoRLayer], config: MoRConfig, meta: dict) -> list[str]:
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
    if not problems:  # same targets and config: the parameter shapes are those of expected_tensors
        for name, layer in layers.items():
            prefix = f"{name}." if name else ""
            want = expected_tensors(config, {name: saved[name]})
            have = {prefix + n: tuple(p.shape) for n, p in layer.adapter_parameters().items()}
            if have != want:
                problems.append(f"layer {name!r}: model parameters {have} vs file {want}")
    return problems


def load_adapter(module: nn.Module, path: str | os.PathLike, *, backend: str | None = None):
    """Loads an adapter directory written by :func:`save_adapter` into ``module``.

    If ``module`` has no MoR layers yet, they are injected first with the saved config (``backend``
    overrides its backend); otherwise the model's config and MoR layers must match the file's.
    Everything is checked first (see the module docstring); a failure leaves ``module`` as it was
    (parameters, module types, ``requires_grad`` flags and backends).

    Returns:
        The :class:`~mor_model.inject.InjectionReport` when it injected, else None.

    Raises:
        FileNotFoundError: ``path`` is not an adapter directory.
        AdapterFileError: a damaged or inconsistent file (naming it and the key).
        ValueError: a bad ``backend``, or a model that does not match the file (every difference listed).
    """
    from .inject import inject_mor, remove_mor

    path = Path(path)
    config, meta = read_adapter_config(path)
    if backend is not None:
        config = MoRConfig.from_dict({**config.to_dict(), "backend": backend})  # a bad name fails here
    _check_weights_file(path, config, meta)
    tensors = _read_tensors(path, meta)
    layers = mor_layers(module)
    if layers:
        problems = _differences(layers, config, meta)
        if problems:
            raise ValueError(f"the adapter in {path} does not match this model:\n  - " + "\n  - ".join(problems))
        _apply(layers, tensors, path, backend)
        return None
    report = inject_mor(module, config)
    try:
        layers = mor_layers(module)
        problems = _differences(layers, config, meta)
        if problems:
            raise ValueError(f"the adapter in {path} does not match this model:\n  - " + "\n  - ".join(problems))
        _apply(layers, tensors, path, None)
    except BaseException:
        remove_mor(module)  # leave the model as it was given
        raise
    return report


def _apply(layers: dict[str, MoRLayer], tensors: dict[str, torch.Tensor], path: Path, backend: str | None) -> None:
    """Copies the checked tensors into the layers (and sets ``backend``); restores both on any failure."""
    params = {
        (f"{name}." if name else "") + pname: p
        for name, layer in layers.items()
        for pname, p in layer.adapter_parameters().items()
    }
    saved = {k: p.detach().clone() for k, p in params.items()}
    backends = {name: layer.config.backend for name, layer in layers.items()}
    cast = [
        f"{k} ({str(tensors[k].dtype).replace('torch.', '')})" for k, p in params.items() if tensors[k].dtype != p.dtype
    ]
    try:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        if backend is not None:
            for layer in layers.values():
                layer.set_backend(backend)
    except BaseException:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
        for name, layer in layers.items():
            layer.set_backend(backends[name])
        raise
    if cast:
        warnings.warn(
            f"load_adapter: {len(cast)} tensors of {path} were cast to the model's parameter dtype, so outputs "
            f"are not bitwise those of the saved model: {cast[:3]}",
            stacklevel=3,
        )
