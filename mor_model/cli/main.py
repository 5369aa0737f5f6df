"""The ``mor-sr`` command line (also ``python -m mor_model``).

    mor-sr upscale INPUT... -o OUTDIR --model DIR [options]   super-resolve files and folders
    mor-sr route-stats INPUT... --model DIR [-o heatmap.png]  active ranks per MoR layer and image
    mor-sr eval --pred DIR --gt DIR [--metrics psnr,ssim,...] PSNR/SSIM (Y, border crop) + pyiqa metrics
    mor-sr train CONFIG [overrides]                           training (mor_model.train)
    mor-sr demo --model DIR|ID|tiny                           a local web page (Gradio) to try the model

Exit codes: 0 success; 1 some inputs failed (the others were processed); 2 bad arguments, or a model
or config that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import demo, route_stats, upscale
from . import eval as eval_cmd
from .common import EXIT_USAGE, err
from .shard import is_main_process

__all__ = ["build_parser", "main"]

COMMANDS = {"upscale": upscale.run, "route-stats": route_stats.run, "eval": eval_cmd.run, "demo": demo.run}


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

    upscale.add_parser(sub)
    route_stats.add_parser(sub)
    eval_cmd.add_parser(sub)
    demo.add_parser(sub)
    tr = sub.add_parser(
        "train",
        help="train the adapters (see `mor-sr train --help`)",
        add_help=False,
        description="Delegates to mor_model.train; run `mor-sr train --help` for its options.",
    )
    tr.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _train(argv: list[str]) -> int:
    try:
        from .train import main as train_main
    except ImportError as e:
        err(f"training is not available: {e} (install the extras: pip install 'mor-sr[model,train]')")
        return EXIT_USAGE
    return int(train_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mor-sr``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # everything after `train` belongs to the training parser
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    code = COMMANDS[args.command](args)
    if args.command not in ("eval", "demo") and code != EXIT_USAGE and is_main_process():  # once per team
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return code
