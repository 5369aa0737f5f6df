"""Model sources the way diffusers users pass them: a local path, or a Hugging Face repo id.

:func:`resolve_source` is the one place where a ``--model``/``--adapter``/``--vae-adapter``/``--clip``
value, a ``MoRSRPipeline.from_pretrained`` argument or a training config's ``"model"``/``"adapter"``/
``"clip"`` becomes a local folder:

- a path that exists is used as it is, always: a local folder ``org/tiny-mor`` wins over the repo id
  of the same spelling;
- otherwise a repo id (``org/name``, optionally ``org/name@REVISION``; or the ``revision=`` argument)
  is looked up in huggingface_hub's cache (``HF_HUB_CACHE``, or ``HF_HOME/hub``, read when called)
  and downloaded there once where the network allows (only the files the pipeline reads: the
  diffusers components, safetensors over ``.bin`` where a folder has both, no fp16 variants, no
  single-file checkpoints). With ``HF_HUB_OFFLINE=1`` nothing is downloaded: an id that is not in the
  cache is a ``FileNotFoundError`` that says so.

Repository layouts: a model repo is a model directory (``unet/ vae/ text_encoder/ tokenizer/
scheduler/`` and optionally ``mor_adapter/``, ``vae_encoder_adapter/``, ``degradation_clip/``); an
adapter or CLIP repo holds what :func:`mor_model.save_adapter` or
:meth:`mor_model.estimator.DegradationEstimator.save_local` wrote, at its root or in the folder of
that default name (so ``--adapter ORG/MODEL`` finds ``ORG/MODEL``'s ``mor_adapter/``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["KINDS", "is_repo_id", "resolve_source"]

#: diffusers components every model directory has
MODEL_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: kind -> (the default sub-folder in a model repo, the file that marks the folder)
KINDS = {
    "model": (None, "unet"),
    "adapter": ("mor_adapter", "mor_adapter.json"),
    "vae_adapter": ("vae_encoder_adapter", "mor_adapter.json"),
    "clip": ("degradation_clip", "open_clip_config.json"),
}
_WHAT = {"model": "model", "adapter": "MoR adapter", "vae_adapter": "VAE-encoder adapter", "clip": "degradation CLIP"}
_SKIPPED = ["*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.pb", "*.tflite", "*fp16*", "*non_ema*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[\w.\-]{1,96})?$")


def is_repo_id(text: str) -> bool:
    """True when ``text`` (without an ``@REVISION`` part) is spelled like a Hugging Face repo id:
    ``name`` or ``org/name``, letters, digits, ``-``, ``_`` and ``.``, no ``--`` or ``..``."""
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith(".")


def _cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment at call time (its constants are read once, at
    import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(str(f).upper() in ("1", "ON", "YES", "TRUE") for f in flags if f) or bool(constants.HF_HUB_OFFLINE)


def download_patterns(kind: str, files: list[str] | None = None) -> tuple[list[str], list[str]]:
    """``(allow_patterns, ignore_patterns)`` of a download of ``kind``; with the repo's ``files`` a folder
    that has ``.safetensors`` weights skips its ``.bin``/``.pt`` copies (diffusers loads the safetensors)."""
    folder, marker = KINDS[kind]
    if kind == "model":
        parts = MODEL_PARTS + tuple(KINDS[k][0] for k in ("adapter", "vae_adapter", "clip"))
        allow = ["model_index.json"] + [f"{p}/*" for p in parts]
    else:
        stem = marker.split(".")[0]
        allow = [f"{stem}.*", f"{folder}/*"] + (["open_clip_*"] if kind == "clip" else [])
    ignore = list(_SKIPPED)
    for name in files or []:
        parent = name.rsplit("/", 1)[0] if "/" in name else ""
        if name.endswith(".safetensors") and not any(Path(name).match(p) for p in _SKIPPED):
            for ext in ("bin", "pt", "pth"):
                pattern = f"{parent}/*.{ext}" if parent else f"*.{ext}"
                if pattern not in ignore:
                    ignore.append(pattern)
    return allow, ignore


def _pick_folder(root: Path, kind: str, source: str) -> Path:
    """The folder of ``kind`` in a downloaded repo: the root when it holds the marker file, else the default
    sub-folder."""
    folder, marker = KINDS[kind]
    if (root / marker).exists():
        return root
    if folder is not None and (root / folder / marker).exists():
        return root / folder
    where = f"{marker}" if folder is None else f"{marker} at its root or in {folder}/"
    raise FileNotFoundError(f"the Hugging Face repo {source} (snapshot {root}) has no {where}")


def resolve_source(source: str | os.PathLike, *, kind: str = "model", revision: str | None = None) -> Path:
    """A local path, or the local folder of a Hugging Face repo id (see the module docstring).

    Args:
        source: a path (returned as it is when it exists, file or folder), or ``org/name[@REVISION]``.
        kind: ``"model"``, ``"adapter"``, ``"vae_adapter"`` or ``"clip"``: which files are downloaded and
            which folder of the repo is returned.
        revision: branch, tag or commit of a repo id (``@REVISION`` in ``source`` also sets it).

    Raises:
        FileNotFoundError: the path does not exist and is not a repo id, or the id is not in the cache
            and cannot be downloaded (offline, no network, unknown repo), naming the cache folder.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = os.fspath(source)
    repo_id, _, at_revision = text.partition("@")
    if at_revision and revision and at_revision != revision:
        raise ValueError(f"{text!r} names revision {at_revision!r} but revision={revision!r} was given too")
    revision = revision or at_revision or None
    if not is_repo_id(repo_id):
        raise FileNotFoundError(
            f"{_WHAT[kind]} {text} does not exist (and it is not spelled like a Hugging Face repo id, org/name)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{_WHAT[kind]} {text} is not a local path; loading it as a Hugging Face repo id needs huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None

    cache, offline = _cache_dir(), _offline()
    rev = f" at revision {revision}" if revision else ""
    files = None
    if not offline:
        try:
            from huggingface_hub import HfApi

            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:  # noqa: BLE001 - no network, unknown repo: snapshot_download below says which
            files = None
    allow, ignore = download_patterns(kind, files)
    try:
        root = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=offline,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except Exception as e:  # noqa: BLE001 - every failure of the hub client becomes one clear message
        if offline:
            why = "HF_HUB_OFFLINE=1 forbids downloading it (run once with network access to cache it)"
        else:
            why = f"downloading it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise FileNotFoundError(
            f"{_WHAT[kind]} {text} is not a local path, and the Hugging Face repo {repo_id}{rev} is not in the cache "
            f"{cache}: {why}"
        ) from None
    return _pick_folder(Path(root), kind, f"{repo_id}{rev}")


def resolve_config_sources(data: dict, base_dir: str | os.PathLike) -> dict:
    """The training config's ``"model"``, ``"adapter"`` and ``"clip"``: a value that is no path relative to
    ``base_dir`` (the config file's folder) but a repo id is replaced by its local folder
    (:func:`resolve_source`); ``data`` is changed in place and returned."""
    for key in ("model", "adapter", "clip"):
        value = data.get(key)
        if isinstance(value, str) and not (Path(base_dir) / Path(value).expanduser()).exists():
            if is_repo_id(value.partition("@")[0]):
                data[key] = str(resolve_source(value, kind=key))
    return data
