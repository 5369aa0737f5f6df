#!/usr/bin/env python
"""End-to-end one-step SR latency: VAE encode + UNet (t = 999) + decode, and the UNet alone.

    python benchmarks/bench_pipeline.py             # CPU: a reduced-size model; GPU: SD 2.1-base size
    python benchmarks/bench_pipeline.py --full-size # SD 2.1-base sizes on any device

Models are built from SD 2.1-base configs (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``, the
config dicts below) with random weights: latency does not depend on weight values, and nothing is
downloaded. Variants, timed in the same run (adapters on the UNet only; the VAE and a random text
embedding are shared by all):

- ``none``: no adapters (the floor);
- ``lora-r4``: dense LoRA rank 4 on the OSEDiff targets, unmerged (PEFT-style ``base + B(A x)``);
- ``mor:<backend>``: ``mor_model.inject_mor`` (8 shared + 32 routed, 4 zero slots, top-8, degradation
  routing) with each available ``mor_kernels`` backend;
- ``mor-folded:<backend>``: the same with the shared ranks folded into the base weights (``S = 0``:
  the routed ranks only, which is what folding leaves to compute), on the fastest backend;
- ``estimator``: the CLIP degradation estimator (ViT-L/14-sized random open_clip model; ViT-B/32 on
  the reduced size), text embeddings cached as in use.

Reports median / p20 / p80 latency, the ratio to ``none``, the weights of the models a call uses
(``weights_mb``) and the peak GPU memory a call adds on top of what was allocated before it
(``peak_act_mb``: activations and workspaces; all variants stay resident, so the absolute peak would
mix them) (CSV/JSON like
bench_mor_lora.py, into ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as common  # noqa: E402

import mor_kernels  # noqa: E402
from mor_kernels import dispatch  # noqa: E402

# SD 2.1-base (stabilityai/stable-diffusion-2-1-base) unet/config.json and vae/config.json, written out.
UNET_SD21 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE_SD21 = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# Reduced size for CPU runs: same block structure, narrower, one layer per block.
UNET_SMALL = dict(
    UNET_SD21, block_out_channels=(32, 64, 128, 128), layers_per_block=1, cross_attention_dim=64,
    attention_head_dim=(1, 2, 4, 4),
)  # fmt: skip
VAE_SMALL = dict(VAE_SD21, block_out_channels=(32, 64, 64, 64), layers_per_block=1)
ALPHA_BAR_999 = 0.0047  # SD's scaled-linear schedule at t = 999 (cumprod of 1 - beta), for x0 from eps


class LoRA(nn.Module):
    """Dense LoRA, unmerged (PEFT's layout): ``base(x) + lora_B(lora_A(x)) * scaling``; for a conv
    ``lora_A`` is a ``kxk`` conv to ``r`` channels (base stride/padding) and ``lora_B`` a 1x1 conv."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        self.base, self.scaling = base, 1.0
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.lora_A = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
            )
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        self.to(base.weight.device, base.weight.dtype)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(module: nn.Module, rank: int = 4) -> int:
    """Wraps every OSEDiff target Linear/Conv2d (groups 1) of ``module`` in :class:`LoRA`; returns the count."""
    from mor_model.config import OSEDIFF_UNET_TARGETS
    from mor_model.inject import match_target

    names = [
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        and getattr(m, "groups", 1) == 1
        and match_target(n, OSEDIFF_UNET_TARGETS)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, LoRA(getattr(owner, child), rank))
    return len(names)


def build(args, device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no "keep in float32" notes about random-weight models

    torch.manual_seed(0)
    unet_cfg, vae_cfg = (UNET_SD21, VAE_SD21) if args.full_size else (UNET_SMALL, VAE_SMALL)
    unet = UNet2DConditionModel(**unet_cfg).to(device, dtype).eval().requires_grad_(False)
    vae = AutoencoderKL(**vae_cfg).to(device, dtype).eval().requires_grad_(False)
    return unet, vae, unet_cfg


def variants(args, unet, device, dtype):
    """``{name: (unet, note)}``: the UNet with each adapter variant (deep copies of ``unet``)."""
    import mor_model

    out = {"none": (unet, "")}
    if "lora" in args.variants:
        lora_unet = copy.deepcopy(unet)
        n = add_lora(lora_unet, 4)
        out["lora-r4"] = (lora_unet, f"{n} layers")
    op_backends = [
        set(mor_kernels.available_backends(device, op, dtype)) for op in ("mor_linear", "mor_conv2d", "route")
    ]
    backends = [b for b in ("triton", "cuda", "cpp", "reference") if all(b in s for s in op_backends)]
    if device.type == "cpu" and "triton" in backends and "mor:triton" not in args.variants:
        backends.remove("triton")  # the CPU interpreter is a test path
    skipped = {
        b: dispatch.unavailable_reason(b, "mor_linear", device, dtype)
        or dispatch.unavailable_reason(b, "mor_conv2d", device, dtype)
        or "test path on CPU (name mor:triton in --variants)"
        for b in ("triton", "cuda", "cpp", "reference")
        if b not in backends
    }
    wanted = [b for b in backends if "mor" in args.variants or f"mor:{b}" in args.variants]
    for b in wanted:
        m = copy.deepcopy(unet)
        report = mor_model.inject_mor(m, mor_model.MoRConfig(backend=b))
        out[f"mor:{b}"] = (m, f"{len(report.replaced)} layers, {len(report.skipped)} skipped")
    if wanted and "folded" in args.variants:
        b = wanted[0]
        m = copy.deepcopy(unet)
        report = mor_model.inject_mor(m, mor_model.MoRConfig(num_shared=0, backend=b))
        out[f"mor-folded:{b}"] = (m, f"S=0, {len(report.replaced)} layers")
    return out, skipped


def estimator_model(args, device, dtype):
    from mor_model import DegradationEstimator

    est = DegradationEstimator.from_config("ViT-L-14" if args.full_size else "ViT-B-32")
    return est.to(device, dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--full-size", action="store_true", help="SD 2.1-base sizes (default on GPU only)")
    p.add_argument("--reduced", action="store_true", help="the reduced model even on a GPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="image side (default 512 full size, 128 reduced)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default bf16 GPU, fp32 CPU")
    p.add_argument(
        "--variants",
        default="lora,mor,folded,estimator",
        help="comma list: lora, mor (every backend), mor:<backend>, folded, estimator",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2 CPU, 1 GPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.full_size = args.full_size or (gpu and not args.reduced)
    args.resolution = args.resolution or (512 if args.full_size else 128)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.budget = args.budget or (0.5 if gpu else 0.6)
    args.rounds = args.rounds or (1 if gpu else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


FIELDS = ("variant", "part", "note", "status", "reason", "batch", "resolution", "dtype", "full_size", "timer",
          "median_ms", "p20_ms", "p80_ms", "samples", "ratio_to_none", "weights_mb", "peak_act_mb")  # fmt: skip
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> dict:
    threads = torch.get_num_threads()
    try:
        return _run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    import mor_model

    device, dtype = args.device, DTYPES[args.dtype]
    meta = common.environment(device)
    meta.update(batch=args.batch, resolution=args.resolution, dtype=args.dtype, full_size=args.full_size)
    size = "SD 2.1-base size" if args.full_size else "REDUCED size (UNet channels 32-128, VAE 32-64, 1 layer/block)"
    print(f"one-step SR pipeline on {device.type} ({meta['device_name']}), {size}, {args.resolution}px, B{args.batch}, "
          f"{args.dtype}; torch {meta['torch']}; commit {(meta['git_commit'] or '?')[:10]}", flush=True)  # fmt: skip
    load = meta.get("load_avg_1min")
    if load is not None and load > 0.75 * (meta["cpu_count"] or 1):
        print(f"WARNING: load average {load:.1f} on {meta['cpu_count']} cores: timings are noisy", flush=True)
    unet, vae, unet_cfg = build(args, device, dtype)
    models, skipped = variants(args, unet, device, dtype)
    gen = torch.Generator().manual_seed(0)
    lq = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=gen).to(device, dtype)
    latent_side = args.resolution // 8
    z = torch.randn(args.batch, 4, latent_side, latent_side, generator=gen).to(device, dtype)
    text = torch.randn(args.batch, 77, unet_cfg["cross_attention_dim"], generator=gen).to(device, dtype)
    scores = torch.rand(args.batch, 7, generator=gen).to(device)
    t = torch.full((args.batch,), 999, device=device)
    sf = VAE_SD21["scaling_factor"]

    def unet_fn(m):
        return lambda: m(z, t, text).sample

    def pipe_fn(m):
        def run():
            lat = vae.encode(lq * 2 - 1).latent_dist.mode() * sf
            eps = m(lat, t, text).sample
            x0 = (lat - (1 - ALPHA_BAR_999) ** 0.5 * eps) / ALPHA_BAR_999**0.5
            return vae.decode(x0 / sf).sample

        return run

    jobs = {}
    for name, (m, note) in models.items():
        jobs[(name, "unet")] = (unet_fn(m), m, note)
        jobs[(name, "pipeline")] = (pipe_fn(m), m, note)
    if "estimator" in args.variants:
        est = estimator_model(args, device, dtype)
        jobs[("estimator", "estimator")] = ((lambda: est(lq)), None, "ViT-L/14" if args.full_size else "ViT-B/32")

    def nbytes(*mods):
        return sum(t.numel() * t.element_size() for m in mods for t in [*m.parameters(), *m.buffers()]) / 1e6

    weights = {}
    for key, (_, m, _) in jobs.items():
        if key[1] == "unet":
            weights[key] = nbytes(m)
        elif key[1] == "pipeline":
            weights[key] = nbytes(m, vae)
        else:
            weights[key] = nbytes(est)
    rows = {key: {"variant": key[0], "part": key[1], "note": note, "status": "ok", "reason": ""}
            for key, (_, _, note) in jobs.items()}  # fmt: skip
    timings: dict = {key: [] for key in jobs}
    peak: dict = {}
    for rnd in range(args.rounds):
        for key, (fn, m, _) in jobs.items():
            if rows[key]["status"] != "ok":
                continue
            ctx = (
                mor_model.degradation(m, scores)
                if m is not None and mor_model.mor_layers(m)
                else contextlib.nullcontext()
            )
            try:
                with torch.no_grad(), ctx:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                    timings[key].append(common.time_fn(fn, device, budget_s=args.budget / args.rounds, warm=rnd > 0,
                                                       min_samples=max(2, 4 // args.rounds)))  # fmt: skip
                    if device.type == "cuda":
                        peak[key] = max(peak.get(key, 0), (torch.cuda.max_memory_allocated() - before) / 1e6)
            except Exception as err:  # one failing variant must not stop the others; the row says why
                rows[key].update(status="error", reason=f"{type(err).__name__}: {err}"[:300])
    for key, row in rows.items():
        row.update(batch=args.batch, resolution=args.resolution, dtype=args.dtype, full_size=args.full_size)
        row["peak_act_mb"] = peak.get(key)
        row["weights_mb"] = weights.get(key)
        if row["status"] == "ok":
            tm = common.merge(timings[key])
            row.update(timer=tm.timer, median_ms=tm.median_ms, p20_ms=tm.p20_ms, p80_ms=tm.p80_ms, samples=tm.samples)
    for key, row in rows.items():
        ref = rows.get(("none", key[1]))
        if row["status"] == "ok" and ref and ref["status"] == "ok":
            row["ratio_to_none"] = row["median_ms"] / ref["median_ms"]
    out_rows = list(rows.values())
    for b, why in skipped.items():
        out_rows.append({"variant": f"mor:{b}", "part": "-", "status": "unavailable", "reason": why})
    print(
        f"\n{'variant':22s} {'part':10s} {'median ms':>10s} {'p20-p80 ms':>17s} {'x none':>7s} {'weights MB':>10s} "
        f"{'peak+ MB':>8s}  note"
    )
    for r in out_rows:
        if r["status"] != "ok":
            print(f"{r['variant']:22s} {r['part']:10s} {r['status']}: {r['reason']}")
            continue
        ratio = f"{r['ratio_to_none']:.3f}" if r.get("ratio_to_none") else "-"
        mem = f"{r['peak_act_mb']:.0f}" if r.get("peak_act_mb") is not None else "-"
        print(f"{r['variant']:22s} {r['part']:10s} {r['median_ms']:10.2f} {r['p20_ms']:8.2f}-{r['p80_ms']:<8.2f} "
              f"{ratio:>7s} {r['weights_mb']:10.1f} {mem:>8s}  {r['note']}")  # fmt: skip
    if device.type != "cuda":
        print("peak+ (memory a call adds) is measured on CUDA devices only")
    stem = f"bench_pipeline-{device.type}-{meta['time_utc'].replace(':', '').replace('+0000', 'Z')}"
    paths = common.write_outputs(args.out, stem, meta, out_rows, FIELDS)
    print(f"wrote {paths['csv']} and {paths['json']}")
    return {"meta": meta, "rows": out_rows, "paths": paths}


if __name__ == "__main__":
    main()
