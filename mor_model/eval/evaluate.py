"""``mor-sr eval``: full-reference and no-reference metrics of SR outputs against ground truth.

Pairs: every image of ``pred_dir`` is matched with the ground-truth image of ``gt_dir`` that has the
same stem (after removing ``suffix`` from the prediction's stem, e.g. ``"_out"``); any extension.
Unmatched files are reported. PSNR and SSIM (:mod:`mor_model.eval.metrics`) are computed on the BT.601
Y channel with a border crop of ``crop_border`` pixels (the scale factor, 4 by default), as in the SR
literature. Other metric names are pyiqa metrics (``lpips`` = AlexNet LPIPS, ``lpips-vgg``, ``dists``,
``musiq``, ``maniqa`` (KonIQ) vs ``maniqa-pipal`` (the OSEDiff tables), ``clipiqa``...): they run
only when pyiqa is installed AND its weights are already on disk: while they are created and run,
every download path is blocked (:func:`no_downloads`), so a missing weight file makes the metric
"unavailable" with the reason and the other metrics still run; so does a metric that fails on an image.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "BUILTIN_METRICS",
    "PYIQA_METRICS",
    "EvalResult",
    "MetricUnavailable",
    "evaluate",
    "format_summary",
    "no_downloads",
    "write_csv",
]

BUILTIN_METRICS = ("psnr", "ssim")
#: pyiqa metric names this tool documents; with pyiqa installed, ``pyiqa.list_models()`` is the full list
PYIQA_METRICS = (
    "lpips", "lpips-vgg", "dists", "musiq", "musiq-koniq", "musiq-spaq", "maniqa", "maniqa-kadid", "maniqa-pipal",
    "clipiqa", "clipiqa+", "niqe", "brisque", "nima", "topiq_fr", "topiq_nr", "pieapp", "ahiq", "dbcnn", "hyperiqa",
    "paq2piq", "cnniqa", "ckdn", "ms_ssim", "fsim", "vif", "gmsd", "nlpd", "vsi", "mad", "liqe", "arniqa",
)  # fmt: skip


def check_metric_names(metrics) -> list[str]:
    """The metric names, normalised; ``ValueError`` ("unknown metric ...", listing the known names) for a
    name that is neither built in nor a pyiqa metric (pyiqa's own list when it is installed)."""
    names = [m.strip().lower() for m in metrics if m.strip()]
    if not names:
        raise ValueError("metrics must name at least one metric")
    try:
        import pyiqa

        pyiqa_names, where = sorted(pyiqa.list_models()), "pyiqa"
    except Exception:  # noqa: BLE001 - absent or broken pyiqa: the documented names
        pyiqa_names, where = list(PYIQA_METRICS), "pyiqa, not installed"
    unknown = [m for m in names if m not in BUILTIN_METRICS and m not in pyiqa_names]
    if unknown:
        shown = ", ".join(pyiqa_names[:40]) + (f" ... ({len(pyiqa_names)} in all)" if len(pyiqa_names) > 40 else "")
        raise ValueError(
            f"unknown metric {', '.join(map(repr, unknown))}; known: {', '.join(BUILTIN_METRICS)} (built in); "
            f"{shown} ({where})"
        )
    return names


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (package or weights missing); the message says why."""


@dataclass
class EvalResult:
    """Per-image ``rows`` (``{"name", "pred", "gt", metric: value}``), per-metric ``summary`` means,
    ``unavailable`` ``{metric: reason}``, ``errors`` ``[(path, reason)]`` (unmatched, unreadable, too small
    for the border crop) and ``infinite`` ``{metric: [names]}``: pairs whose value is infinite (identical
    images give PSNR inf), reported apart and left out of the mean, which is over the finite values."""

    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    infinite: dict[str, list[str]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)


def _blocked(what: str) -> MetricUnavailable:
    return MetricUnavailable(
        f"its weights are not on disk (downloads are blocked; it would fetch {what}); put them in pyiqa's cache"
    )


def _refuse_url(url, *args, **kwargs):
    raise _blocked(getattr(url, "full_url", url))


def _guarded_connect(original):
    def connect(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise _blocked(f"data from {address}")
        return original(self, address, *args, **kwargs)

    return connect


@contextlib.contextmanager
def no_downloads():
    """Blocks every way of fetching weights while pyiqa metrics are created and run (weights must be local).

    - ``torch.hub.download_url_to_file``: used by ``torch.hub.load_state_dict_from_url``, hence by
      torchvision's ``weights=...`` backbones (LPIPS, DISTS) and pyiqa's ``load_file_from_url``; the
      copies of it (and of ``urlopen``/``urlretrieve``) imported into loaded ``pyiqa`` modules too;
    - ``urllib.request.urlopen``/``urlretrieve`` (pyiqa's CLIP download, ``pyiqa.archs.clip_model``);
    - Hugging Face: ``huggingface_hub.constants.HF_HUB_OFFLINE`` (read once at import, so setting the
      environment variable later does nothing; the variables are set as well, for modules imported
      inside the block), so hub look-ups answer from the local cache only;
    - the catch-all: connecting a socket to a network address (IPv4/IPv6) fails, so any other
      downloader (requests, httpx, a library's own code) cannot reach the network either.

    Each refusal raises :class:`MetricUnavailable` naming what would have been fetched. Everything is
    restored on exit. The socket guard holds for the whole process while the block runs (``mor-sr
    eval`` uses no network otherwise).
    """
    import importlib
    import urllib.request

    import torch.hub

    patches: list[tuple[object, str, bool, object]] = []

    def patch(obj, name, value):
        patches.append((obj, name, name in vars(obj), getattr(obj, name)))
        setattr(obj, name, value)

    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        patch(torch.hub, "download_url_to_file", _refuse_url)
        patch(urllib.request, "urlopen", _refuse_url)
        patch(urllib.request, "urlretrieve", _refuse_url)
        for name in ("connect", "connect_ex"):
            patch(socket.socket, name, _guarded_connect(getattr(socket.socket, name)))
        # pyiqa's modules that hold their own references to download functions (imported now, under the guard)
        for mod_name in ("pyiqa.utils.download_util", "pyiqa.archs.arch_util", "pyiqa.archs.clip_model"):
            try:
                importlib.import_module(mod_name)
            except Exception:  # noqa: BLE001, S112 - absent or broken pyiqa parts have nothing to patch
                continue
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name == "pyiqa" or name.startswith("pyiqa.")):
                continue
            for attr in ("download_url_to_file", "urlopen", "urlretrieve"):
                if callable(getattr(mod, attr, None)):
                    patch(mod, attr, _refuse_url)
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            patch(hub_constants, "HF_HUB_OFFLINE", True)
        yield
    finally:
        for obj, name, own, value in reversed(patches):
            if own:
                setattr(obj, name, value)
            else:  # an inherited attribute (socket.socket.connect): remove the override
                delattr(obj, name)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _explain(e: Exception) -> str:
    """The reason shown for a metric that failed offline."""
    if isinstance(e, MetricUnavailable):
        return str(e)
    for cause in (e, e.__cause__, e.__context__):
        if isinstance(cause, MetricUnavailable):  # a library wrapped our refusal in its own error
            return str(cause)
    if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return f"its weights are not in the local Hugging Face cache (downloads are blocked): {e}"
    return f"pyiqa could not create it offline: {type(e).__name__}: {e}"


def _pyiqa_metric(name: str, device: torch.device):
    """Creates a pyiqa metric; call inside :func:`no_downloads`."""
    try:
        import pyiqa
    except ImportError:
        raise MetricUnavailable(
            "pyiqa is not installed (pip install pyiqa, then put its weights in its cache)"
        ) from None
    if name not in pyiqa.list_models():
        raise MetricUnavailable(f"unknown metric (pyiqa knows {len(pyiqa.list_models())} names, e.g. lpips, musiq)")
    try:
        return pyiqa.create_metric(name, device=device, as_loss=False)
    except Exception as e:  # noqa: BLE001 - pyiqa raises many kinds when offline; say which
        raise MetricUnavailable(_explain(e)) from None


@torch.no_grad()
def _run_metric(metric, pred: torch.Tensor, gt: torch.Tensor, device: torch.device) -> float:
    args = (pred[None].to(device),)
    if getattr(metric, "metric_mode", "FR") != "NR":  # no-reference metrics see the prediction only
        args = args + (gt[None].to(device),)
    return float(metric(*args))


def _pair(pred_dir: Path, gt_dir: Path, suffix: str, result: EvalResult) -> list[tuple[str, Path, Path]]:
    from ..sr.image_io import collect_images

    preds = collect_images([pred_dir], recursive=True)
    gts = collect_images([gt_dir], recursive=True)
    result.errors += [(str(p), why) for p, why in preds.errors + gts.errors]
    by_stem: dict[str, Path] = {}
    for g in gts.files:
        key = str(g.relative_to(gt_dir).with_suffix(""))
        if key in by_stem:
            result.errors.append((str(g), f"two ground-truth files share the name {key!r}; using {by_stem[key].name}"))
            continue
        by_stem[key] = g
    pairs, used = [], set()
    for p in preds.files:
        key = str(p.relative_to(pred_dir).with_suffix(""))
        if suffix and key.endswith(suffix):
            key = key[: -len(suffix)]
        g = by_stem.get(key)
        if g is None:
            result.errors.append((str(p), f"no ground truth named {key}.* in {gt_dir}"))
        else:
            pairs.append((key, p, g))
            used.add(key)
    result.errors += [(str(g), "no prediction for this ground truth") for k, g in by_stem.items() if k not in used]
    return pairs


def evaluate(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    metrics=BUILTIN_METRICS,
    crop_border: int = 4,
    y_channel: bool = True,
    suffix: str = "",
    device: str | torch.device = "cpu",
    progress=None,
) -> EvalResult:
    """Computes ``metrics`` for every matched (prediction, ground truth) pair; see the module docstring.

    Full-reference metrics need equal sizes (a mismatch is an error for that image); pyiqa metrics get
    ``(1, 3, H, W)`` tensors in ``[0, 1]``; no-reference ones see the prediction only.
    """
    from ..sr.image_io import ImageReadError, load_image
    from .metrics import psnr, ssim

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for name, d in (("pred", pred_dir), ("gt", gt_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"--{name} {d} is not a folder")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}")
    metrics = check_metric_names(metrics)
    device = torch.device(device)
    result = EvalResult(metrics=list(metrics))
    pairs = _pair(pred_dir, gt_dir, suffix, result)
    guard = no_downloads() if any(m not in BUILTIN_METRICS for m in metrics) else contextlib.nullcontext()
    with guard:
        iqa = {}
        for m in metrics:
            if m in BUILTIN_METRICS:
                continue
            try:
                iqa[m] = _pyiqa_metric(m, device)
            except MetricUnavailable as e:
                result.unavailable[m] = str(e)
        active = [m for m in metrics if m in BUILTIN_METRICS or m in iqa]
        for i, (key, p, g) in enumerate(pairs):
            try:
                pred, gt = load_image(p), load_image(g)
            except ImageReadError as e:
                result.errors.append((str(e.path), e.reason))
                continue
            if pred.shape != gt.shape:
                result.errors.append(
                    (str(p), f"size {tuple(pred.shape[1:])} differs from the ground truth's {tuple(gt.shape[1:])}")
                )
                continue
            row = {"name": key, "pred": str(p), "gt": str(g)}
            try:  # the built-in metrics first: a pair too small for the border crop is skipped, not fatal
                for m in active:
                    if m == "psnr":
                        row[m] = float(psnr(pred, gt, crop_border=crop_border, y_channel=y_channel))
                    elif m == "ssim":
                        row[m] = float(ssim(pred, gt, crop_border=crop_border, y_channel=y_channel))
            except ValueError as e:
                result.errors.append((str(p), f"skipped: {e}"))
                continue
            for m in list(active):
                if m in BUILTIN_METRICS:
                    continue
                else:
                    try:
                        row[m] = _run_metric(iqa[m], pred, gt, device)
                    except Exception as e:  # noqa: BLE001 - a metric failing (e.g. fetching weights late) drops out
                        result.unavailable[m] = f"failed on {p}: {_explain(e)}"
                        active.remove(m)
                        for r in result.rows:
                            r.pop(m, None)
            result.rows.append(row)
            if progress is not None:
                progress(i + 1, len(pairs))
    for m in active:  # identical pairs (PSNR inf) are counted apart; the mean is over the finite values
        vals = [r[m] for r in result.rows if math.isfinite(r[m])]
        bad = [r["name"] for r in result.rows if not math.isfinite(r[m])]
        if bad:
            result.infinite[m] = bad
        result.summary[m] = math.fsum(vals) / len(vals) if vals else float("nan")
    return result


def write_csv(result: EvalResult, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """One row per image (name, pred, gt, then the metrics; ``inf`` for identical pairs), written atomically
    (``overwrite=False`` never replaces an existing file)."""
    from ..atomic_write import atomic_path

    path = Path(path)
    cols = ["name", "pred", "gt"] + [m for m in result.metrics if m in result.summary]
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for row in result.rows:
                w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def format_summary(result: EvalResult, *, crop_border: int, y_channel: bool) -> str:
    """A plain-text summary table (metric, mean, images, notes)."""
    where = f"{'Y' if y_channel else 'RGB'}, crop {crop_border}"
    notes = {"psnr": f"dB, {where}", "ssim": where, "lpips": "pyiqa lpips (AlexNet)"}
    lines = [f"{'metric':<16}{'mean':>12}  {'images':>6}  notes", "-" * 60]
    n = len(result.rows)
    for m in result.metrics:
        if m in result.summary:
            note = notes.get(m, "pyiqa")
            k = len(result.infinite.get(m, ()))
            if k:
                note += f"; mean over {n - k} finite values, {k} identical pairs (inf) left out"
            lines.append(f"{m:<16}{result.summary[m]:>12.4f}  {n - k:>6}  {note}")
        else:
            lines.append(f"{m:<16}{'n/a':>12}  {0:>6}  unavailable: {result.unavailable.get(m, '?')}")
    return "\n".join(lines)
