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
    memory_options,
    positive_int,
    run_kwargs,
)
from .outputs import UsageError, check_output_files, check_output_folder
from .shard import Team, TeamBar, shard_by_pixels


def add_parser(sub) -> None:
    up = sub.add_parser(
        "upscale",
        help="super-resolve images",
        description="Super-resolve image files and folders (png, jpg, jpeg, webp, bmp, tif, tiff). Inputs are never "
        "overwritten; existing outputs are skipped unless --overwrite; files are written atomically; an "
        "unreadable image, or one too large for the memory this machine has (checked from its header before "
        "it is decoded), is reported and skipped. Exit code 1 if any input failed. On several GPUs: accelerate launch "
        "--num_processes N -m mor_model upscale ... (images split by pixel count, one progress bar, one summary).",
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


_SOURCES = ("model", "adapter", "vae_adapter", "clip")


def _plan(args):
    """Main process: the usage checks and the output plan (``EXIT_USAGE`` on a usage error, reported)."""
    from ..sr.image_io import (
        ImageReadError,
        check_suffix,
        collect_images,
        drop_earlier_outputs,
        image_size,
        plan_outputs,
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
    for path, why in collected.errors:
        err(f"skipping {path}: {why}")
    todo = [p for p in plans if not p.skip]
    for p in plans:
        if p.skip:
            print(f"exists, skipped (use --overwrite): {p.output}", file=sys.stderr)

    def pixels(path):
        try:
            width, height = image_size(path)
            return width * height
        except ImageReadError:
            return 0  # reported by the process that gets it

    sources = {k: getattr(args, k) for k in _SOURCES}
    return todo, len(plans) - len(todo), len(collected.errors), [pixels(p.input) for p in todo], sources


def run(args) -> int:
    team = Team.from_env()  # one process, or those of `accelerate launch` (see mor_model.cli.shard)
    try:
        return _run(args, team)
    finally:
        team.leave()


def _run(args, team: Team) -> int:
    import torch

    from ..sr.image_io import ImageReadError, save_image
    from ..sr.job_check import ImageTooLargeError, load_checked, memory_problem

    device, problem = team.device(args.device)
    problems = team.problems(problem)  # any process's device problem stops every process, before planning
    if problems:
        if team.is_main:
            for p in problems:
                err(p)
        return EXIT_USAGE
    plan = team.share(_plan(args) if team.is_main else None)
    if plan == EXIT_USAGE:
        return EXIT_USAGE
    everything, skipped, failures, sizes, sources = plan
    failures = failures if team.is_main else 0  # the inputs that were not found count once, on the main process
    for k, v in sources.items():  # the repo ids the main process resolved to local folders
        setattr(args, k, v)
    args.device = device
    todo = [everything[i] for i in shard_by_pixels(sizes, team.size)[team.rank]]
    written, usage = 0, False
    if everything:
        bar = TeamBar(team, len(everything), quiet=args.quiet, desc="upscale")
        try:
            pipe = load_pipeline(args) if todo else None
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            err(f"cannot load the model: {e}")
            if team.size == 1:
                return EXIT_USAGE
            bar.update(len(todo))  # the other processes go on; this one's images count as failed
            usage, failures, todo = True, failures + len(todo), []
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
                img = load_checked(pipe, plan.input, **memory_options(args))
            except ImageTooLargeError as e:
                skip(plan, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - ImageReadError, or anything else the decoder raises
                skip(
                    plan,
                    f"unreadable image: {e.reason if isinstance(e, ImageReadError) else f'{type(e).__name__}: {e}'}",
                )
                continue
            if batch and (
                len(batch) >= args.batch_size
                or batch[0][1].shape != img.shape
                or memory_problem(pipe, *img.shape[1:], **memory_options(args), batch=len(batch) + 1)
            ):
                flush()
            batch.append((plan, img))
        flush()
        bar.close()
    code = EXIT_USAGE if usage else EXIT_FAILED if failures else EXIT_OK
    written, failures = team.sum([written, failures])  # the summary of every process, printed once
    if team.is_main:
        procs = f" by {team.size} processes" if team.size > 1 else ""
        print(
            f"{written} written to {args.output}{procs}, {skipped} skipped (already there), {failures} failed",
            file=sys.stderr,
        )
    return team.worst(code)
