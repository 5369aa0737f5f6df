#!/usr/bin/env python
"""Where per-sample merged inference beats the low-rank path: the crossover behind
``mor_kernels.dispatch.merge_plan``'s cost model.

    python benchmarks/bench_mor_lora_merge.py                     # CPU: Linear 320/640/1280, conv 3x3 and 1x1
    python benchmarks/bench_mor_lora_merge.py --active 8,16       # more active-rank counts

For each layer shape and token count ``T`` (per sample) it times, interleaved in the same run, the bare
base layer and the two paths a MoR layer runs in inference once its rank factors are prepared for the
image (``mor_model.inference``): the low-rank path a model runs (the op of the backend ``"auto"`` picks, with
the image's routing and ``merge="never"``, e.g. the BLAS path on a CPU with the extension built; where
``"auto"`` is the reference, its prepared factors ``b (a x)`` added into the base output,
``mor_kernels.reference.factors``) and the merged path (``W_b = W0 + b a``, then one base GEMM/conv),
batch 1, each after an elementwise op that leaves ``x`` in the caches as the previous layer of a model
does. It reports

    rho = T (C_in + C_out) / (C_in kh kw C_out)

the low-rank path's activation traffic over the merge's weight traffic. The merged path wins above a
crossover ``rho*`` (per layer kind: Linear and 1x1 convs, larger kernels); the run prints ``rho*`` per
shape (interpolated between the token counts around the crossing), which
``mor_kernels.dispatch.MERGE_CROSSOVER`` records. Writes CSV/JSON like the other benchmarks.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as common  # noqa: E402

import mor_kernels  # noqa: E402
from mor_kernels import dispatch  # noqa: E402
from mor_kernels.reference import factors  # noqa: E402

# (kind, channels, kernel): the SD 2.1 widths
SHAPES = [("linear", c, 1) for c in (320, 640, 1280)] + [("conv", c, k) for k in (3, 1) for c in (320, 640, 1280)]
FIELDS = ("kind", "channels", "kernel", "tokens", "active", "lowrank_backend", "rho", "base_ms", "lowrank_ms", "merged_ms",
          "merged_over_lowrank", "lowrank_over_base", "merged_over_base")  # fmt: skip


def token_counts(kind: str, kernel: int, channels: int, max_flop: float) -> list[int]:
    """Token counts from 16 up (doubling; squares for convs), while the base layer stays under ``max_flop``."""
    out, tokens = [], 16
    while 2 * tokens * channels * kernel * kernel * channels <= max_flop and tokens <= 16384:
        out.append(tokens)
        tokens *= 4 if kind == "conv" else 2
    return out


def inputs(kind, channels, kernel, tokens, active, device, gen):
    s, e = 8, 32
    k = active - s
    side = math.isqrt(tokens)
    x = torch.randn(1, channels, side, side, generator=gen) if kind == "conv" else torch.randn(1, tokens, channels,
                                                                                                generator=gen)  # fmt: skip
    kk = (kernel, kernel) if kind == "conv" else ()
    fan = channels * kernel * kernel
    w = torch.randn(channels, channels, *kk, generator=gen) * fan**-0.5
    a = torch.randn(s + e, channels, *kk, generator=gen) * fan**-0.5
    b = torch.randn(channels, s + e, generator=gen) * 0.02
    idx = torch.randperm(e, generator=gen)[:k].to(torch.int32)[None]
    gate = torch.rand(1, k, generator=gen) + 0.1
    t = [x, w, torch.randn(channels, generator=gen) * 0.1, a, b, idx, gate / gate.sum()]
    return [v.to(device) for v in t], s


def measure(kind, channels, kernel, tokens, active, device, budget):
    gen = torch.Generator().manual_seed(tokens)
    (x0, w, bias, a, b, idx, gate), s = inputs(kind, channels, kernel, tokens, active, device, gen)
    f = factors.rank_factors(a, b, idx, gate, s, 1.0, x0.dtype)
    pad = kernel // 2

    def prev():  # the previous layer's elementwise output: x fresh in the caches
        return torch.nn.functional.silu(x0)

    op = "mor_conv2d" if kind == "conv" else "mor_linear"
    backend = dispatch.resolve(op, "auto", device, x0.dtype).backend
    fused = backend != "reference"  # what mor_model.inference runs for a layer that does not merge

    if kind == "conv":

        def base():
            return torch.nn.functional.conv2d(prev(), w, bias, 1, pad)

        def lowrank():
            x = prev()
            if fused:
                return mor_kernels.mor_conv2d(x, w, bias, a, b, idx, gate, s, 1.0, 1, pad, 1, check_indices=False,
                                              merge="never")  # fmt: skip
            return factors.add_lowrank_conv2d(torch.nn.functional.conv2d(x, w, bias, 1, pad), x, f, 1, pad, 1)

        def merged():
            return factors.merged_conv2d(prev(), factors.merge_weights(w, f), bias, 1, pad, 1)

    else:

        def base():
            return torch.nn.functional.linear(prev(), w, bias)

        def lowrank():
            x = prev()
            if fused:
                return mor_kernels.mor_linear(x, w, bias, a, b, idx, gate, s, 1.0, check_indices=False, merge="never")
            return factors.add_lowrank_linear(torch.nn.functional.linear(x, w, bias), x, f, inplace=True)

        def merged():
            return factors.merged_linear(prev(), factors.merge_weights(w, f), bias)

    fns = {"base": base, "lowrank": lowrank, "merged": merged}
    with torch.no_grad():
        if device.type == "cuda":
            t = {n: common.time_fn(fn, device, budget_s=budget) for n, fn in fns.items()}
        else:
            t = common.time_cpu_interleaved({n: (fn, ()) for n, fn in fns.items()}, budget_s=budget)
    ms = {n: v.median_ms for n, v in t.items()}
    return {
        "kind": kind, "channels": channels, "kernel": kernel, "tokens": tokens, "active": active, "lowrank_backend": backend,
        "rho": tokens * 2 * channels / (channels * kernel * kernel * channels), "base_ms": ms["base"],
        "lowrank_ms": ms["lowrank"], "merged_ms": ms["merged"], "merged_over_lowrank": ms["merged"] / ms["lowrank"],
        "lowrank_over_base": ms["lowrank"] / ms["base"], "merged_over_base": ms["merged"] / ms["base"],
    }  # fmt: skip


def crossover(rows: list[dict]) -> float | None:
    """``rho`` where merged/lowrank crosses 1 (geometric interpolation between the neighbouring points)."""
    rows = sorted(rows, key=lambda r: r["rho"])
    for lo, hi in zip(rows, rows[1:], strict=False):
        if lo["merged_over_lowrank"] >= 1 > hi["merged_over_lowrank"]:
            f = math.log(lo["merged_over_lowrank"]) / (
                math.log(lo["merged_over_lowrank"]) - math.log(hi["merged_over_lowrank"])
            )
            return math.exp(math.log(lo["rho"]) + f * (math.log(hi["rho"]) - math.log(lo["rho"])))
    if rows and rows[0]["merged_over_lowrank"] < 1:
        return rows[0]["rho"]  # merged already wins at the smallest count: an upper bound
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--active", default="16", help="comma list of active ranks per sample (8 shared + picks)")
    p.add_argument("--kinds", default="linear,conv", help="linear, conv")
    p.add_argument("--max-gflop", type=float, default=None, help="largest base layer timed (default 1.5 CPU)")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    try:
        note = common.threads_note(args.threads, device.type == "cuda")
        cap = (args.max_gflop or (1.5 if device.type == "cpu" else 50.0)) * 1e9
        meta = common.environment(device)
        meta.update(threads_note=note, budget_s=args.budget)
        lowrank = {k: dispatch.resolve(f"mor_{k}", "auto", device, torch.float32).backend for k in ("linear", "conv2d")}
        meta["lowrank_backend"] = lowrank
        print(f"merge crossover on {device.type} ({meta['device_name']}), fp32, batch 1, {note}; low-rank path: "
              f"backend {lowrank}; load "
              f"{meta.get('load_avg_1min')}; commit {(meta['git_commit'] or '?')[:10]}", flush=True)  # fmt: skip
        print(f"{'shape':18s} {'act':>3s} {'T':>6s} {'rho':>7s} {'base ms':>9s} {'lowrank':>8s} {'merged':>8s} "
              f"{'m/l':>6s}")  # fmt: skip
        rows, fits = [], []
        kinds = [k.strip() for k in args.kinds.split(",")]
        for active in [int(v) for v in args.active.split(",")]:
            for kind, ch, kernel in SHAPES:
                if kind not in kinds:
                    continue
                shape_rows = []
                for tokens in token_counts(kind, kernel, ch, cap):
                    r = measure(kind, ch, kernel, tokens, active, device, args.budget)
                    shape_rows.append(r)
                    name = f"{kind}{kernel}x{kernel}-{ch}" if kind == "conv" else f"linear-{ch}"
                    print(f"{name:18s} {active:3d} {tokens:6d} {r['rho']:7.3f} {r['base_ms']:9.3f} "
                          f"{r['lowrank_over_base']:7.2f}x {r['merged_over_base']:7.2f}x {r['merged_over_lowrank']:6.2f}",
                          flush=True)  # fmt: skip
                rows += shape_rows
                rho = crossover(shape_rows)
                print(f"  -> crossover rho* = {rho if rho is None else f'{rho:.3f}'}", flush=True)
                if rho is not None:
                    fits.append(("linear" if kernel == 1 else "conv", active, round(rho, 3)))
        print(f"crossovers (kind, active ranks, rho*): {fits}")
        meta["crossovers"] = fits
        stem = f"bench_mor_lora_merge-{device.type}-{meta['time_utc'].replace(':', '').replace('+0000', 'Z')}"
        paths = common.write_outputs(args.out, stem, meta, rows, FIELDS)
        print(f"wrote {paths['csv']} and {paths['json']}")
        return {"meta": meta, "rows": rows, "paths": paths}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
