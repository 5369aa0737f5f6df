#!/usr/bin/env python
"""One training step of the full objective at SD 2.1-base size: time per step and peak GPU memory.

    python benchmarks/bench_train_step.py                 # SD 2.1-base size, 512 px, bf16, batch 1, all terms
    python benchmarks/bench_train_step.py --reduced       # the reduced UNet/VAE of bench_pipeline.py (CPU-friendly)
    python benchmarks/bench_train_step.py --batch 4 --no-checkpointing --losses l2,lpips,balance

What runs: ``mor_model.train.Trainer.train_step`` (the generator update with L2 + LPIPS-VGG + VSD + GAN +
balance, then the fake-score update, then the discriminator update: three backward passes and three
AdamW steps), on a model directory written to a temporary folder with random weights: the UNet and VAE
from the SD 2.1-base configs (``bench_pipeline.UNET_SD21``/``VAE_SD21``), a fresh MoR adapter with the
default ``MoRConfig`` (8 shared + 32 routed ranks, 4 zero slots, top-8), the plain rank-4 VAE-encoder
LoRA, a one-layer text encoder of SD 2.1's width (1024; the prompts are encoded once, before training,
so its size does not matter), the tiny degradation CLIP of ``mor_model.testing`` (SD 2.1 training uses
a CLIP ViT; its forward runs once per step without gradient) and an LPIPS VGG16 with random weights.
Step time and memory do not depend on the weight values. Nothing is downloaded.

Reports, per step after the first (warm-up), the median wall time (CUDA synchronised), and the peak of
``torch.cuda.max_memory_allocated`` over all steps, with what is allocated before the first step
(weights, adapters; the optimiser states appear at the first step); on a CPU the process's peak RSS.
Writes CSV/JSON to ``benchmarks/out`` like the other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as common  # noqa: E402
from bench_pipeline import UNET_SD21, UNET_SMALL, VAE_SD21, VAE_SMALL  # noqa: E402

FIELDS = ("losses", "batch", "resolution", "mixed_precision", "checkpointing", "full_size", "backend",
          "backend_note", "steps", "median_step_s", "first_step_s", "peak_mem_gib", "peak_mem_kind",
          "resident_before_gib", "unet_params", "adapter_params", "fake_score_params", "head_params")  # fmt: skip


def write_model(root: Path, full_size: bool, device: torch.device) -> Path:
    """A random-weight model directory (see the module docstring) under ``root``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mor_model.testing import tiny_model

    tiny_model(root)  # tokenizer, scheduler config, degradation CLIP, a tiny text encoder
    unet_cfg, vae_cfg = (UNET_SD21, VAE_SD21) if full_size else (UNET_SMALL, VAE_SMALL)
    width = unet_cfg["cross_attention_dim"]
    text_cfg = CLIPTextConfig.from_pretrained(root / "text_encoder")
    text_cfg.update({"hidden_size": width, "projection_dim": width, "num_attention_heads": 16, "num_hidden_layers": 1})
    for sub in ("mor_adapter", "vae_encoder_adapter", "unet", "vae", "text_encoder"):
        shutil.rmtree(root / sub)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds, on the CPU a minute at SD size
        UNet2DConditionModel(**unet_cfg).to(torch.bfloat16).save_pretrained(root / "unet")
        AutoencoderKL(**vae_cfg).save_pretrained(root / "vae")
    CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder")
    return root


def write_data(root: Path, resolution: int) -> tuple[Path, Path]:
    """Two HR images of ``resolution`` px and a random-weight torchvision VGG16 checkpoint for LPIPS."""
    import torchvision
    from PIL import Image

    hr = root / "hr"
    hr.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        img = (torch.rand(3, resolution // 16, resolution // 16, generator=gen) * 255).to(torch.uint8)
        big = torch.nn.functional.interpolate(img[None].float(), size=(resolution, resolution), mode="bilinear")
        Image.fromarray(big[0].clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(hr / f"{i}.png")
    vgg = root / "vgg16-random.pth"
    features = torchvision.models.vgg16(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
    return hr, vgg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="the reduced UNet/VAE (default: SD 2.1-base size)")
    p.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    p.add_argument("--resolution", type=int, default=512, help="HR crop side in px (default 512)")
    p.add_argument("--steps", type=int, default=4, help="steps to run, the first one is a warm-up (default 4)")
    p.add_argument("--losses", default="l2,lpips,vsd,gan,balance", help="the loss terms (default: all)")
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    p.add_argument("--no-checkpointing", action="store_true", help="without the UNet's gradient checkpointing")
    p.add_argument("--backend", default="auto", help="mor_kernels backend of the adapters (default auto)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    if args.steps < 2 or args.batch < 1 or args.resolution % 64:
        p.error("--steps must be >= 2, --batch >= 1, --resolution a multiple of 64")
    return args


def main(argv=None) -> dict:
    from mor_kernels import dispatch
    from mor_model.train.config import TrainConfig
    from mor_model.train.log import peak_memory_mb
    from mor_model.train.loop import Trainer

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = common.environment(device)
    with tempfile.TemporaryDirectory(prefix="bench_train_step-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model = write_model(root / "model", not args.reduced, device)
        hr, vgg = write_data(root, args.resolution)
        print(f"wrote the random-weight model and data in {time.perf_counter() - t0:.0f} s", flush=True)
        cfg = TrainConfig.from_dict({
            "model": str(model), "output_dir": str(root / "run"), "backend": args.backend,
            "data": {"hr": [str(hr)], "crop_size": args.resolution, "degradation": "bicubic", "num_workers": 0},
            "batch_size": args.batch, "max_steps": args.steps, "losses": args.losses,
            "lpips": {"net": "vgg", "backbone_weights": str(vgg)}, "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": not args.no_checkpointing,
        })  # fmt: skip
        trainer = Trainer(cfg)
        ds = trainer.dataloader().dataset
        lq, hr_t = (torch.stack(t).to(device) for t in zip(*[ds[i % 2] for i in range(args.batch)], strict=True))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
        times = []
        trainer.model.train()
        for step in range(args.steps):
            sync()
            t = time.perf_counter()
            values, _ = trainer.train_step(lq, hr_t)
            sync()
            times.append(time.perf_counter() - t)
            print(
                f"step {step + 1}: {times[-1]:.3f} s  " + " ".join(f"{k} {v:.4g}" for k, v in values.items()),
                flush=True,
            )
        peak_mb, peak_kind = peak_memory_mb(device)  # CUDA: max allocated; CPU: the process's peak RSS
        peak = peak_mb / 1024
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
        choice = dispatch.resolve("mor_linear", args.backend, device, dtype)
        obj = trainer.objective
        count = lambda m: None if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
        row = {
            "losses": args.losses, "batch": args.batch, "resolution": args.resolution,
            "mixed_precision": args.mixed_precision, "checkpointing": not args.no_checkpointing,
            "full_size": not args.reduced, "backend": choice.backend,
            "backend_note": "; ".join(f"not {b}: {why}" for b, why in choice.skipped),
            "steps": args.steps, "median_step_s": statistics.median(times[1:]), "first_step_s": times[0],
            "peak_mem_gib": peak, "peak_mem_kind": peak_kind, "resident_before_gib": resident,
            "unet_params": sum(p.numel() for n, p in trainer.model.unet.named_parameters() if not p.requires_grad),
            "adapter_params": sum(p.numel() for p in trainer.params.values()),
            "fake_score_params": count(obj and obj.psi), "head_params": count(obj and obj.heads),
        }  # fmt: skip
    size = "SD 2.1-base size" if not args.reduced else "reduced size"
    print(f"{size}, {args.resolution} px, batch {args.batch}, {args.mixed_precision}, losses {args.losses}, "
          f"checkpointing {not args.no_checkpointing} on {meta['device_name']}: "
          f"median step {row['median_step_s']:.3f} s "
          f"(first {row['first_step_s']:.3f} s), peak memory {peak:.2f} GiB ({peak_kind}) "
          f"(resident before the first step {resident if resident is None else round(resident, 2)} GiB); "
          f"backend {row['backend']}")  # fmt: skip
    stem = f"bench_train_step-{device.type}-{meta['time_utc'].replace(':', '').replace('+0000', 'Z')}"
    paths = common.write_outputs(args.out, stem, meta, [row], FIELDS)
    print(f"wrote {paths['csv']} and {paths['json']}")
    return {"meta": meta, "row": row, "paths": paths}


if __name__ == "__main__":
    main()
