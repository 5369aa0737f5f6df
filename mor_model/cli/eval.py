"""``mor-sr eval --pred DIR --gt DIR``: PSNR/SSIM (Y channel, border crop) and pyiqa metrics."""

from __future__ import annotations

from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, device_problem, err, nonneg_int
from .outputs import UsageError, check_output_files


def add_parser(sub) -> None:
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
    ev.add_argument("--crop-border", type=nonneg_int, default=4, help="pixels removed on each side (default 4 = scale)")
    ev.add_argument("--rgb", action="store_true", help="PSNR/SSIM on RGB instead of the Y channel")
    ev.add_argument("--suffix", default="", help="strip this from prediction stems before matching (e.g. _x4)")
    ev.add_argument("--csv", metavar="FILE", help="per-image CSV (default: PRED/metrics.csv); never an input image")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    ev.add_argument("--device", default="cpu", help="device for pyiqa metrics (default cpu)")


def run(args) -> int:
    from ..eval.evaluate import check_metric_names, evaluate, format_summary, write_csv
    from ..sr.image_io import collect_images

    csv_path = Path(args.csv) if args.csv else Path(args.pred) / "metrics.csv"
    try:
        metrics = check_metric_names(args.metrics.split(","))
        problem = device_problem(args.device)
        if problem:
            raise UsageError(problem)
        for flag, d in (("--pred", args.pred), ("--gt", args.gt)):
            if not Path(d).is_dir():
                raise UsageError(f"{flag} {d} is not a folder")
        inputs = collect_images([args.pred, args.gt], recursive=True).files
        check_output_files({"--csv": csv_path}, inputs=inputs, overwrite=args.overwrite)
    except ValueError as e:  # UsageError included
        err(str(e))
        return EXIT_USAGE
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
        err(str(e))
        return EXIT_USAGE
    for path, why in result.errors:
        err(f"{path}: {why}")
    for m, why in result.unavailable.items():
        err(f"metric {m} unavailable: {why}")
    for m, names in result.infinite.items():
        err(f"{len(names)} pairs have {m} = inf (identical images), left out of its mean: {', '.join(names[:5])}")
    if result.rows:
        try:
            write_csv(result, csv_path, overwrite=args.overwrite)
        except OSError as e:
            err(f"cannot write {csv_path}: {e}")
            return EXIT_FAILED
    print(format_summary(result, crop_border=args.crop_border, y_channel=not args.rgb))
    if result.rows:
        print(f"per-image values: {csv_path}")
    else:
        err("no image pairs were evaluated")
        return EXIT_FAILED
    return EXIT_FAILED if result.errors else EXIT_OK
