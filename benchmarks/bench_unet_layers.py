#!/usr/bin/env python
"""Where a MoR UNet's cost goes, layer by layer: every MoR layer of the SD 2.1-base UNet (real sizes, random
weights) timed alone on the input it sees in the model, three ways.

    python benchmarks/bench_unet_layers.py                  # CPU, latent 32x32, 1 thread
    python benchmarks/bench_unet_layers.py --latent 64      # the 512 px latent (slow on a CPU)

One forward of the MoR UNet (``mor_model.inject_mor`` defaults, ``lora_b`` drawn as if trained, the scores of
one image set) records each MoR layer's input. Then, per layer, interleaved, each call after a pass over a
buffer larger than the caches and then over the input (as in a model, where the layers before evicted this
one's weights and the op before wrote its input):

- ``base``: the bare layer (``F.linear``/``F.conv2d``);
- ``lowrank``: ``mor_linear``/``mor_conv2d`` with ``merge="never"`` (the low-rank path of the backend
  ``--backend`` resolves to: the BLAS op on a CPU with the extension built);
- ``merged``: the same with ``merge="always"`` (the per-sample merged weight made in the call).

The time of a path is the minimum over ``--repeats`` calls (the least disturbed one), on a CPU with freed
memory kept in the process (:func:`keep_freed_memory`; ``--release-memory`` to leave the allocator alone). Rows per layer (kind,
tokens T, weight shape, ``rho = T (C_in + C_out) / (C_in kh kw C_out)``, the three times, what
``mor_kernels.dispatch.merge_plan``'s cost model picks), a table grouped by shape, and the sums: the base
layers' total, and the MoR layers' total with the low-rank path everywhere, merged everywhere, the cost model's
pick and the faster path per layer (the best a per-layer choice can do with these two paths). The model-level
ratio (``bench_pipeline.py``, part ``unet-sd21``) also pays for the rest of the UNet (attention, norms), the
per-image routing, and the caches the layers share; this tool isolates what the MoR layers' own calls cost.
Writes CSV/JSON like the other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as common  # noqa: E402
import bench_pipeline  # noqa: E402

import mor_kernels  # noqa: E402
from mor_kernels.validation import conv_out_size  # noqa: E402

FIELDS = ("layer", "kind", "tokens", "weight_shape", "rho", "base_ms", "lowrank_ms", "merged_ms", "auto_path",
          "lowrank_over_base", "merged_over_base")  # fmt: skip
PATHS = ("base", "lowrank", "merged")


def keep_freed_memory() -> str:
    """``mor_model.cpu_memory.keep_freed_memory``: without it every conv call page-faults a fresh weight-sized
    buffer (oneDNN reorders the weight in each call: ~14k minor faults for a 1280x1280x3x3 conv), time that is
    the same for the three paths of a layer and hides what the adapter costs. Returns what it did."""
    from mor_model.cpu_memory import keep_freed_memory as keep

    return keep()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--latent", type=int, default=32, help="latent side (default 32: 256 px output)")
    p.add_argument("--backend", default="auto", help="the MoR layers' backend (default auto)")
    p.add_argument("--repeats", type=int, default=5, help="calls per path and layer; the minimum is kept")
    p.add_argument("--evict-mb", type=float, default=32.0, help="the buffer passed over before each call (MB)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1; 0 = torch's default)")
    p.add_argument("--release-memory", action="store_true",
                   help="CPU: leave the allocator as it is (default: keep freed memory, see keep_freed_memory)")  # fmt: skip
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    if args.latent < 8 or args.latent % 8:
        raise SystemExit(f"--latent must be a multiple of 8 and >= 8, got {args.latent}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.evict_mb < 0:
        raise SystemExit(f"--evict-mb must be >= 0, got {args.evict_mb}")
    return args


def model_and_inputs(args, device: torch.device):
    """The MoR UNet and ``{layer name: (layer, input)}`` from one forward with the scores of one image."""
    import mor_model

    unet, (z, t, embeds), scores = bench_pipeline.sd21_unet(args.latent, 1, device)
    mor_model.inject_mor(unet, mor_model.MoRConfig(backend=args.backend))
    layers = mor_model.mor_layers(bench_pipeline.as_trained(unet))
    seen: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, inputs):
            seen.setdefault(name, inputs[0].detach().clone())

        return hook

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            mor_model.set_degradation(unet, scores)
            unet(z, t, encoder_hidden_states=embeds)
    finally:
        for h in handles:
            h.remove()
    return unet, scores, {name: (layer, seen[name]) for name, layer in layers.items() if name in seen}


def layer_calls(layer, x: torch.Tensor, scores: torch.Tensor, backend: str):
    """``({path: fn}, kind, tokens, rho, the cost model's plan)`` for one MoR layer on its input ``x``."""
    base = layer.base_layer
    idx, gate = layer.router(scores)
    w, b, a, bb = base.weight, base.bias, layer.lora_a, layer.lora_b
    s, scaling = layer.num_shared, layer.scaling
    kw = dict(backend=backend, check_indices=False)
    if isinstance(base, nn.Conv2d):
        conv = (base.stride, base.padding, base.dilation)
        kind = "conv1x1" if w.shape[2:] == (1, 1) else "conv"
        out_hw = [conv_out_size(x.shape[2 + i], w.shape[2 + i], *(c[i] for c in conv)) for i in (0, 1)]
        tokens, c_in = out_hw[0] * out_hw[1], w.shape[1]
        plan = mor_kernels.merge_decision("mor_conv2d", x, w, a, idx, stride=conv[0], padding=conv[1],
                                          dilation=conv[2], backend=backend, merge=layer.merge)  # fmt: skip
        fns = {
            "base": lambda: F.conv2d(x, w, b, *conv),
            "lowrank": lambda: mor_kernels.mor_conv2d(
                x, w, b, a, bb, idx, gate, s, scaling, *conv, merge="never", **kw
            ),
            "merged": lambda: mor_kernels.mor_conv2d(
                x, w, b, a, bb, idx, gate, s, scaling, *conv, merge="always", **kw
            ),  # fmt: skip
        }
    else:
        kind, tokens, c_in = "linear", x.numel() // (x.shape[0] * x.shape[-1]), x.shape[-1]
        plan = mor_kernels.merge_decision("mor_linear", x, w, a, idx, backend=backend, merge=layer.merge)
        fns = {
            "base": lambda: F.linear(x, w, b),
            "lowrank": lambda: mor_kernels.mor_linear(x, w, b, a, bb, idx, gate, s, scaling, merge="never", **kw),
            "merged": lambda: mor_kernels.mor_linear(x, w, b, a, bb, idx, gate, s, scaling, merge="always", **kw),
        }
    taps = w[0, 0].numel() if w.dim() == 4 else 1
    rho = tokens * (c_in + w.shape[0]) / (c_in * taps * w.shape[0])
    return fns, kind, tokens, rho, plan


def time_layer(fns: dict, device: torch.device, repeats: int, evict: torch.Tensor | None,
               x: torch.Tensor | None = None) -> dict[str, float]:  # fmt: skip
    """Minimum ms per path over ``repeats`` rounds, the paths interleaved; before each call ``evict`` is passed
    over (the weights leave the caches) and then ``x`` (the input comes back: in a model the previous op just
    wrote it)."""
    best = dict.fromkeys(fns, float("inf"))
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else common.cpu_clock()
    for fn in fns.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if evict is not None:
                evict.mul_(1.0)
            if x is not None:
                x.mul_(1.0)
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            best[name] = min(best[name], (clock() - start) * 1e3)
    return best


def summarize(rows: list[dict]) -> dict:
    """The totals (ms) and their ratios to the base layers' total."""
    base = sum(r["base_ms"] for r in rows)
    totals = {
        "lowrank": sum(r["lowrank_ms"] for r in rows),
        "merged": sum(r["merged_ms"] for r in rows),
        "cost model": sum(r["merged_ms"] if r["auto_path"] == "merged" else r["lowrank_ms"] for r in rows),
        "best per layer": sum(min(r["lowrank_ms"], r["merged_ms"]) for r in rows),
    }
    return {"base_ms": base, **{f"{k}_ms": v for k, v in totals.items()},
            **{f"{k}_over_base": v / base if base else float("nan") for k, v in totals.items()}}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    try:
        note = common.threads_note(args.threads, device.type == "cuda")
        allocator = "allocator left alone"
        if device.type == "cpu" and not args.release_memory:
            allocator = keep_freed_memory()
        meta = common.environment(device)
        meta.update(threads_note=note, allocator=allocator, latent=args.latent, backend=args.backend, repeats=args.repeats,
                    evict_mb=args.evict_mb)  # fmt: skip
        unet, scores, layers = model_and_inputs(args, device)
        evict = None
        if args.evict_mb > 0:
            evict = torch.ones(int(args.evict_mb * 2**20 / 4), device=device)
        print(f"SD 2.1-base UNet MoR layers on {device.type} ({meta['device_name']}), latent {args.latent}x"
              f"{args.latent}, fp32, batch 1, backend {args.backend!r}, {note}; min of {args.repeats} calls, "
              f"{args.evict_mb:g} MB passed over before each; {allocator}; load {meta.get('load_avg_1min')}; commit "
              f"{(meta['git_commit'] or '?')[:10]}", flush=True)  # fmt: skip
        rows = []
        with torch.no_grad():
            for name, (layer, x) in layers.items():
                fns, kind, tokens, rho, plan = layer_calls(layer, x, scores, args.backend)
                ms = time_layer(fns, device, args.repeats, evict, x)
                rows.append({
                    "layer": name, "kind": kind, "tokens": tokens, "weight_shape": "x".join(map(str, layer.base_layer.weight.shape)),
                    "rho": rho, "base_ms": ms["base"], "lowrank_ms": ms["lowrank"], "merged_ms": ms["merged"],
                    "auto_path": "merged" if plan.merge else "lowrank", "lowrank_over_base": ms["lowrank"] / ms["base"],
                    "merged_over_base": ms["merged"] / ms["base"],
                })  # fmt: skip
        print_table(rows)
        summary = summarize(rows)
        meta["summary"] = summary
        print(f"\n{len(rows)} MoR layers; base layers {summary['base_ms']:.1f} ms; MoR layers / base layers: "
              f"low-rank {summary['lowrank_over_base']:.3f}, merged {summary['merged_over_base']:.3f}, the cost "
              f"model's pick {summary['cost model_over_base']:.3f}, the faster per layer "
              f"{summary['best per layer_over_base']:.3f}")  # fmt: skip
        stem = f"bench_unet_layers-{device.type}-{meta['time_utc'].replace(':', '').replace('+0000', 'Z')}"
        paths = common.write_outputs(args.out, stem, meta, rows, FIELDS)
        print(f"wrote {paths['csv']} and {paths['json']}")
        return {"meta": meta, "rows": rows, "summary": summary, "paths": paths}
    finally:
        torch.set_num_threads(threads)


def print_table(rows: list[dict]) -> None:
    """One line per (kind, tokens, weight shape), heaviest first: the layers' summed times as ratios."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"n": 0, "base": 0.0, "lowrank": 0.0, "merged": 0.0})
    for r in rows:
        g = groups[(r["kind"], r["tokens"], r["weight_shape"], r["auto_path"])]
        g["n"] += 1
        g["rho"] = r["rho"]
        for p in PATHS:
            g[p] += r[f"{p}_ms"]
    print(f"\n{'kind':8s} {'T':>5s} {'weight':>16s} {'n':>3s} {'rho':>7s} {'base ms':>9s} {'lowrank':>8s} "
          f"{'merged':>8s} {'model picks':>11s} {'extra ms':>9s}")  # fmt: skip
    for (kind, tokens, shape, auto), g in sorted(groups.items(), key=lambda kv: -kv[1]["base"]):
        extra = g["merged" if auto == "merged" else "lowrank"] - g["base"]
        print(f"{kind:8s} {tokens:5d} {shape:>16s} {g['n']:3d} {g['rho']:7.3f} {g['base']:9.2f} "
              f"{g['lowrank'] / g['base']:7.3f}x {g['merged'] / g['base']:7.3f}x {auto:>11s} {extra:9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
