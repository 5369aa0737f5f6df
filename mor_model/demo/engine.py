"""What the demo page runs, without Gradio: one upscale with everything the page shows.

:meth:`DemoEngine.upscale` checks the file like ``mor-sr upscale`` does (the declared size against the
page's pixel limit and against the memory plan of the job, before decoding, with
:func:`mor_model.sr.job_check.load_checked`; a damaged file is an error that names it), runs the
pipeline with a progress callback per tile, and returns a :class:`DemoResult`: the SR and bicubic images
(PNG files in the demo's temporary folder), the degradation scores, the active ranks per MoR layer
(:func:`mor_model.stats.routing_stats`), seconds per stage (forward hooks on the CLIP, the VAE encoder,
the UNet and the VAE decoder) and which ``mor_kernels`` backend ran. Every problem is a
:class:`DemoError` with a message for the page.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DemoEngine", "DemoError", "DemoResult", "save_heatmap", "score_labels"]


def _hide(text: str, path) -> str:
    """``text`` with the server's path of an upload replaced by its file name (the page shows no server paths)."""
    return text.replace(str(path), Path(path).name)


class DemoError(ValueError):
    """A problem to show on the page (the server goes on)."""


@dataclass
class DemoResult:
    sr: Path
    bicubic: Path
    input_size: tuple[int, int]  # (width, height)
    output_size: tuple[int, int]
    scores: dict[str, float]  # degradation score per prompt pair, higher = more degraded
    layers: list[str]  # MoR layers, "unet.<name>" / "vae.<name>"
    active: list[float]  # active real ranks per layer
    max_ranks: list[int]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    backend: str = ""


def score_labels(pairs) -> list[str]:
    """Short names of the estimator's prompt pairs, from the degraded prompt ("a blurry photo" -> "blurry")."""
    labels = []
    for _, negative in pairs:
        text = negative.removeprefix("a ").removeprefix("an ")
        text = text.removeprefix("photo with ").removesuffix(" photo")
        labels.append(text if text not in labels else negative)
    return labels


class _StageTimer:
    """Seconds spent in the forwards of a few modules (hooks; CUDA synchronised at both ends)."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.seconds = dict.fromkeys(modules, 0.0)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))
        self._t0: dict[str, float] = {}

    def _start(self, name):
        def hook(module, args):
            self._sync()
            self._t0[name] = time.perf_counter()

        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self._sync()
            self.seconds[name] += time.perf_counter() - self._t0.pop(name)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class DemoEngine:
    """Loads the pipeline on demand (one at a time, per dtype and fold switch) and runs upscales.

    Args:
        model, adapter, vae_adapter, clip: as for :meth:`MoRSRPipeline.from_pretrained` (local paths).
        work_dir: the demo's temporary folder; results go to ``work_dir/results/<run>/``.
        device, backend: for the pipeline.
        max_pixels: largest input (width x height) the page accepts.
        keep_runs: result folders kept (older ones are deleted).
    """

    def __init__(
        self,
        model,
        *,
        work_dir,
        adapter=None,
        vae_adapter=None,
        clip=None,
        device: str | None = None,
        backend: str = "auto",
        max_pixels: int = 512 * 512,
        keep_runs: int = 32,
    ):
        self.sources = {"model_dir": model, "adapter": adapter, "vae_adapter": vae_adapter, "clip": clip}
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.backend = backend
        self.max_pixels = int(max_pixels)
        self.results = Path(work_dir) / "results"
        self.keep_runs = keep_runs
        self._pipe = None
        self._key = None

    def pipeline(self, dtype: str = "fp32", fold_shared: bool = False):
        from ..sr.pipeline import MoRSRPipeline

        key = (dtype, bool(fold_shared))
        if self._key != key:
            self._pipe, self._key = None, None  # one model in memory at a time; a failed load keeps none
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._pipe = MoRSRPipeline.from_pretrained(
                **self.sources, dtype=dtype, device=self.device, backend=self.backend, fold_shared=fold_shared
            )
            self._key = key
        return self._pipe

    def describe_backend(self, pipe) -> str:
        import mor_kernels

        if self.backend != "auto":
            return f"mor_kernels backend {self.backend!r} (asked for)"
        return "\n".join(
            mor_kernels.explain_backend(pipe.device, op, pipe.dtype) for op in ("mor_linear", "mor_conv2d")
        )

    def _new_run_dir(self) -> Path:
        self.results.mkdir(parents=True, exist_ok=True)
        runs = sorted(self.results.iterdir(), key=lambda p: p.stat().st_mtime)
        for old in runs[: max(0, len(runs) - self.keep_runs + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        run = self.results / uuid.uuid4().hex[:12]
        run.mkdir()
        return run

    def upscale(
        self,
        path: str | os.PathLike,
        *,
        scale: float = 4,
        tile: int | None = None,
        color_fix: str = "adain",
        dtype: str = "fp32",
        fold_shared: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> DemoResult:
        """Upscales the image file ``path``; raises :class:`DemoError` with a message for the page."""
        from PIL import Image

        from ..layers import mor_layers
        from ..sr.image_io import ImageReadError, image_size, save_image
        from ..sr.job_check import ImageTooLargeError, load_checked
        from ..stats import routing_stats

        if not path:
            raise DemoError("no image: upload one or pick an example")
        name = Path(path).name
        try:
            width, height = image_size(path)
        except ImageReadError as e:
            raise DemoError(f"unreadable image {name}: {_hide(e.reason, path)}") from None
        if width * height > self.max_pixels:
            raise DemoError(
                f"{name} is {width}x{height} = {width * height} pixels; this page takes at most {self.max_pixels} "
                f"(mor-sr demo --max-pixels raises it; mor-sr upscale takes up to Pillow's limit, "
                f"{Image.MAX_IMAGE_PIXELS} pixels, as far as the machine's memory allows)"
            )
        try:
            pipe = self.pipeline(dtype, fold_shared)
            try:  # the memory plan of the job from the declared size, then the decoding
                lq = load_checked(pipe, path, max_pixels=self.max_pixels, scale=scale, tile=tile)[None]
            except ImageReadError as e:
                raise DemoError(f"unreadable image {name}: {_hide(e.reason, path)}") from None
            except ImageTooLargeError as e:
                raise DemoError(f"{name} ({width}x{height}) is too large for this machine: it {e.why}") from None
            parts = [(p, m) for p, m in (("unet", pipe.unet), ("vae", pipe.vae)) if mor_layers(m)]
            for _, m in parts:
                for layer in mor_layers(m).values():
                    layer.router.clear_state()
            stages = {"degradation CLIP": pipe.estimator, "VAE encoder": pipe.vae.encoder, "UNet": pipe.unet}
            stages["VAE decoder"] = pipe.vae.decoder
            timer = _StageTimer({k: v for k, v in stages.items() if v is not None}, pipe.device)
            start = time.perf_counter()
            try:
                scores = pipe.degradation_scores(lq)
                sr = pipe(lq, scale=scale, tile=tile, color_fix=color_fix, scores=scores, progress=progress)
            finally:
                timer.remove()
            total = time.perf_counter() - start
        except (torch.cuda.OutOfMemoryError, MemoryError):
            self._pipe, self._key = None, None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise DemoError(
                f"out of memory on {name} ({width}x{height}): try a smaller image or a smaller tile"
            ) from None
        except (ValueError, TypeError, OSError, RuntimeError) as e:  # dtype not supported here, a bad adapter...
            if isinstance(e, DemoError):
                raise
            raise DemoError(f"{type(e).__name__}: {_hide(str(e), path)}") from None

        bicubic = torch.nn.functional.interpolate(lq, size=sr.shape[-2:], mode="bicubic", align_corners=False)
        run = self._new_run_dir()
        stem = Path(name).stem or "image"
        sr_path = save_image(sr[0], run / f"{stem}_x{scale:g}.png")
        bic_path = save_image(bicubic[0].clamp(0, 1), run / f"{stem}_bicubic.png")
        layers, active, max_ranks = [], [], []
        for prefix, m in parts:
            st = routing_stats(m)
            layers += [f"{prefix}.{n}" for n in st.layers]
            active += st.active_ranks[:, 0].tolist()
            max_ranks += [st.max_ranks[n] for n in st.layers]
        labels = score_labels(pipe.estimator.prompt_pairs) if pipe.estimator is not None else []
        seconds = {k: round(v, 4) for k, v in timer.seconds.items()}
        seconds["total"] = round(total, 4)
        return DemoResult(
            sr=sr_path,
            bicubic=bic_path,
            input_size=(width, height),
            output_size=(sr.shape[-1], sr.shape[-2]),
            scores=dict(zip(labels, scores[0].tolist(), strict=True)) if scores is not None else {},
            layers=layers,
            active=active,
            max_ranks=max_ranks,
            stage_seconds=seconds,
            backend=self.describe_backend(pipe),
        )


def save_heatmap(runs: list[tuple[str, DemoResult]], path: str | os.PathLike) -> Path:
    """Active ranks per MoR layer (rows) for the last runs (columns, oldest first) as a PNG: put a clean and a
    degraded image side by side to see the compute follow the degradation."""
    from ..stats import RoutingStats, save_routing_heatmap

    runs = [(label, r) for label, r in runs if r.layers == runs[-1][1].layers]
    last = runs[-1][1]
    active = torch.tensor([r.active for _, r in runs], dtype=torch.float32).T  # (L, N)
    stats = RoutingStats(last.layers, active, {}, dict(zip(last.layers, last.max_ranks, strict=True)))
    save_routing_heatmap(stats, path, title="active real ranks per MoR layer (columns: runs, newest right)")
    return Path(path)
