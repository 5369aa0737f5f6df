"""``mor-sr route-stats INPUT... --model DIR``: active ranks per MoR layer and image (table + heatmap)."""

from __future__ import annotations

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
    run_kwargs,
)
from .outputs import UsageError, check_output_files, write_output


def add_parser(sub) -> None:
    rs = sub.add_parser(
        "route-stats",
        help="active ranks per MoR layer for given images (table + heatmap PNG)",
        description="Runs the pipeline on each image and reports, per MoR layer, the active real ranks "
        "(shared + selected non-zero slots) per image: a table on stdout and a heatmap PNG (layers x images). "
        "-o and --json never name an input and replace nothing without --overwrite; both are written atomically.",
    )
    rs.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    rs.add_argument(
        "-o", "--output", default="route_stats.png", metavar="PNG", help="heatmap path (default route_stats.png)"
    )
    rs.add_argument("--json", metavar="FILE", help="also write the statistics as JSON")
    rs.add_argument("--overwrite", action="store_true", help="replace existing -o/--json files (never inputs)")
    rs.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    add_model_args(rs)
    add_run_args(rs)


def run(args) -> int:
    import json

    import torch

    from ..layers import mor_layers
    from ..sr.image_io import ImageReadError, collect_images
    from ..sr.job_check import ImageTooLargeError, load_checked
    from ..stats import RoutingStats, routing_stats, save_routing_heatmap

    collected = collect_images(args.inputs, recursive=args.recursive)
    try:  # every usage error before the model is loaded or an image is read
        problem = check_args(args)
        if problem:
            raise UsageError(problem)
        outputs = check_output_files(
            {"-o": args.output, "--json": args.json},
            inputs=collected.files,
            input_trees=input_trees(args),
            overwrite=args.overwrite,
        )
        try:
            import matplotlib  # noqa: F401 - the heatmap needs it; find out now, not after the model ran
        except ImportError:
            raise UsageError(
                "the heatmap (-o) needs matplotlib, which is not installed: pip install 'mor-sr[model]' "
                "(or pip install matplotlib)"
            ) from None
    except ValueError as e:  # UsageError included
        err(str(e))
        return EXIT_USAGE
    failures = 0
    for path, why in collected.errors:
        err(f"skipping {path}: {why}")
        failures += 1
    if not collected.files:
        err("no images to analyse")
        return EXIT_USAGE
    try:
        pipe = load_pipeline(args)
    except (FileNotFoundError, ValueError, TypeError, OSError) as e:
        err(f"cannot load the model: {e}")
        return EXIT_USAGE
    if not (mor_layers(pipe.unet) or mor_layers(pipe.vae)):
        err("this model has no MoR layers (no adapter loaded): nothing to report")
        return EXIT_USAGE
    parts = [("unet", pipe.unet), ("vae", pipe.vae)]
    names, columns, severities, slots, max_ranks = [], [], [], {}, {}
    layer_names = None
    for path in collected.files:
        try:  # the declared size first: an image that cannot fit is skipped before it is decoded
            img = load_checked(pipe, path, **memory_options(args))
        except ImageTooLargeError as e:
            err(f"skipping {path}: {e}")
            failures += 1
            continue
        except Exception as e:  # noqa: BLE001
            err(f"skipping unreadable image {path}: {e.reason if isinstance(e, ImageReadError) else e}")
            failures += 1
            continue
        for _, m in parts:
            for layer in mor_layers(m).values():
                layer.router.clear_state()
        try:
            scores = pipe.degradation_scores(img[None])  # once, for the routing and the table
            pipe(img[None], scores=scores, **run_kwargs(args))
        except Exception as e:  # noqa: BLE001 - this image fails, the others are still analysed
            err(f"failed on {path}: {type(e).__name__}: {e}")
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
        err("no readable images")
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
    try:
        write_output(
            outputs["-o"],
            lambda tmp: save_routing_heatmap(
                stats, tmp, title="active real ranks (columns: images in the order above)"
            ),
            overwrite=args.overwrite,
        )
        print(f"heatmap: {outputs['-o']}")
        if "--json" in outputs:
            data = stats.to_dict()
            data.update({"images": names, "severity": severities})
            write_output(
                outputs["--json"], lambda tmp: tmp.write_text(json.dumps(data, indent=1)), overwrite=args.overwrite
            )
            print(f"json: {outputs['--json']}")
    except OSError as e:
        err(f"cannot write the results: {e}")
        return EXIT_FAILED
    return EXIT_FAILED if failures else EXIT_OK
