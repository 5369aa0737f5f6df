"""``mor-sr train CONFIG [overrides]``: the training command (the trainer is :mod:`mor_model.train`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from ..train.checkpoints import OutputDirInUse, conflicting_outputs, refusal
from ..train.config import OSEDIFF_NEGATIVE_PROMPT, load_config, missing_sources
from .outputs import UsageError, check_output_folder, same_file

__all__ = ["CONFIG_HELP", "build_parser", "main"]

CONFIG_HELP = """\
CONFIG (JSON; YAML with PyYAML; relative paths are relative to the file). Required keys: model,
output_dir, data.hr. Example with every default spelled out:

  {"model": "sd21-base",              # diffusers dir: unet/ vae/ text_encoder/ tokenizer/ scheduler/
   "output_dir": "runs/mor-x4",
   "data": {"hr": ["LSDIR/HR", "ffhq10k.txt"], "crop_size": 512, "scale": 4, "flip": true,
            "degradation": "realesrgan", "degradation_options": {}, "num_workers": 4},
   "adapter": null,                   # start from this MoR adapter dir (default: model/mor_adapter if present)
   "mor": null,                       # or: MoRConfig fields of a fresh UNet adapter, e.g. {"num_shared": 8}
   "clip": null,                      # degradation CLIP dir (default: model/degradation_clip)
   "vae_adapter": "lora", "vae_lora_rank": 4,    # "lora" | "mor" (model/vae_encoder_adapter) | "none"
   "prompt": "", "timestep": 999, "backend": "auto",
   "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 25000,
   "learning_rate": 5e-5, "lr_schedule": "constant", "warmup_steps": 0,   # constant | warmup | cosine
   "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.01,
   "max_grad_norm": 1.0, "mixed_precision": "no", "gradient_checkpointing": false, "seed": 0,
   "losses": {"l2": 1.0, "lpips": 2.0, "balance": 1.0},   # or by name with default weights (vsd 1, gan 0.5):
                                                          # "l2,lpips,vsd,gan,balance" = the full objective
   "lpips": {"net": "vgg", "backbone_weights": null,    # a local torchvision vgg16/alexnet file,
             "linear_weights": null, "allow_missing": false},  # e.g. "weights/vgg16-397923af.pth"
   "vsd": {"t_min": 20, "t_max": 980, "guidance_scale": 7.5,      # OSEDiff's VSD (with losses.vsd > 0)
           "negative_prompt": NEGATIVE_PROMPT,
           "lora_rank": 4, "lora_alpha": 8.0, "learning_rate": null},   # fake-score LoRA; null lr: learning_rate
   "gan": {"loss": "non_saturating", "t_min": 20, "t_max": 980,   # or "hinge" (with losses.gan > 0)
           "head_channels": 128, "learning_rate": null},
   "checkpoint_every": 500, "keep_checkpoints": 3, "log_every": 1, "layer_stats_every": 1,
   "resume": null, "overwrite": false, "cpu": false}

Outputs: output_dir/checkpoints/step-N/ (adapters + optimizer/scheduler/RNG state), output_dir/final/
(mor_adapter/, vae_encoder_adapter/: `mor-sr upscale --model MODEL --adapter output_dir/final/mor_adapter
--vae-adapter output_dir/final/vae_encoder_adapter`), output_dir/train_log.jsonl (one JSON line per step).
Several processes: `accelerate launch --num_processes N -m mor_model train CONFIG` (on a machine without
GPUs add --multi_gpu, which makes accelerate start N processes; they train on the CPU with gloo).
""".replace("NEGATIVE_PROMPT", json.dumps(OSEDIFF_NEGATIVE_PROMPT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mor-sr train",
        description="Train the MoR adapters (UNet) and the VAE-encoder LoRA of the one-step SR model. "
        "Launch on several GPUs with `accelerate launch -m mor_model train CONFIG`.",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG", help="training config (.json, or .yaml/.yml with PyYAML)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--max-steps", type=int, help="override max_steps (optimiser steps)")
    p.add_argument("--batch-size", type=int, help="override batch_size (per process)")
    p.add_argument("--learning-rate", "--lr", type=float, dest="learning_rate", help="override learning_rate")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="override mixed_precision")
    p.add_argument(
        "--resume",
        action="store_const",
        const="latest",
        help="resume from the newest complete checkpoint in output_dir/checkpoints (a fresh start if there is none)",
    )
    p.add_argument("--resume-from", metavar="CHECKPOINT_DIR", help="resume from this checkpoint directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start although output_dir holds an earlier run: its checkpoints, log and final/ are deleted "
        "(with --resume-from: only the checkpoints after the one resumed); without it such a start is refused",
    )
    p.add_argument("--cpu", action="store_true", default=None, help="train on the CPU")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.crop_size=256 --set losses.lpips=0 (VALUE is JSON or a string)",
    )
    p.add_argument(
        "--check", action="store_true", help="validate the config and its input paths (model, data.hr...), then exit"
    )
    return p


def check_train_paths(cfg) -> None:
    """The inputs exist (:func:`mor_model.train.config.missing_sources`) and the run's outputs (under
    ``output_dir``: checkpoints/, final/, the logs; ``--overwrite`` deletes them) hold no input (the output
    rules of :mod:`mor_model.cli.outputs`); ``UsageError`` with every problem otherwise."""
    from ..train.log import LAYERS_NAME, LOG_NAME

    problems = missing_sources(cfg)
    try:
        check_output_folder("output_dir", cfg.output_dir)
    except UsageError as e:
        problems.append(str(e))
    out = Path(cfg.output_dir)
    written = [out / "checkpoints", out / "final", out / LOG_NAME, out / LAYERS_NAME]
    inputs = [("model", cfg.model), ("adapter", cfg.adapter), ("clip", cfg.clip)]
    inputs += [("data.hr", src) for src in cfg.data.hr]
    for key, value in inputs:
        if value is None:
            continue
        for w in written:
            if same_file(value, w) or Path(value).resolve().is_relative_to(w.resolve()):
                problems.append(f"{key} {value} lies in {w}, which this run writes (and --overwrite deletes)")
    if problems:
        raise UsageError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    """``mor-sr train CONFIG [overrides]``; returns the exit code (0 ok, 2 bad config or missing files)."""
    args = build_parser().parse_args(argv)
    overrides = {
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "mixed_precision": args.mixed_precision,
        "cpu": args.cpu,
        "output_dir": os.path.abspath(args.output_dir) if args.output_dir else None,
        "resume": os.path.abspath(args.resume_from) if args.resume_from else args.resume,
        "overwrite": args.overwrite,
    }
    try:
        cfg = load_config(args.config, overrides=overrides, sets=args.set)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"mor-sr train: error: {e}", file=sys.stderr)
        return 2
    try:
        check_train_paths(cfg)
    except UsageError as e:
        print(f"mor-sr train: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    conflicts = conflicting_outputs(cfg)
    if conflicts and not cfg.overwrite:  # before the (slow) model loading
        print(f"mor-sr train: error: {refusal(cfg, conflicts)}", file=sys.stderr)
        return 2
    from ..train.loop import Trainer
    from ..train.losses import LPIPSWeightsError

    try:
        trainer = Trainer(cfg)
    except (LPIPSWeightsError, FileNotFoundError, ValueError) as e:
        print(f"mor-sr train: error: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*upsample_bicubic2d.*")
        try:
            trainer.train()
        except OutputDirInUse as e:
            print(f"mor-sr train: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
