#!/usr/bin/env python
"""What a MoR layer costs next to its bare base layer, per backend, on the SD 2.1-base MoR shapes.

    python benchmarks/bench_mor_lora.py            # quick default (about a minute on a 2-core CPU)
    python benchmarks/bench_mor_lora.py --full     # the whole sweep
    python benchmarks/bench_mor_lora.py --help     # shapes, providers, dtypes, modes, routing, sweeps

Providers, all timed in the same run: ``base`` (bare ``F.linear``/``F.conv2d``, the floor), ``lora``
(base + dense LoRA of the same active rank, PEFT-style unmerged: ``base(x) + B(A x) * scaling``),
``mor:auto`` (what a MoR layer runs), ``mor:merged`` (forced per-sample merged weights, forward only) and
``mor:<backend>`` (``mor_kernels.mor_linear``/``mor_conv2d`` with ``backend=`` reference, triton,
cuda, cpp, blas), each included when ``mor_kernels.available_backends`` lists it, else reported with the
reason. Routing is built directly (``idx``/``gate``), so the number of zero slots each sample (or
token) picks, hence its active ranks, is exactly what the case says. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common, when imported from tests

import bench_common as common  # noqa: E402
from bench_mor_lora_cases import (  # noqa: E402
    DTYPES,
    MODES,
    PROVIDERS,
    QUICK_SHAPES,
    SHAPES,
    Case,
    build_cases,
    case_label,
    make_inputs,
)
from bench_mor_lora_report import header, plot, print_table, print_targets  # noqa: E402

import mor_kernels  # noqa: E402
from mor_kernels import dispatch, flops  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Providers


def provider_fn(case: Case, provider: str, t: dict[str, torch.Tensor]):
    """One call of the provider's layer on the inputs ``t``."""
    conv = case.shape.kind == "conv2d"
    pad = case.shape.kernel // 2
    x, w, b = t["x"], t["weight"], t["bias"]
    scaling = 1.0

    def base():
        return F.conv2d(x, w, b, padding=pad) if conv else F.linear(x, w, b)

    if provider == "base":
        return base
    if provider == "lora":
        a, bb = t["dense_a"], t["dense_b"]
        if conv:  # PEFT's Conv2d LoRA: lora_A a kxk conv to r channels, lora_B a 1x1 conv

            def lora():
                return base() + F.conv2d(F.conv2d(x, a, padding=pad), bb[:, :, None, None]) * scaling
        else:

            def lora():
                return base() + F.linear(F.linear(x, a), bb) * scaling

        return lora
    backend = provider.split(":", 1)[1]
    kw = dict(backend="auto", merge="always") if backend == "merged" else dict(backend=backend)
    args = (x, w, b, t["lora_a"], t["lora_b"], t["idx"], t["gate"], case.num_shared, scaling)
    # called as the MoR layers call them: indices from route, so no index check (a device sync per call)
    if conv:

        def mor():
            return mor_kernels.mor_conv2d(*args, 1, pad, 1, check_indices=False, **kw)
    else:

        def mor():
            return mor_kernels.mor_linear(*args, check_indices=False, **kw)

    return mor


def unavailable(case: Case, provider: str, device: torch.device, explicit: bool) -> str | None:
    """Why ``provider`` cannot run ``case`` on ``device`` (None when it can)."""
    if not provider.startswith("mor:"):
        return None
    backend = provider.split(":", 1)[1]
    dtype = DTYPES[case.dtype]
    if case.shape.kind == "conv2d" and case.routing == "token":
        return "mor_conv2d routes per sample only"
    if backend == "merged":
        if case.mode != "fwd":
            return "merged weights are an inference path (never with a gradient)"
        return "merged weights need sample routing" if case.routing != "sample" else None
    if backend == "auto":
        return None
    if backend in mor_kernels.available_backends(device, case.op, dtype):
        if backend == "triton" and device.type == "cpu" and not explicit:
            return (
                "Triton interpreter on CPU (TRITON_INTERPRET=1) is a test path, not timed unless named in --providers"
            )
        return None
    return dispatch.unavailable_reason(backend, case.op, device, dtype) or "not listed by available_backends"


def executed_rank_rows(case: Case, provider: str, layer, t: dict, useful_rr: int, device: torch.device):
    """What ``provider`` computes, in rank-rows (``mor_kernels.flops``): for ``mor:auto`` the backend
    ``"auto"`` resolves to, or the merged path when ``mor_kernels.merge_decision`` picks it."""
    backend = provider.split(":")[1]
    token = case.routing == "token"
    idx = flops.live_slots(t["idx"].cpu(), t["gate"].cpu())
    width = None if token else flops.rank_list_width(idx, case.num_shared, case.ranks, host=device.type == "cpu")

    def merged():  # one merged weight, or one per sample when the samples route differently
        same = case.batch == 1 or bool((idx == idx[:1]).all() and (t["gate"] == t["gate"][:1]).all())
        return flops.merged_rank_rows(layer, 1 if same else case.batch, width)

    if backend == "merged":
        return merged()
    if backend == "auto":
        op = case.op
        with torch.no_grad() if case.mode == "fwd" else torch.enable_grad():
            trainable = {n: t[n].detach().requires_grad_(case.mode != "fwd") for n in ("x", "lora_a", "gate")}
            plan = mor_kernels.merge_decision(op, trainable["x"], t["weight"], trainable["lora_a"], t["idx"],
                                              gate=trainable["gate"], padding=case.shape.kernel // 2)  # fmt: skip
        if plan.merge:
            return merged()
        backend = dispatch.resolve(op, "auto", device, DTYPES[case.dtype]).backend
    return flops.executed_rank_rows(backend, layer, case.ranks, useful_rr, token, num_shared=case.num_shared,
                                    top_k=case.top_k, list_width=width)  # fmt: skip


TRAINABLE = {"base": ("x",), "lora": ("x", "dense_a", "dense_b"), "mor": ("x", "lora_a", "lora_b", "gate")}


def prepare(case: Case, provider: str, t: dict):
    """``(fn, grad_to_none, use_graph)`` for one provider: ``fwd`` runs under ``no_grad`` (CUDA graph
    replay allowed); ``fwd+bwd`` runs forward and backward with ``x``, the adapter weights (and the MoR
    gate) requiring gradients and the base weight frozen, gradients set to None between calls."""
    if case.mode == "fwd":
        fn = provider_fn(case, provider, t)
        with torch.no_grad():
            fn()  # fail here, not inside the timer
        return fn, (), True
    t = dict(t)
    trainable = []
    for name in TRAINABLE[provider.split(":")[0]]:
        t[name] = t[name].detach().clone().requires_grad_(True)
        trainable.append(t[name])
    fn = provider_fn(case, provider, t)
    with torch.no_grad():
        dy = torch.randn_like(fn())

    def step():
        fn().backward(dy)

    step()  # fail here, not inside the timer, when a backend has no backward
    return step, trainable, False


# ----------------------------------------------------------------------------------------------
# Measurement


FIELDS = (
    "case", "sweep", "layer", "kind", "batch", "tokens", "d_in", "d_out", "kernel", "ranks", "num_shared",
    "num_routed", "num_zero", "top_k", "zero_picked", "zero_fraction", "active_ranks", "lora_rank", "routing",
    "mode", "dtype", "provider", "status", "reason", "timer", "median_ms", "p20_ms", "p80_ms", "samples",
    "ratio_to_base", "paired_to_base", "paired_to_lora", "timing_flag", "overhead_ms", "useful_gflop",
    "executed_gflop", "useful_tflops", "min_mb", "achieved_gbps", "copy_fraction",
)  # fmt: skip


def measure_case(case: Case, providers, device, args, copy_gbps: float) -> list[dict]:
    t = make_inputs(case, device)
    layer = case.layer()
    backward = case.mode == "fwd+bwd"
    live = flops.live_slots(t["idx"].cpu(), t["gate"].cpu())  # a zero-gate pick does no work on any backend
    useful_rr = flops.active_rank_rows(live, case.num_shared, layer.tokens)
    touched = flops.ranks_touched(live, case.num_shared)
    common_fields = {
        "case": case_label(case),
        "sweep": case.sweep,
        "layer": case.shape.name,
        "kind": case.shape.kind,
        "batch": case.batch,
        "tokens": layer.tokens,
        "d_in": case.shape.c_in,
        "d_out": case.shape.c_out,
        "kernel": case.shape.kernel,
        "ranks": case.ranks,
        "num_shared": case.num_shared,
        "num_routed": case.num_routed,
        "num_zero": case.num_zero,
        "top_k": case.top_k,
        "zero_picked": case.zero_picked,
        "zero_fraction": case.zero_picked / case.top_k,
        "active_ranks": useful_rr / layer.rows,
        "lora_rank": case.active,
        "routing": case.routing,
        "mode": case.mode,
        "dtype": case.dtype,
    }
    rows, ready = [], {}
    for provider in providers:
        row = dict(common_fields, provider=provider, status="ok", reason="")
        rows.append(row)
        why = unavailable(case, provider, device, provider in (args.providers or ()))
        if why is not None:
            row.update(status="unavailable", reason=why)
            continue
        if provider == "base":
            op, rank_rows, ranks_read, route = "base", 0, 0, 0
        elif provider == "lora":
            op, rank_rows, ranks_read, route = "lora", layer.rows * case.active, case.active, 0
        else:
            op, ranks_read, route = case.op, touched, t["idx"].numel()
            rank_rows = executed_rank_rows(case, provider, layer, t, useful_rr, device)
        row["useful_flop"] = flops.op_flops(op, layer, useful_rr if op != "base" else 0, backward=backward)
        row["executed_flop"] = flops.op_flops(op, layer, rank_rows, backward=backward)
        row["min_bytes"] = flops.min_bytes(
            op,
            layer,
            DTYPES[case.dtype],
            ranks_read=ranks_read,
            ranks=case.ranks if op.startswith("mor") else ranks_read,
            routing_numel=route,
            backward=backward,
        )
        try:
            ready[provider] = (row, *prepare(case, provider, t))
        except Exception as err:  # a backend that fails must not stop the sweep; the row says why
            row.update(status="error", reason=f"{type(err).__name__}: {err}"[:300])
    timings, timer_note = time_providers(
        {p: (fn, grads, graph) for p, (_, fn, grads, graph) in ready.items()}, device, args, grad=backward
    )
    base_ms = None
    for provider, (row, *_) in ready.items():
        timing = timings[provider]
        if isinstance(timing, Exception):
            row.update(status="error", reason=f"{type(timing).__name__}: {timing}"[:300])
            continue
        ms = timing.median_ms
        if provider == "base":
            base_ms = ms
        ratio = None if base_ms is None else ms / base_ms
        useful, executed, nbytes = row.pop("useful_flop"), row.pop("executed_flop"), row.pop("min_bytes")
        row.update(
            timer=timing.timer + (f" [{timer_note}]" if timer_note else ""),
            timing_flag=timing_flag(provider, ratio),
            median_ms=ms,
            p20_ms=timing.p20_ms,
            p80_ms=timing.p80_ms,
            samples=timing.samples,
            ratio_to_base=ratio,
            overhead_ms=None if base_ms is None else ms - base_ms,
            useful_gflop=useful / 1e9,
            executed_gflop=executed / 1e9,
            useful_tflops=useful / (ms * 1e-3) / 1e12,
            min_mb=nbytes / 1e6,
            achieved_gbps=nbytes / (ms * 1e-3) / 1e9,
            copy_fraction=nbytes / (ms * 1e-3) / 1e9 / copy_gbps,
        )
    for row in rows:
        for key in ("useful_flop", "executed_flop", "min_bytes"):
            row.pop(key, None)
    if device.type == "cpu":
        add_paired_ratios(rows, timings)
    return rows


def add_paired_ratios(rows: list[dict], timings: dict) -> None:
    """``paired_to_base`` / ``paired_to_lora`` of each timed row: the median over the interleaved CPU rounds of
    the provider's sample over base's (the dense LoRA's) sample of the same round (``bench_common.paired_ratio``).
    A drift of the shared machine within a run (clock, cache and memory-bandwidth contention from its other
    tenants) moves both samples of a round alike, so these spread less between runs than the ratios of the
    medians."""
    raw = {p: t.raw for p, t in timings.items() if isinstance(t, common.Timing) and t.raw}
    for row in rows:
        mine = raw.get(row["provider"]) if row["status"] == "ok" else None
        for ref, key in (("base", "paired_to_base"), ("lora", "paired_to_lora")):
            row[key] = common.paired_ratio(mine, raw[ref]) if mine and ref in raw else None


#: a provider other than ``base`` computes base(x) plus an adapter branch: strictly more work than base
MORE_WORK_FLOOR = 0.9


def timing_flag(provider: str, ratio: float | None) -> str:
    """``"unreliable: ..."`` when a provider that does strictly more work than ``base`` (every provider
    but ``base``) came out below :data:`MORE_WORK_FLOOR` times base: the timer, not the kernel, made
    that number (load from other processes, clock changes); empty otherwise."""
    if provider == "base" or ratio is None or ratio >= MORE_WORK_FLOOR:
        return ""
    return (
        f"unreliable: {ratio:.2f}x base, but {provider} does strictly more work than base "
        f"(< {MORE_WORK_FLOOR}x); rerun on an idle machine"
    )


def time_providers(fns: dict, device: torch.device, args, *, grad: bool) -> tuple[dict, str]:
    """Times ``{provider: (fn, grad_to_none, graphable)}`` of one case; returns ``({provider: Timing or
    the exception it raised}, note)``.

    CPU: :func:`bench_common.time_cpu_interleaved` (providers alternate sample by sample). CUDA:
    ``args.rounds`` rounds in which every provider is timed in turn; forward calls replay CUDA graphs
    unless ``--no-graphs``. A ratio never mixes two timers: when the graph capture fails for some
    providers only, every provider of the case is timed again eagerly, and ``note`` says so.
    """
    mode = contextlib.nullcontext if grad else torch.no_grad
    if device.type != "cuda":
        with mode():
            fn_grads = {p: (fn, grads) for p, (fn, grads, _) in fns.items()}
            return common.time_cpu_interleaved(fn_grads, budget_s=args.budget), ""

    def run(use_graph: bool) -> dict:
        out: dict = {p: [] for p in fns}
        for _ in range(args.rounds):
            for p, (fn, grads, graphable) in fns.items():
                if isinstance(out[p], Exception):
                    continue
                try:
                    with mode():
                        out[p].append(common.time_fn(fn, device, grad_to_none=grads, budget_s=args.budget / args.rounds,
                                                     use_graph=use_graph and graphable))  # fmt: skip
                except Exception as err:  # one failing provider must not stop the others; its row says why
                    out[p] = err
        for p, v in out.items():
            if not isinstance(v, Exception):
                try:
                    out[p] = common.merge(v)
                except common.MixedTimers as err:  # the graph capture failed in some rounds only
                    out[p] = err
        return out

    timings = run(not args.no_graphs)

    def capture_failed(p: str) -> bool:
        t = timings[p]
        return isinstance(t, common.MixedTimers) or (isinstance(t, common.Timing) and fns[p][2] and not t.graphed)

    failed = [p for p in fns if capture_failed(p)]
    if failed and any(isinstance(t, common.Timing) and t.graphed for t in timings.values()):
        return run(False), f"graph capture failed for {', '.join(failed)}: every provider of this case timed eagerly"
    return timings, ""


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the whole sweep: every shape, batch 1/2/8, all dtypes, both routings, all sweeps, SD sizes",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--shapes", default=None, help="comma list: all, linear, conv, conv3x3, conv1x1 or names (--list-shapes)"
    )
    p.add_argument("--list-shapes", action="store_true", help="print the shape names and exit")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1 on CPU, 1,8 on GPU)")
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(PROVIDERS)} (base is always timed)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, fp16, bf16 (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    p.add_argument("--routing", default=None, help="comma list of sample, token (default sample)")
    p.add_argument("--shared", type=int, default=8, help="S, shared (always-on) ranks")
    p.add_argument("--routed", type=int, default=32, help="E, routed ranks")
    p.add_argument("--zero", type=int, default=4, help="Z, zero slots")
    p.add_argument("--top-k", type=int, default=8, help="k, slots picked per routing unit")
    p.add_argument(
        "--zero-picked", type=int, default=0, help="zero slots each unit picks (active ranks = S + k - this)"
    )
    p.add_argument("--sweep", default=None, help="comma list of ranks, k, zero, or none (default zero; --full all)")
    p.add_argument("--sweep-shape", default="lin1024x640", help="the shape the sweeps run on")
    p.add_argument(
        "--token-scale", type=float, default=None, help="scale the token counts (default 0.25 on CPU unless --full)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1: sound timings on a shared machine; 0 = torch's)",
    )
    p.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per provider and case (default 0.3 CPU, 0.25 GPU)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="GPU: interleaved timing rounds per case (default 1); CPU providers alternate sample by sample anyway",
    )
    p.add_argument(
        "--no-graphs", action="store_true", help="time forward calls eagerly instead of replaying a CUDA graph"
    )
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"), help="output directory"
    )
    p.add_argument("--plot", action="store_true", help="also write a PNG of the ratio to base (needs matplotlib)")
    args = p.parse_args(argv)
    if args.list_shapes:
        print(
            "\n".join(f"{n:22s} {s.kind:6s} tokens={s.tokens} c_in={s.c_in} c_out={s.c_out}" for n, s in SHAPES.items())
        )
        raise SystemExit(0)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"

    def lst(value, default):
        return [v.strip() for v in (value or default).split(",") if v.strip()]

    args.shapes = args.shapes or ("all" if args.full or gpu else ",".join(QUICK_SHAPES))
    args.batch = [int(b) for b in lst(args.batch, "1,2,8" if args.full else ("1,8" if gpu else "1"))]
    args.dtypes = lst(args.dtypes, "fp32,fp16,bf16" if args.full else ("bf16" if gpu else "fp32"))
    args.modes = lst(args.modes, "fwd,fwd+bwd")
    args.routing = lst(args.routing, "sample,token" if args.full else "sample")
    args.sweep = [s for s in lst(args.sweep, "ranks,k,zero" if args.full else "zero") if s != "none"]
    if args.providers is not None:
        args.providers = lst(args.providers, "")
    for name, values, allowed in (("--dtypes", args.dtypes, DTYPES), ("--modes", args.modes, MODES),
                                  ("--routing", args.routing, ("sample", "token")), ("--sweep", args.sweep, ("ranks", "k", "zero")),
                                  ("--providers", args.providers or (), PROVIDERS)):  # fmt: skip
        wrong = [v for v in values if v not in allowed]
        if wrong:
            raise SystemExit(f"{name}: unknown {wrong}; choose from {', '.join(allowed)}")
    if args.token_scale is None:
        args.token_scale = 1.0 if gpu or args.full else 0.25
    args.budget = args.budget or (0.25 if gpu else 0.3)
    args.rounds = args.rounds or 1
    args.threads_note = common.threads_note(args.threads, gpu)
    return args


def main(argv=None) -> dict:
    """Runs the benchmark (``argv`` as on the command line); returns ``{"meta", "rows", "paths"}``."""
    threads = torch.get_num_threads()
    try:
        return _run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # --threads must not leak into a caller (tests run in-process)


def timer_description(device: torch.device, args) -> str:
    if device.type == "cuda":
        graphs = "forward calls replayed from CUDA graphs of n calls" if not args.no_graphs else "no CUDA graphs"
        return f"CUDA events, L2 flushed before every call, {graphs}; {args.rounds} round(s) per case"
    return (
        f"{'process CPU time (1 thread)' if common.cpu_clock() is time.process_time else 'wall clock'}, "
        f"providers alternating sample by sample, >= {common.CPU_MIN_SAMPLES} samples of "
        f">= {common.CPU_SAMPLE_MS:g} ms and ~{args.budget:g} s per provider, median"
    )


def _run(args) -> dict:
    device = args.device
    common.l2_flush_buffer(device)  # allocated before anything is measured
    providers = ["base"] + [p for p in (args.providers or PROVIDERS) if p != "base"]
    flop_ops = flops.register_flop_formulas()
    meta = common.environment(device)
    meta.update(common.copy_ceiling(device))
    meta.update(
        dtypes=args.dtypes, modes=args.modes, routing=args.routing, batch=args.batch, shared=args.shared,
        routed=args.routed, zero=args.zero, top_k=args.top_k, zero_picked=args.zero_picked, token_scale=args.token_scale,
        budget_s=args.budget, cuda_graphs=device.type == "cuda" and not args.no_graphs, full=args.full,
        threads_note=args.threads_note, timer=timer_description(device, args), flop_formulas=flop_ops,
    )  # fmt: skip
    print(header(meta), flush=True)
    rows = []
    for case in build_cases(args):
        rows += measure_case(case, providers, device, args, meta["copy_GBps"])
    print()
    print_table(rows, providers, meta)
    if device.type == "cpu":
        print_targets(rows)
    stem = f"bench_mor_lora-{device.type}-{meta['time_utc'].replace(':', '').replace('+0000', 'Z')}"
    paths = common.write_outputs(args.out, stem, meta, rows, FIELDS)
    print(f"wrote {paths['csv']} and {paths['json']}")
    if args.plot:
        msg = plot(rows, os.path.join(args.out, f"{stem}.png"))
        paths["png"] = msg.split(": ", 1)[1] if msg.startswith("plot:") else None
        print(msg)
    return {"meta": meta, "rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
