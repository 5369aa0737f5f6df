"""Pieces shared by the ``mor-sr`` subcommands: exit codes, argument types, the model and inference
options, and loading the pipeline they describe."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def err(msg: str) -> None:
    print(f"mor-sr: {msg}", file=sys.stderr)


def tile_arg(value: str):
    if value.lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 or a positive int, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"tile must be >= 0, got {n}")
    return n


def int_at_least(low: int, what: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


positive_int = int_at_least(1, "a positive int")
nonneg_int = int_at_least(0, "an int >= 0")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="DIR|ID",
        help="model directory in diffusers layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/), or a Hugging Face "
        "repo id (org/name) of one, found in or downloaded to the Hugging Face cache (HF_HUB_OFFLINE=1: cache only; "
        "a local folder of the same name wins); it may carry mor_adapter/, vae_encoder_adapter/ and "
        "degradation_clip/ (the defaults of the next flags)",
    )
    g.add_argument("--revision", metavar="REV", help="branch, tag or commit of a --model repo id (default main)")
    g.add_argument(
        "--adapter",
        metavar="FILE",
        help="UNet MoR adapter: its directory, its mor_adapter.safetensors file, or a repo id[@REV] holding it at "
        "its root or in mor_adapter/ (default: DIR/mor_adapter)",
    )
    g.add_argument(
        "--vae-adapter",
        metavar="FILE",
        help="VAE-encoder adapter: directory, file, or repo id[@REV] (root or vae_encoder_adapter/) (default: "
        "DIR/vae_encoder_adapter if present)",
    )
    g.add_argument(
        "--clip",
        metavar="CKPT",
        help="degradation CLIP: a DegradationEstimator.save_local directory, a checkpoint file with "
        "open_clip_config.json beside it, a repo id[@REV] (root or degradation_clip/), or an open_clip MODEL:TAG "
        "such as ViT-L-14-quickgelu:openai (weights through the Hugging Face cache) (default: DIR/degradation_clip)",
    )
    g.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="compute dtype (default fp32)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "reference", "triton", "cuda", "cpp"),
        help="mor_kernels backend of the adapters (default auto)",
    )
    g.add_argument(
        "--fold-shared",
        action="store_true",
        help="fold the always-on shared ranks into the base weights (faster; the routed ranks stay dynamic)",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--scale", type=float, default=4, help="upscaling factor (default 4); output = scale x input size")
    g.add_argument(
        "--tile",
        type=tile_arg,
        default=None,
        metavar="N",
        help="UNet tile size in latent pixels for large images (a multiple of the UNet factor); 'auto' (default) "
        "picks it from free memory (at most 96), 0 disables tiling in every stage",
    )
    g.add_argument("--tile-overlap", type=nonneg_int, default=None, metavar="N", help="UNet tile overlap (default N/3)")
    g.add_argument(
        "--encoder-tile",
        type=tile_arg,
        default=None,
        metavar="PX",
        help="VAE-encoder tile size in pixels (a multiple of the VAE factor); 'auto' (default, at most 1024), 0: whole",
    )
    g.add_argument(
        "--decoder-tile",
        type=tile_arg,
        default=None,
        metavar="N",
        help="VAE-decoder tile size in latent pixels; 'auto' (default, at most 224), 0: whole",
    )
    g.add_argument(
        "--tile-norm",
        default="global",
        choices=("global", "tile"),
        help="GroupNorm statistics of tiled stages: 'global' (default, one set estimated from the whole image: no "
        "colour seams) or 'tile' (each tile its own)",
    )
    g.add_argument(
        "--color-fix", default="adain", choices=("adain", "wavelet", "none"), help="colour correction (default adain)"
    )
    g.add_argument("--prompt", default="", help="text prompt (default: empty prompt)")
    g.add_argument("--seed", type=int, default=None, help="seed (only used with --sample-posterior)")
    g.add_argument(
        "--sample-posterior", action="store_true", help="sample the VAE latent instead of its mode (OSEDiff does)"
    )


def keep_freed_memory_on_cpu(device: str | None) -> str | None:
    """On a CPU run, freed memory stays in the process (``mor_model.cpu_memory``: ~15% of a UNet forward's wall
    time goes to page faults otherwise), unless ``MOR_KEEP_FREED_MEMORY=0``. Returns what was done (None: a
    GPU run, or switched off)."""
    import torch

    from ..cpu_memory import keep_freed_memory

    if os.environ.get("MOR_KEEP_FREED_MEMORY", "1") == "0":
        return None
    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type != "cpu":
        return None
    return keep_freed_memory()


def load_pipeline(args):
    from ..sr.pipeline import MoRSRPipeline

    if getattr(args, "quiet", False):  # the CLI process owns these global switches
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()

    keep_freed_memory_on_cpu(args.device)
    return MoRSRPipeline.from_pretrained(
        args.model,
        adapter=args.adapter,
        clip=args.clip,
        vae_adapter=args.vae_adapter,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        fold_shared=args.fold_shared,
    )


def run_kwargs(args) -> dict:
    return {
        "scale": args.scale,
        "prompt": args.prompt,
        "color_fix": args.color_fix,
        "tile": args.tile,
        "tile_overlap": args.tile_overlap,
        "encoder_tile": args.encoder_tile,
        "decoder_tile": args.decoder_tile,
        "tile_norm": args.tile_norm,
        "seed": args.seed,
        "sample_posterior": args.sample_posterior,
    }


def device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used (a bad name, a device type the pipeline does not run on, CUDA
    asked for but absent), naming the flag; None when it is fine or not given."""
    import torch

    from ..sr.loading import _check_device

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {device!r} is not a device name (expected cpu, cuda or cuda:N)"
    if dev.type not in ("cpu", "cuda"):
        return f"--device {device!r}: the pipeline runs on cpu or cuda devices only"
    try:
        _check_device(dev)
    except ValueError as e:
        return f"--device: {e}"
    return None


def input_trees(args) -> list:
    """The model's folders and files (model, adapters, CLIP): outputs never land on a file inside them."""
    from ..sr.loading import open_clip_name

    return [p for p in (args.model, args.adapter, args.vae_adapter, args.clip) if p and not open_clip_name(p)]


def resolve_sources(args) -> None:
    """Replaces repo ids in ``--model``/``--adapter``/``--vae-adapter``/``--clip`` by their local folders in the
    Hugging Face cache (downloading them where allowed; :func:`mor_model.sr.hub.resolve_source`), so the
    checks, the output rules and the loading below all see local paths. Raises ``FileNotFoundError``."""
    from ..sr.hub import resolve_source
    from ..sr.loading import open_clip_name

    args.model = str(resolve_source(args.model, kind="model", revision=getattr(args, "revision", None)))
    for name, kind in (("adapter", "adapter"), ("vae_adapter", "vae_adapter"), ("clip", "clip")):
        value = getattr(args, name, None)
        if value is not None and not (kind == "clip" and open_clip_name(value)):
            setattr(args, name, str(resolve_source(value, kind=kind)))


def check_args(args) -> str | None:
    """Problems with the arguments that need the model's configs (not its weights), or None: checked before
    any image is read, so they are usage errors, not per-image failures. Repo ids are resolved here first
    (:func:`resolve_sources`)."""
    from ..sr.tile_plan import check_call_options, model_factors

    problem = device_problem(args.device)
    if problem:
        return problem
    try:
        resolve_sources(args)
        vae_factor, unet_factor = model_factors(args.model)
        run = run_kwargs(args)
        options = {k: run[k] for k in ("scale", "color_fix", "tile", "tile_overlap", "encoder_tile", "decoder_tile")}
        check_call_options(vae_factor=vae_factor, unet_factor=unet_factor, tile_norm=args.tile_norm, **options)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


def memory_options(args) -> dict:
    """The call options the memory plan of a job depends on (see :func:`mor_model.sr.job_check.memory_problem`)."""
    return {k: getattr(args, k) for k in ("scale", "tile", "encoder_tile", "decoder_tile")}
