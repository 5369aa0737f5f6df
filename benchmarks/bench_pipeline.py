#!/usr/bin/env python
"""End-to-end one-step SR latency: the real ``mor_model.sr.pipeline.MoRSRPipeline`` call, the UNet alone and
the degradation estimator alone.

    python benchmarks/bench_pipeline.py             # CPU: a reduced-size model; GPU: SD 2.1-base size
    python benchmarks/bench_pipeline.py --full-size # SD 2.1-base sizes on any device

Models are built from SD 2.1-base configs (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``, the
config dicts below; a random open_clip CLIP for the estimator) with random weights: latency does not
depend on weight values, and nothing is downloaded. Adapters are put on in float32 and the models then
cast to the run's dtype, as ``MoRSRPipeline.from_pretrained`` does; the estimator stays float32.

Parts, each timed for every variant in the same run (variants of a part interleaved):

- ``pipeline``: ``MoRSRPipeline(...)(lq, scale=4, tile=0)``: bicubic upscale, the degradation estimator
  (only when an adapter routes on it, as in the pipeline), VAE encode (with the VAE-encoder adapter),
  one UNet pass at t = 999, VAE decode, colour fix (AdaIN). The prompt embedding is cached by the
  pipeline, so the text encoder (a fixed random embedding here) is not in the timed calls;
- ``unet``: the UNet alone at t = 999 (degradation scores set once, outside the timed calls);
- ``unet-graph``: on a CUDA run, the same calls captured in a CUDA graph and replayed (``bench_common.time_cuda``
  with ``use_graph``): the device time alone, without the host's launch overhead. Next to ``unet`` it says
  whether a variant is host-bound at this batch (a MoR UNet calls 258 MoR layers, each with some Python per
  call): ``unet`` over ``unet-graph`` near 1 means device-bound. The MoR variants replay one image's routing
  (prepared by the warm-up calls before the capture), as a graphed pipeline would per image; a capture that
  fails makes an ``error`` row saying why (``--no-graphs`` skips the part). Variants ``none``, ``lora-r4``,
  ``mor:auto`` and the folded ones only (:data:`GRAPHED`: each capture costs time);
- ``estimator``: the CLIP degradation estimator alone, float32 (ViT-L/14-sized; ViT-B/32 reduced);
- ``unet-sd21``: on a CPU run (``--sd21-latent``, default 32), the SD 2.1-base UNet at its real sizes at a
  small latent (32x32: 258 MoR layers at the widths that matter, in a few minutes on 2 cores), float32:
  ``none``, ``lora-r4``, ``mor:auto`` (a MoR model as loaded: per-image routing, merged weights where the
  cost model says so), ``mor-lowrank:auto`` (``set_merge(unet, "never")``) and ``mor-folded:auto``. Every
  MoR call sets the scores first (``set_degradation``), so each call pays what one image pays: the
  routing, the rank factors and the merged weights are made in the timed call. On one thread this part
  is timed in user CPU time: each forward here also spends 0.4-1.2 s in the kernel on ~300k page faults
  (oneDNN's per-call conv weight reorders, the same in every variant, varying with the host), which
  swamped the ratios in process time.

Variants:

- ``none``: no adapters (the floor);
- ``lora-r4``: dense LoRA rank 4, unmerged (PEFT-style ``base + B(A x)``) on the OSEDiff UNet targets
  and on the VAE encoder (OSEDiff-like);
- ``mor:<backend>``: ``mor_model.inject_mor`` on the UNet (8 shared + 32 routed, 4 zero slots, top-8,
  degradation routing) and the VAE-encoder adapter the trainer writes by default (a plain rank-4 LoRA
  stored as a MoR adapter, ``mor_model.train.model.VAE_LORA_TARGETS``), with ``backend="auto"`` (what a
  model gets by default, ``mor:auto``) and each available backend;
- ``mor-folded:<backend>``: the same after ``mor_model.merge.fold_shared_ranks`` on both (what
  ``from_pretrained(fold_shared=True)`` does), on the fastest backend.

Reports median / p20 / p80 latency, the ratio to ``none`` for the same part (of the medians; on a CPU also
``paired_ratio``: the median over the interleaved rounds of each round's ratio, which a drift of a shared
machine moves less, ``bench_common.paired_ratio``), the weights of the
models a call uses (``weights_mb``) and the peak GPU memory a call adds on top of what was allocated
before it (``peak_act_mb``: activations and workspaces; the L2-flush buffer is allocated before any
measurement; all variants stay resident, so the absolute peak would mix them) (CSV/JSON like
bench_mor_lora.py, into ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
from types import SimpleNamespace

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
SCALE = 4  # the pipeline's default upscale: LQ side = resolution / 4
PARTS = ("pipeline", "unet", "estimator")


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


def add_lora(module: nn.Module, rank: int = 4, targets=None) -> int:
    """Wraps every Linear/Conv2d (groups 1) of ``module`` matching ``targets`` (default the OSEDiff UNet
    targets) in :class:`LoRA`; returns the count."""
    from mor_model.config import OSEDIFF_UNET_TARGETS
    from mor_model.inject import match_target

    targets = OSEDIFF_UNET_TARGETS if targets is None else targets
    names = [
        n
        for n, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1 and match_target(n, targets)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, LoRA(getattr(owner, child), rank))
    return len(names)


def vae_adapter_config(backend: str):
    """The VAE-encoder adapter ``mor-sr train`` writes by default (``vae_adapter: lora``, rank 4): every
    rank always on (3 shared + 1 routed, no zero slot, top-1) on ``VAE_LORA_TARGETS``."""
    from mor_model import MoRConfig
    from mor_model.train.model import VAE_LORA_TARGETS

    return MoRConfig(num_shared=3, num_routed=1, num_zero=0, top_k=1, target_modules=VAE_LORA_TARGETS, backend=backend)


class FixedPrompt(nn.Module):
    """Text-encoder stand-in: a fixed random ``(1, 77, D)`` embedding for any ids. The pipeline encodes
    the prompt once and caches it, so the text encoder never runs in the timed calls."""

    def __init__(self, dim: int, length: int = 77):
        super().__init__()
        self.register_buffer("embeds", torch.randn(1, length, dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, ids):
        return (self.embeds.expand(ids.shape[0], -1, -1),)


class FixedTokenizer:
    """Tokenizer stand-in for :class:`FixedPrompt`: zeros of the CLIP length for any text."""

    model_max_length = 77

    def __call__(self, texts, **_):
        return SimpleNamespace(input_ids=torch.zeros(len(texts), self.model_max_length, dtype=torch.long))


def build(args, device):
    """The float32 UNet and VAE (random weights, on ``device``) and the UNet config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no "keep in float32" notes about random-weight models

    torch.manual_seed(0)
    unet_cfg, vae_cfg = (UNET_SD21, VAE_SD21) if args.full_size else (UNET_SMALL, VAE_SMALL)
    unet = UNet2DConditionModel(**unet_cfg).to(device).eval().requires_grad_(False)
    vae = AutoencoderKL(**vae_cfg).to(device).eval().requires_grad_(False)
    return unet, vae, unet_cfg


def mor_backends(args, device, dtype) -> tuple[list[str], dict[str, str]]:
    """The MoR backends to time (fastest first) and why the others are left out."""
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
    if "mor" in args.variants or "mor:auto" in args.variants:
        wanted.insert(0, "auto")  # what a model gets by default: auto's backend, per-image routing and merging
    return wanted, skipped


def variants(args, unet, vae, device, dtype):
    """``{name: (unet, vae, (unet note, vae note))}``: each adapter variant on deep copies of the float32 ``unet``/``vae``,
    then cast to ``dtype`` (adapters put on and shared ranks folded in float32, as ``from_pretrained``)."""
    import mor_model
    from mor_model.merge import fold_shared_ranks

    out = {"none": (unet, vae, ("", ""))}
    if "lora" in args.variants:
        u, v = copy.deepcopy(unet), copy.deepcopy(vae)
        from mor_model.train.model import VAE_LORA_TARGETS

        n_unet, n_vae = add_lora(u, 4), add_lora(v, 4, VAE_LORA_TARGETS)
        out["lora-r4"] = (u, v, (f"LoRA r4 on {n_unet} layers", f"LoRA r4 on {n_vae} encoder layers"))
    wanted, skipped = mor_backends(args, device, dtype)
    for b in wanted:
        u, v = copy.deepcopy(unet), copy.deepcopy(vae)
        ru = mor_model.inject_mor(u, mor_model.MoRConfig(backend=b))
        rv = mor_model.inject_mor(v, vae_adapter_config(b))
        as_trained(u), as_trained(v)
        notes = (f"MoR on {len(ru.replaced)} layers ({len(ru.skipped)} skipped)", f"rank-4 MoR adapter on "
                 f"{len(rv.replaced)} encoder layers")  # fmt: skip
        out[f"mor:{b}"] = (u, v, notes)
    if wanted and "folded" in args.variants:
        b = wanted[0]
        u, v = copy.deepcopy(out[f"mor:{b}"][0]), copy.deepcopy(out[f"mor:{b}"][1])
        fu, fv = fold_shared_ranks(u), fold_shared_ranks(v)
        out[f"mor-folded:{b}"] = (u, v, (f"fold_shared_ranks on {len(fu)} layers, S=0", f"folded, {len(fv)} layers"))
    cast = {}
    for name, (u, v, note) in out.items():
        # nn.Module.to, as from_pretrained: diffusers' override warns about fp32-kept modules
        cast[name] = (nn.Module.to(u, dtype=dtype), nn.Module.to(v, dtype=dtype), note)
    return cast, skipped


def as_trained(model: nn.Module) -> nn.Module:
    """Draws ``lora_b`` of every MoR layer under ``model`` as if trained (``inject_mor`` starts B at zero, which
    would make every adapter a no-op and its cost the only thing left to see)."""
    import mor_model

    for layer in mor_model.mor_layers(model).values():
        nn.init.normal_(layer.lora_b, std=0.02)
    return model


def sd21_unet(side: int, batch: int, device) -> tuple[nn.Module, tuple, torch.Tensor]:
    """The SD 2.1-base UNet at its real sizes (random weights, seed 0, eval, float32) with its inputs at a
    ``side`` x ``side`` latent: ``(unet, (z, t, text embeddings), degradation scores)``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_SD21).to(device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(batch, 4, side, side, generator=gen).to(device)
    embeds = torch.randn(batch, 77, UNET_SD21["cross_attention_dim"], generator=gen).to(device)
    t = torch.full((batch,), 999, device=device, dtype=torch.long)
    scores = torch.rand(batch, 7, generator=gen).to(device)
    return unet, (z, t, embeds), scores


def sd21_unet_jobs(args, device) -> tuple[dict, dict, dict]:
    """The ``unet-sd21`` part: ``({variant: fn}, {variant: note}, {variant: weights MB})`` for the SD 2.1-base
    UNet at its real sizes at a ``--sd21-latent`` latent, batch ``--batch``, float32 (see the module
    docstring). The variants share the base weights (one copy in memory)."""
    import mor_model

    side = args.sd21_latent
    unet, (z, t, embeds), scores = sd21_unet(side, args.batch, device)
    shared = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    models, notes = {"none": unet}, {"none": f"SD 2.1-base UNet, latent {side}x{side}"}
    if "lora" in args.variants:
        models["lora-r4"] = copy.deepcopy(unet, dict(shared))
        notes["lora-r4"] = f"LoRA r4 on {add_lora(models['lora-r4'], 4)} layers"
    if "mor" in args.variants or "mor:auto" in args.variants:
        mor = copy.deepcopy(unet, dict(shared))
        report = mor_model.inject_mor(mor, mor_model.MoRConfig())
        models["mor:auto"] = as_trained(mor)
        notes["mor:auto"] = f"MoR on {len(report.replaced)} layers, merge='auto'"
        lowrank = copy.deepcopy(mor, dict(shared))
        mor_model.set_merge(lowrank, "never")
        models["mor-lowrank:auto"], notes["mor-lowrank:auto"] = lowrank, "the same, merge='never' (low-rank path)"
        if "folded" in args.variants:
            folded = copy.deepcopy(mor, dict(shared))
            notes["mor-folded:auto"] = f"fold_shared_ranks on {len(mor_model.merge.fold_shared_ranks(folded))} layers"
            models["mor-folded:auto"] = folded

    def job(u):
        if not mor_model.mor_layers(u):
            return lambda: u(z, t, encoder_hidden_states=embeds).sample

        def call():
            mor_model.set_degradation(u, scores)  # a new image: its routing and merged weights are made again
            return u(z, t, encoder_hidden_states=embeds).sample

        return call

    return {n: job(u) for n, u in models.items()}, notes, {n: _nbytes(u) for n, u in models.items()}


def estimator_model(args, device):
    """The degradation estimator, float32 (the pipeline never casts it)."""
    from mor_model import DegradationEstimator

    if args.clip == "tiny":
        from mor_model.testing import TINY_CLIP_CONFIG

        cfg = TINY_CLIP_CONFIG
    else:
        cfg = args.clip or ("ViT-L-14" if args.full_size else "ViT-B-32")
    return DegradationEstimator.from_config(cfg).to(device).eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--full-size", action="store_true", help="SD 2.1-base sizes (default on GPU only)")
    p.add_argument("--reduced", action="store_true", help="the reduced model even on a GPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--resolution", type=int, default=None, help="output side (default 512 full size, 128 reduced); LQ = it / 4"
    )
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default bf16 GPU, fp32 CPU")
    p.add_argument(
        "--variants",
        default="lora,mor,folded,estimator",
        help="comma list: lora, mor (every backend), mor:<backend>, folded, estimator (the estimator alone)",
    )
    p.add_argument("--clip", default=None, help="open_clip model name of the estimator (default ViT-L-14 / ViT-B-32)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--min-samples", type=int, default=5, help="CPU: samples per job at least")
    p.add_argument("--rounds", type=int, default=None, help="GPU: interleaved rounds (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1; 0 = torch's default)")
    p.add_argument(
        "--sd21-latent",
        type=int,
        default=None,
        help="CPU: also time the SD 2.1-base UNet at real sizes at this latent side (default 32; 0 = skip)",
    )
    p.add_argument("--no-graphs", action="store_true", help="CUDA: skip the unet-graph part (CUDA graph replays)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.full_size = args.full_size or (gpu and not args.reduced)
    args.resolution = args.resolution or (512 if args.full_size else 128)
    if args.resolution % SCALE:
        raise SystemExit(f"--resolution must be a multiple of {SCALE}, got {args.resolution}")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.budget = args.budget or (0.5 if gpu else 0.3)
    if args.sd21_latent is None:
        args.sd21_latent = 0 if gpu or args.full_size else 32
    if args.sd21_latent % 8:
        raise SystemExit(f"--sd21-latent must be a multiple of 8 (the UNet's factor), got {args.sd21_latent}")
    args.rounds = args.rounds or 1
    args.threads_note = common.threads_note(args.threads, gpu)
    return args


#: the variants of the unet-graph part (with every ``mor-folded:*``): each capture costs warm-up calls and a
#: graph per variant, and gpu_check gives the whole script a fixed time
GRAPHED = ("none", "lora-r4", "mor:auto")


def graphed_jobs(unet_jobs: dict) -> dict:
    """The ``unet`` part's jobs the ``unet-graph`` part times: what a model runs by default, folded, the floors."""
    return {k: fn for k, fn in unet_jobs.items() if k in GRAPHED or k.startswith("mor-folded:")}


FIELDS = ("variant", "part", "note", "status", "reason", "batch", "resolution", "dtype", "full_size", "timer",
          "median_ms", "p20_ms", "p80_ms", "samples", "ratio_to_none", "paired_ratio", "weights_mb", "peak_act_mb",
          "latent")  # fmt: skip
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> dict:
    threads = torch.get_num_threads()
    try:
        return _run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _nbytes(*mods) -> float:
    return sum(t.numel() * t.element_size() for m in mods for t in [*m.parameters(), *m.buffers()]) / 1e6


def time_jobs(jobs: dict, device, args, clock=None, use_graph: bool = False) -> tuple[dict, dict]:
    """Times ``{key: fn}`` (no grad); returns ``({key: Timing or exception}, {key: peak MB added})``.
    CPU: interleaved sample by sample (``clock``: the sample clock, default ``common.cpu_clock()``); CUDA: job
    after job (``args.rounds`` rounds), the peak memory a call adds over what was allocated before it;
    ``use_graph``: CUDA graph replays, and a job whose capture failed (timed eagerly by ``time_cuda``) is an
    error saying so rather than an eager time in a graph row."""
    if device.type != "cuda":
        with torch.no_grad():
            fns = {k: (fn, ()) for k, fn in jobs.items()}
            tm = common.time_cpu_interleaved(fns, budget_s=args.budget, min_samples=args.min_samples, clock=clock)
            return tm, {}
    out: dict = {k: [] for k in jobs}
    peak: dict = {}
    for _ in range(args.rounds):
        for key, fn in jobs.items():
            if isinstance(out[key], Exception):
                continue
            try:
                with torch.no_grad():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    tm = common.time_fn(fn, device, budget_s=args.budget / args.rounds, use_graph=use_graph)
                    if use_graph and not tm.graphed:
                        raise RuntimeError(f"no CUDA graph: {tm.timer}")
                    out[key].append(tm)
                    peak[key] = max(peak.get(key, 0), (torch.cuda.max_memory_allocated() - before) / 1e6)
            except Exception as err:  # one failing variant must not stop the others; the row says why
                out[key] = err
    return {k: v if isinstance(v, Exception) else common.merge(v) for k, v in out.items()}, peak


def _run(args) -> dict:
    from diffusers import DDPMScheduler

    import mor_model
    from mor_model.sr.pipeline import MoRSRPipeline
    from mor_model.testing import SD21_SCHEDULER_CONFIG

    device, dtype = args.device, DTYPES[args.dtype]
    common.l2_flush_buffer(device)  # before anything is measured: the peaks must not include it
    meta = common.environment(device)
    meta.update(batch=args.batch, resolution=args.resolution, dtype=args.dtype, full_size=args.full_size,
                threads_note=args.threads_note, scale=SCALE)  # fmt: skip
    size = "SD 2.1-base size" if args.full_size else "REDUCED size (UNet channels 32-128, VAE 32-64, 1 layer/block)"
    print(f"one-step SR pipeline on {device.type} ({meta['device_name']}), {size}, {args.resolution // SCALE}px LQ -> "
          f"{args.resolution}px, B{args.batch}, {args.dtype}; {args.threads_note}; torch {meta['torch']}; "
          f"commit {(meta['git_commit'] or '?')[:10]}", flush=True)  # fmt: skip
    load = meta.get("load_avg_1min")
    if load is not None and load > 0.75 * (meta["cpu_count"] or 1):
        print(f"note: load average {load:.1f} on {meta['cpu_count']} cores: other processes are running", flush=True)
    unet, vae, unet_cfg = build(args, device)
    models, skipped = variants(args, unet, vae, device, dtype)
    est = estimator_model(args, device)
    text = FixedPrompt(unet_cfg["cross_attention_dim"]).to(device)
    scheduler = DDPMScheduler(**SD21_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(0)
    side = args.resolution // SCALE
    lq = torch.rand(args.batch, 3, side, side, generator=gen).to(device)
    latent_side = args.resolution // 8
    z = torch.randn(args.batch, 4, latent_side, latent_side, generator=gen).to(device, dtype)
    embeds = text.embeds.expand(args.batch, -1, -1).to(dtype)
    t = torch.full((args.batch,), 999, device=device, dtype=torch.long)
    with torch.no_grad():
        scores = est(lq)

    jobs: dict = {part: {} for part in PARTS}
    notes, weights, routed = {}, {}, {}
    for name, (u, v, note) in models.items():
        needs = bool(mor_model.mor_layers(u) or mor_model.mor_layers(v))
        pipe = MoRSRPipeline(
            u, v, text, FixedTokenizer(), scheduler, est if needs else None, device=device, dtype=dtype
        )
        jobs["pipeline"][name] = lambda pipe=pipe: pipe(lq, scale=SCALE, tile=0)
        jobs["unet"][name] = lambda u=u: u(z, t, encoder_hidden_states=embeds).sample
        notes[(name, "pipeline")] = (f"UNet: {note[0]}; VAE: {note[1]}" if note[0] else "") + (
            "; + estimator" if needs else ""
        )
        notes[(name, "unet")] = notes[(name, "unet-graph")] = note[0]
        weights[(name, "pipeline")] = _nbytes(u, v, est) if needs else _nbytes(u, v)
        weights[(name, "unet")] = weights[(name, "unet-graph")] = _nbytes(u)
        if mor_model.mor_layers(u):
            routed[name] = u
    if "estimator" in args.variants:
        jobs["estimator"]["estimator"] = lambda: est(lq)
        notes[("estimator", "estimator")] = "float32, " + ("tiny CLIP" if args.clip == "tiny" else
                                                           args.clip or ("ViT-L/14" if args.full_size else "ViT-B/32"))  # fmt: skip
        weights[("estimator", "estimator")] = _nbytes(est)
    timed = [(part, part_jobs, False) for part, part_jobs in jobs.items()]
    if device.type == "cuda" and not args.no_graphs:
        timed.insert(2, ("unet-graph", graphed_jobs(jobs["unet"]), True))
    timings, peak = {}, {}
    stem = f"bench_pipeline-{device.type}-{meta['time_utc'].replace(':', '').replace('+0000', 'Z')}"

    def rows_so_far() -> list[dict]:
        return table_rows(timings, notes, weights, peak, skipped, args, device)

    for part, part_jobs, graphs in timed:
        with contextlib.ExitStack() as stack:
            if part.startswith("unet"):  # the pipeline sets (and clears) the scores itself; the UNet alone needs them
                for u in routed.values():
                    stack.enter_context(mor_model.degradation(u, scores))
            tm, pk = time_jobs(part_jobs, device, args, use_graph=graphs)
        timings.update({(name, part): v for name, v in tm.items()})
        peak.update({(name, part): v for name, v in pk.items()})
        # the rows so far, after every part: a run stopped at a time cap (gpu_check) keeps the parts it finished
        common.write_outputs(args.out, stem, meta, rows_so_far(), FIELDS)
    if args.sd21_latent:
        sd_jobs, sd_notes, sd_weights = sd21_unet_jobs(args, device)
        # user CPU time on one thread: the kernel's page-fault time of oneDNN's per-call weight reorders
        # (0.4-1.2 s per forward here, the same work in every variant) swamped the ratios (common.cpu_user_time)
        user = common.cpu_user_time if torch.get_num_threads() == 1 else None
        tm, pk = time_jobs(sd_jobs, device, args, clock=user)
        timings.update({(name, "unet-sd21"): v for name, v in tm.items()})
        notes.update({(name, "unet-sd21"): v for name, v in sd_notes.items()})
        weights.update({(name, "unet-sd21"): v for name, v in sd_weights.items()})
    out_rows = rows_so_far()
    print_table(out_rows, device)
    paths = common.write_outputs(args.out, stem, meta, out_rows, FIELDS)
    print(f"wrote {paths['csv']} and {paths['json']}")
    return {"meta": meta, "rows": out_rows, "paths": paths}


def table_rows(timings: dict, notes: dict, weights: dict, peak: dict, skipped: dict, args, device) -> list[dict]:
    """The output rows of ``{(variant, part): Timing or exception}``: each with its ratio to ``none`` of the same
    part (and on a CPU the paired ratio), then a row per unavailable MoR backend."""
    rows = {}
    for key, tm in timings.items():
        row = {"variant": key[0], "part": key[1], "note": notes[key], "status": "ok", "reason": "", "batch": args.batch,
               "resolution": args.resolution, "dtype": args.dtype if key[1] != "estimator" else "fp32",
               "full_size": args.full_size, "weights_mb": weights[key], "peak_act_mb": peak.get(key),
               "latent": args.resolution // 8}  # fmt: skip
        if key[1] == "unet-sd21":
            row.update(resolution=args.sd21_latent * 8, latent=args.sd21_latent, full_size=True, dtype="fp32")
        if isinstance(tm, Exception):
            row.update(status="error", reason=f"{type(tm).__name__}: {tm}"[:300])
        else:
            row.update(timer=tm.timer, median_ms=tm.median_ms, p20_ms=tm.p20_ms, p80_ms=tm.p80_ms, samples=tm.samples)
        rows[key] = row
    for key, row in rows.items():
        ref = rows.get(("none", key[1]))
        if row["status"] == "ok" and ref and ref["status"] == "ok":
            row["ratio_to_none"] = row["median_ms"] / ref["median_ms"]
            if device.type != "cuda":  # CPU samples come in interleaved rounds: pair them round by round
                row["paired_ratio"] = common.paired_ratio(timings[key].raw, timings[("none", key[1])].raw)
    out_rows = list(rows.values())
    for b, why in skipped.items():
        out_rows.append({"variant": f"mor:{b}", "part": "-", "status": "unavailable", "reason": why})
    return out_rows


def print_table(rows: list[dict], device) -> None:
    print(
        f"\n{'variant':22s} {'part':10s} {'median ms':>10s} {'p20-p80 ms':>17s} {'x none':>7s} {'paired':>7s} "
        f"{'weights MB':>10s} {'peak+ MB':>8s}  note"
    )
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:22s} {r['part']:10s} {r['status']}: {r['reason']}")
            continue
        ratio = f"{r['ratio_to_none']:.3f}" if r.get("ratio_to_none") else "-"
        paired = f"{r['paired_ratio']:.3f}" if r.get("paired_ratio") else "-"
        mem = f"{r['peak_act_mb']:.0f}" if r.get("peak_act_mb") is not None else "-"
        print(f"{r['variant']:22s} {r['part']:10s} {r['median_ms']:10.2f} {r['p20_ms']:8.2f}-{r['p80_ms']:<8.2f} "
              f"{ratio:>7s} {paired:>7s} {r['weights_mb']:10.1f} {mem:>8s}  {r['note']}")  # fmt: skip
    if device.type != "cuda":
        print("peak+ (memory a call adds) is measured on CUDA devices only")


if __name__ == "__main__":
    main()
