"""``mor-sr upscale INPUT... -o OUTDIR --model DIR``: super-resolve files and folders."""

from __future__ import annotations

import sys

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_model_args,
    add_run_args,
    check_args,
    err,
    input_trees,
    load_pipeline,
    memory_problem,
    positive_int,
    run_kwargs,
)
from .outputs import UsageError, check_output_files, check_output_folder


def add_parser(sub) -> None:
    up = sub.add_parser(
        "upscale",
        help="super-resolve images",
        description="Super-resolve image files and folders (png, jpg, jpeg, webp, bmp, tif, tiff). Inputs are never "
        "overwritten; existing outputs are skipped unless --overwrite; files are written atomically; an "
        "unreadable image, or one too large for the memory this machine has (checked from its header before "
        "it is decoded), is reported and skipped. Exit code 1 if any input failed.",
    )
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    up.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    add_model_args(up)
    add_run_args(up)
    g = up.add_argument_group("files")
    g.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders (kept in the output)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (never inputs)")
    g.add_argument("--ext", default=".png", help="output format: .png (default), .jpg, .webp, .bmp, .tif")
    g.add_argument(
        "--suffix",
        default="",
        help="added to output file stems, e.g. _x4 (a plain name part: no path separator, no '..'); needed when -o "
        "is (or contains) a scanned input folder: files there whose names end with SUFFIX+EXT are then taken as "
        "earlier outputs, not as inputs",
    )
    g.add_argument("--batch-size", type=positive_int, default=1, help="images per forward (same-size images only)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    from ..sr.image_io import (
        ImageReadError,
        check_suffix,
        collect_images,
        drop_earlier_outputs,
        image_size,
        load_image,
        plan_outputs,
        save_image,
    )

    try:  # every usage error before the model is loaded or an image is read
        check_output_folder("-o", args.output)
        check_suffix(args.suffix)
        problem = check_args(args)
        if problem:
            raise UsageError(problem)
        collected, earlier = drop_earlier_outputs(
            collect_images(args.inputs, recursive=args.recursive), args.output, suffix=args.suffix, ext=args.ext
        )
        plans = plan_outputs(collected, args.output, suffix=args.suffix, ext=args.ext, overwrite=args.overwrite)
        for p in plans:  # an output never replaces a file of the model, nor lands on a folder
            if p.output.exists():
                check_output_files({"-o": p.output}, input_trees=input_trees(args), overwrite=True)
    except ValueError as e:  # UsageError included
        err(str(e))
        return EXIT_USAGE
    if earlier:
        err(f"ignoring {len(earlier)} earlier outputs found among the inputs (inside {args.output})")
    failures = 0
    for path, why in collected.errors:
        err(f"skipping {path}: {why}")
        failures += 1
    todo = [p for p in plans if not p.skip]
    skipped = len(plans) - len(todo)
    for p in plans:
        if p.skip:
            print(f"exists, skipped (use --overwrite): {p.output}", file=sys.stderr)
    written = 0
    if todo:
        try:
            pipe = load_pipeline(args)
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            err(f"cannot load the model: {e}")
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
                out = pipe(torch.stack([img for _, img in batch]), progress=tiles, **run_kwargs(args))
            except Exception as e:  # noqa: BLE001 - any failure is this batch's, the rest goes on
                for plan, _ in batch:
                    bar.write(f"mor-sr: failed on {plan.input}: {type(e).__name__}: {e}", file=sys.stderr)
                failures += len(batch)
            else:
                for (plan, _), img in zip(batch, out, strict=True):
                    try:
                        save_image(img, plan.output, overwrite=args.overwrite)
                        written += 1
                    except Exception as e:  # noqa: BLE001
                        bar.write(f"mor-sr: cannot write {plan.output}: {type(e).__name__}: {e}", file=sys.stderr)
                        failures += 1
            bar.update(len(batch))
            batch.clear()

        def skip(plan, why):
            nonlocal failures
            bar.write(f"mor-sr: skipping {plan.input}: {why}", file=sys.stderr)
            failures += 1
            bar.update(1)

        for plan in todo:
            try:  # the declared size first: an image that cannot fit is skipped before it is decoded
                width, height = image_size(plan.input)
            except ImageReadError as e:
                skip(plan, f"unreadable image: {e.reason}")
                continue
            why = memory_problem(pipe, height, width, args)
            if why:
                skip(plan, f"too large for this machine ({width}x{height} input): it {why}")
                continue
            try:
                img = load_image(plan.input)
            except Exception as e:  # noqa: BLE001 - ImageReadError, or anything else the decoder raises
                skip(
                    plan,
                    f"unreadable image: {e.reason if isinstance(e, ImageReadError) else f'{type(e).__name__}: {e}'}",
                )
                continue
            if batch and (
                len(batch) >= args.batch_size
                or batch[0][1].shape != img.shape
                or memory_problem(pipe, *img.shape[1:], args, batch=len(batch) + 1)
            ):
                flush()
            batch.append((plan, img))
        flush()
        bar.close()
    print(
        f"{written} written to {args.output}, {skipped} skipped (already there), {failures} failed",
        file=sys.stderr,
    )
    return EXIT_FAILED if failures else EXIT_OK
