"""The ``mor-sr`` command line (also ``python -m mor_model``).

    mor-sr upscale INPUT... -o OUTDIR --model DIR [options]   super-resolve files and folders
    mor-sr route-stats INPUT... --model DIR [-o heatmap.png]  active ranks per MoR layer and image
    mor-sr eval --pred DIR --gt DIR [--metrics psnr,ssim,...] PSNR/SSIM (Y, border crop) + pyiqa metrics
    mor-sr train CONFIG [overrides]                           training (mor_model.train)

Exit codes: 0 success; 1 some inputs failed (the others were processed); 2 bad arguments, or a model
or config that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"mor-sr: {msg}", file=sys.stderr)


def _tile_arg(value: str):
    if value.lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 or a positive int, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"tile must be >= 0, got {n}")
    return n


def _int_at_least(low: int, what: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


_positive_int = _int_at_least(1, "a positive int")
_nonneg_int = _int_at_least(0, "an int >= 0")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="model directory in diffusers layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/); it may carry "
        "mor_adapter/, vae_encoder_adapter/ and degradation_clip/ (the defaults of the next flags)",
    )
    g.add_argument(
        "--adapter",
        metavar="FILE",
        help="UNet MoR adapter: its directory or its mor_adapter.safetensors file (default: DIR/mor_adapter)",
    )
    g.add_argument(
        "--vae-adapter",
        metavar="FILE",
        help="VAE-encoder adapter, directory or file (default: DIR/vae_encoder_adapter if present)",
    )
    g.add_argument(
        "--clip",
        metavar="CKPT",
        help="degradation CLIP: a DegradationEstimator.save_local directory, or a checkpoint file with "
        "open_clip_config.json beside it (default: DIR/degradation_clip)",
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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--scale", type=float, default=4, help="upscaling factor (default 4); output = scale x input size")
    g.add_argument(
        "--tile",
        type=_tile_arg,
        default=None,
        metavar="N",
        help="UNet tile size in latent pixels for large images (a multiple of the UNet factor); 'auto' (default) "
        "picks it from free memory (at most 96), 0 disables tiling in every stage",
    )
    g.add_argument(
        "--tile-overlap", type=_nonneg_int, default=None, metavar="N", help="UNet tile overlap (default N/3)"
    )
    g.add_argument(
        "--encoder-tile",
        type=_tile_arg,
        default=None,
        metavar="PX",
        help="VAE-encoder tile size in pixels (a multiple of the VAE factor); 'auto' (default, at most 1024), 0: whole",
    )
    g.add_argument(
        "--decoder-tile",
        type=_tile_arg,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mor-sr",
        description="One-step Mixture-of-Ranks super-resolution: upscale images, inspect routing, evaluate, train.",
        epilog="Exit codes: 0 success, 1 some inputs failed (the rest was processed), 2 bad arguments or a model that "
        'cannot be loaded. Try it without weights: python -c "from mor_model.testing import tiny_model; '
        "tiny_model('tiny')\" then mor-sr upscale IMAGE -o out --model tiny",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    up = sub.add_parser(
        "upscale",
        help="super-resolve images",
        description="Super-resolve image files and folders (png, jpg, jpeg, webp, bmp, tif, tiff). Inputs are never "
        "overwritten; existing outputs are skipped unless --overwrite; files are written atomically; an "
        "unreadable image is reported and skipped. Exit code 1 if any input failed.",
    )
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    up.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    _add_model_args(up)
    _add_run_args(up)
    g = up.add_argument_group("files")
    g.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders (kept in the output)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (never inputs)")
    g.add_argument("--ext", default=".png", help="output format: .png (default), .jpg, .webp, .bmp, .tif")
    g.add_argument(
        "--suffix",
        default="",
        help="added to output file stems, e.g. _x4; needed when -o is (or contains) a scanned input folder: files "
        "there whose names end with SUFFIX+EXT are then taken as earlier outputs, not as inputs",
    )
    g.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward (same-size images only)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    rs = sub.add_parser(
        "route-stats",
        help="active ranks per MoR layer for given images (table + heatmap PNG)",
        description="Runs the pipeline on each image and reports, per MoR layer, the active real ranks "
        "(shared + selected non-zero slots) per image: a table on stdout and a heatmap PNG (layers x images).",
    )
    rs.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    rs.add_argument("-o", "--output", default="route_stats.png", metavar="PNG", help="heatmap path (route_stats.png)")
    rs.add_argument("--json", metavar="FILE", help="also write the statistics as JSON")
    rs.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    _add_model_args(rs)
    _add_run_args(rs)

    ev = sub.add_parser(
        "eval",
        help="PSNR/SSIM (+ pyiqa metrics) of predictions against ground truth",
        description="Matches predictions and ground truth by file name (stem), computes PSNR and SSIM on the BT.601 "
        "Y channel with a border crop, and pyiqa metrics when pyiqa and their weights are installed (nothing is "
        "downloaded). Writes a per-image CSV and prints a summary table.",
    )
    ev.add_argument("--pred", required=True, metavar="DIR", help="folder of SR outputs")
    ev.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth images")
    ev.add_argument(
        "--metrics",
        default="psnr,ssim",
        help="comma-separated: psnr, ssim (built in) and pyiqa names, e.g. lpips (AlexNet), lpips-vgg, dists, musiq, "
        "maniqa (KonIQ), maniqa-pipal (OSEDiff's tables), clipiqa (default psnr,ssim)",
    )
    ev.add_argument("--crop-border", type=int, default=4, help="pixels removed on each side (default 4 = scale)")
    ev.add_argument("--rgb", action="store_true", help="PSNR/SSIM on RGB instead of the Y channel")
    ev.add_argument("--suffix", default="", help="strip this from prediction stems before matching (e.g. _x4)")
    ev.add_argument("--csv", metavar="FILE", help="per-image CSV (default: PRED/metrics.csv)")
    ev.add_argument("--device", default="cpu", help="device for pyiqa metrics (default cpu)")

    tr = sub.add_parser(
        "train",
        help="train the adapters (see `mor-sr train --help`)",
        add_help=False,
        description="Delegates to mor_model.train; run `mor-sr train --help` for its options.",
    )
    tr.add_argument("args", nargs=argparse.REMAINDER)
    return parser


# -- upscale --------------------------------------------------------------------------------------
def _load_pipeline(args):
    from .pipeline import MoRSRPipeline

    if getattr(args, "quiet", False):  # the CLI process owns these global switches
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()

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


def _run_kwargs(args) -> dict:
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


def _check_args(args) -> str | None:
    """Problems with the arguments that need the model's configs (not its weights), or None: checked before
    any image is read, so they are usage errors, not per-image failures."""
    import torch

    from .pipeline import _check_device
    from .tile_plan import check_call_options, model_factors

    try:
        if args.device is not None:
            _check_device(torch.device(args.device))
        vae_factor, unet_factor = model_factors(args.model)
        run = _run_kwargs(args)
        options = {k: run[k] for k in ("scale", "color_fix", "tile", "tile_overlap", "encoder_tile", "decoder_tile")}
        check_call_options(vae_factor=vae_factor, unet_factor=unet_factor, tile_norm=args.tile_norm, **options)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # torch.device raises RuntimeError on bad names
        return str(e)
    return None


def _upscale(args) -> int:
    import torch

    from .image_io import ImageReadError, collect_images, drop_earlier_outputs, load_image, plan_outputs, save_image

    problem = _check_args(args)
    if problem:
        _err(problem)
        return EXIT_USAGE
    try:
        collected, earlier = drop_earlier_outputs(
            collect_images(args.inputs, recursive=args.recursive), args.output, suffix=args.suffix, ext=args.ext
        )
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    if earlier:
        _err(f"ignoring {len(earlier)} earlier outputs found among the inputs (inside {args.output})")
    failures = 0
    for path, why in collected.errors:
        _err(f"skipping {path}: {why}")
        failures += 1
    try:
        plans = plan_outputs(collected, args.output, suffix=args.suffix, ext=args.ext, overwrite=args.overwrite)
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    todo = [p for p in plans if not p.skip]
    skipped = len(plans) - len(todo)
    for p in plans:
        if p.skip:
            print(f"exists, skipped (use --overwrite): {p.output}", file=sys.stderr)
    written = 0
    if todo:
        try:
            pipe = _load_pipeline(args)
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            _err(f"cannot load the model: {e}")
            return EXIT_USAGE
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="img", disable=args.quiet, desc="upscale", file=sys.stderr)
        batch: list = []

        def tiles(stage, done, total):  # large images: tile progress of the current batch
            bar.set_postfix_str(f"{stage} tile {done}/{total}", refresh=False)

        def flush():
            nonlocal failures, written
            if not batch:
                return
            try:
                out = pipe(torch.stack([img for _, img in batch]), progress=tiles, **_run_kwargs(args))
            except Exception as e:  # noqa: BLE001 - any failure is this batch's, the rest goes on
                for plan, _ in batch:
                    bar.write(f"mor-sr: failed on {plan.input}: {type(e).__name__}: {e}", file=sys.stderr)
                failures += len(batch)
            else:
                for (plan, _), img in zip(batch, out, strict=True):
                    try:
                        save_image(img, plan.output)
                        written += 1
                    except Exception as e:  # noqa: BLE001
                        bar.write(f"mor-sr: cannot write {plan.output}: {type(e).__name__}: {e}", file=sys.stderr)
                        failures += 1
            bar.update(len(batch))
            batch.clear()

        for plan in todo:
            try:
                img = load_image(plan.input)
            except Exception as e:  # noqa: BLE001 - ImageReadError, or anything else the decoder raises
                why = e.reason if isinstance(e, ImageReadError) else f"{type(e).__name__}: {e}"
                bar.write(f"mor-sr: skipping unreadable image {plan.input}: {why}", file=sys.stderr)
                failures += 1
                bar.update(1)
                continue
            if batch and (len(batch) >= args.batch_size or batch[0][1].shape != img.shape):
                flush()
            batch.append((plan, img))
        flush()
        bar.close()
    print(
        f"{written} written to {args.output}, {skipped} skipped (already there), {failures} failed",
        file=sys.stderr,
    )
    return EXIT_FAILED if failures else EXIT_OK


# -- route-stats ------------------------------------------------------------------------------------
def _route_stats(args) -> int:
    import json

    import torch

    from .image_io import ImageReadError, collect_images, load_image
    from .layers import mor_layers
    from .stats import RoutingStats, routing_stats, save_routing_heatmap

    problem = _check_args(args)
    if problem:
        _err(problem)
        return EXIT_USAGE
    collected = collect_images(args.inputs, recursive=args.recursive)
    failures = 0
    for path, why in collected.errors:
        _err(f"skipping {path}: {why}")
        failures += 1
    if not collected.files:
        _err("no images to analyse")
        return EXIT_USAGE
    try:
        pipe = _load_pipeline(args)
    except (FileNotFoundError, ValueError, TypeError, OSError) as e:
        _err(f"cannot load the model: {e}")
        return EXIT_USAGE
    if not (mor_layers(pipe.unet) or mor_layers(pipe.vae)):
        _err("this model has no MoR layers (no adapter loaded): nothing to report")
        return EXIT_USAGE
    parts = [("unet", pipe.unet), ("vae", pipe.vae)]
    names, columns, severities, slots, max_ranks = [], [], [], {}, {}
    layer_names = None
    for path in collected.files:
        try:
            img = load_image(path)
        except Exception as e:  # noqa: BLE001
            _err(f"skipping unreadable image {path}: {e.reason if isinstance(e, ImageReadError) else e}")
            failures += 1
            continue
        for _, m in parts:
            for layer in mor_layers(m).values():
                layer.router.clear_state()
        try:
            scores = pipe.degradation_scores(img[None])  # once, for the routing and the table
            pipe(img[None], scores=scores, **_run_kwargs(args))
        except Exception as e:  # noqa: BLE001 - this image fails, the others are still analysed
            _err(f"failed on {path}: {type(e).__name__}: {e}")
            failures += 1
            continue
        col, these = [], []
        for prefix, m in parts:
            if not mor_layers(m):
                continue
            st = routing_stats(m)
            col.append(st.active_ranks[:, 0])
            these += [f"{prefix}.{n}" for n in st.layers]
            for n in st.layers:
                slots.setdefault(f"{prefix}.{n}", []).append(st.slots[n][0])
                max_ranks[f"{prefix}.{n}"] = st.max_ranks[n]
        if layer_names is None:
            layer_names = these
        columns.append(torch.cat(col))
        names.append(str(path))
        severities.append(float(scores.mean()) if scores is not None else float("nan"))
    if not columns:
        _err("no readable images")
        return EXIT_FAILED
    active = torch.stack(columns, dim=1)  # (L, N)
    stats = RoutingStats(layer_names, active, {k: torch.stack(v) for k, v in slots.items()}, max_ranks)
    width = max(len(n) for n in layer_names)
    print(f"{'layer':<{width}}  {'max':>4}  {'mean':>6}  {'min':>5}  {'max':>5}   (active real ranks over images)")
    for i, n in enumerate(layer_names):
        row = active[i]
        print(f"{n:<{width}}  {max_ranks[n]:>4}  {row.mean():>6.2f}  {row.min():>5.1f}  {row.max():>5.1f}")
    print()
    for j, (n, sev) in enumerate(zip(names, severities, strict=True)):
        print(f"image {j}: {n}  severity {sev:.3f}  mean active ranks {active[:, j].mean():.2f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_routing_heatmap(stats, out, title="active real ranks (columns: images in the order above)")
    print(f"heatmap: {out}")
    if args.json:
        data = stats.to_dict()
        data.update({"images": names, "severity": severities})
        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"json: {args.json}")
    return EXIT_FAILED if failures else EXIT_OK


# -- eval -------------------------------------------------------------------------------------------
def _eval(args) -> int:
    from .evaluate import evaluate, format_summary, write_csv

    metrics = [m for m in args.metrics.split(",") if m.strip()]
    try:
        result = evaluate(
            args.pred,
            args.gt,
            metrics=metrics,
            crop_border=args.crop_border,
            y_channel=not args.rgb,
            suffix=args.suffix,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as e:
        _err(str(e))
        return EXIT_USAGE
    for path, why in result.errors:
        _err(f"{path}: {why}")
    for m, why in result.unavailable.items():
        _err(f"metric {m} unavailable: {why}")
    csv_path = Path(args.csv) if args.csv else Path(args.pred) / "metrics.csv"
    if result.rows:
        write_csv(result, csv_path)
    print(format_summary(result, crop_border=args.crop_border, y_channel=not args.rgb))
    if result.rows:
        print(f"per-image values: {csv_path}")
    else:
        _err("no image pairs were evaluated")
        return EXIT_FAILED
    return EXIT_FAILED if result.errors else EXIT_OK


# -- train ------------------------------------------------------------------------------------------
def _train(argv: list[str]) -> int:
    try:
        from . import train
    except ImportError as e:
        _err(f"training is not available: {e} (install the extras: pip install 'mor-sr[model,train]')")
        return EXIT_USAGE
    if not hasattr(train, "main"):
        _err("mor_model.train has no main(argv): this installation's training module is incomplete")
        return EXIT_USAGE
    return int(train.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mor-sr``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # everything after `train` belongs to the training parser
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "upscale":
        code = _upscale(args)
    elif args.command == "route-stats":
        code = _route_stats(args)
    elif args.command == "eval":
        code = _eval(args)
    else:  # pragma: no cover - argparse rejects unknown commands
        code = EXIT_USAGE
    if args.command != "eval":
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code
