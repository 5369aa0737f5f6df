"""The stdout table, the header and the PNG plot of bench_mor_lora.py (one row per case, one ratio
column per provider)."""

from __future__ import annotations

import math


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(rows: list[dict], providers: list[str], meta: dict) -> None:
    shown = [
        p for p in providers if p != "base" and any(r["provider"] == p and r["status"] != "unavailable" for r in rows)
    ]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["provider"]): r for r in rows}
    head = f"{'layer':19s} {'T':>5s} {'B':>2s} {'dtype':5s} {'rout':4s} {'mode':7s} {'k':>2s} {'z':>2s} {'act/R':>6s} {'base ms':>8s} {'±%':>4s}"
    head += (
        "".join(f" {p.replace('reference', 'ref'):>10s}" for p in shown)
        + f" {'best MoR GB/s':>13s} {'%copy':>5s} {'GFLOP use/exe':>14s}"
    )
    print(head)
    print("-" * len(head))
    sweep = "main"
    for c in cases:
        r0 = by[(c, "base")]
        if r0["sweep"] != sweep:
            sweep = r0["sweep"]
            zero = f"Z={r0['num_zero']}"
            if r0["num_zero"] != meta["zero"]:
                zero += (
                    f", not the header's Z={meta['zero']}: Z >= k so that every zero-slot count up to k is reachable"
                )
            print(f"-- {sweep} sweep ({r0['layer']}, {r0['dtype']}, B{r0['batch']}, {zero}):")
        spread = (r0["p80_ms"] - r0["p20_ms"]) / 2 / r0["median_ms"] * 100 if r0.get("median_ms") else None
        line = (
            f"{r0['layer']:19s} {r0['tokens']:5d} {r0['batch']:2d} {r0['dtype']:5s} {r0['routing'][:3]:4s} {r0['mode']:7s} "
            f"{r0['top_k']:2d} {r0['zero_picked']:2d} {r0['lora_rank']:>2d}/{r0['ranks']:<3d} "
            f"{_fmt(r0.get('median_ms'), '8.3f')} {_fmt(spread, '4.0f')}"
        )
        for p in shown:
            r = by[(c, p)]
            cell = {"unavailable": "n/a", "error": "ERROR"}.get(r["status"])
            if cell is None:
                ratio = r.get("paired_to_base") or r["ratio_to_base"]
                cell = f"{r['median_ms']:.3f}ms" if ratio is None else f"{ratio:.2f}x"
                cell += "!" if r.get("timing_flag") else ""
            line += f" {cell:>10s}"
        mor = [by[(c, p)] for p in shown if p.startswith("mor:") and by[(c, p)]["status"] == "ok"]
        best = min(mor, key=lambda r: r["median_ms"]) if mor else None
        if best:
            line += f" {best['achieved_gbps']:13.1f} {best['copy_fraction'] * 100:5.0f} {best['useful_gflop']:6.2f}/{best['executed_gflop']:<7.2f}"
        print(line)
    print("-" * len(head))
    notes = {}
    for r in rows:
        if r["status"] != "ok":
            notes.setdefault((r["provider"], r["status"], r["reason"]), 0)
            notes[(r["provider"], r["status"], r["reason"])] += 1
    for (p, status, reason), n in notes.items():
        print(f"{p}: {status} ({n} cases): {reason}")
    flagged = [r for r in rows if r.get("timing_flag")]
    if flagged:
        print(
            f"! unreliable ({len(flagged)} rows, timing_flag in the CSV/JSON): a provider that does strictly more work "
            "than base came out below 0.9x base, so the timer, not the kernel, made the number; rerun on an idle machine"
        )


#: issue 13's CPU targets (benchmarks/README.md, "CPU results"), judged on the paired ratios of one run: mor:auto in
#: inference no more than this over the dense LoRA of its active rank at every shape, ...
TARGET_VS_LORA_FWD = 1.03
#: ... no more than this over the bare base layer at the many-tokens-per-weight shapes below, ...
TARGET_VS_BASE_FWD = 1.05
TARGET_BASE_SHAPES = ("lin4096x320", "conv1x1-64x64x320")
#: ... and, forward and backward, no more than this over the dense LoRA.
TARGET_VS_LORA_BWD = 1.10


def _worst(rows: list[dict], key: str) -> tuple[str, list[float]] | None:
    vals = [(r[key], r["layer"]) for r in rows if r.get(key) is not None]
    return (f"worst {max(vals)[0]:.3f}x at {max(vals)[1]}", [v for v, _ in vals]) if vals else None


def cpu_targets(rows: list[dict], provider: str = "mor:auto") -> list[tuple[str, str, str]]:
    """``(target, verdict, measured)`` per CPU target that this run's rows can judge (``verdict``: ``met`` or
    ``missed``), from the paired ratios (``paired_to_base``/``paired_to_lora``) of ``provider``'s sample-routed
    rows; targets without rows (other shapes, other providers, a GPU run) are left out."""
    ok = [r for r in rows if r["provider"] == provider and r["status"] == "ok" and r["routing"] == "sample"]
    out = []

    def judge(text, vals, limit, measured):
        out.append((text, "met" if max(vals) <= limit else "missed", measured))

    for mode, limit in (("fwd", TARGET_VS_LORA_FWD), ("fwd+bwd", TARGET_VS_LORA_BWD)):
        found = _worst([r for r in ok if r["sweep"] == "main" and r["mode"] == mode], "paired_to_lora")
        if found:
            judge(f"{mode}: {provider} <= {limit:g}x the dense LoRA of its active rank, every shape", found[1], limit,
                  f"{found[0]} ({min(found[1]):.3f}-{max(found[1]):.3f}x over {len(found[1])} rows)")  # fmt: skip
    named = [r for r in ok if r["sweep"] == "main" and r["mode"] == "fwd" and r["layer"] in TARGET_BASE_SHAPES]
    found = _worst(named, "paired_to_base")
    if found:
        judge(f"fwd: {provider} <= {TARGET_VS_BASE_FWD:g}x the bare layer at {', '.join(TARGET_BASE_SHAPES)}",
              found[1], TARGET_VS_BASE_FWD,
              ", ".join(f"{r['layer']} b{r['batch']} {r['dtype']} {r['paired_to_base']:.3f}x" for r in named))  # fmt: skip
    sweep = sorted((r for r in ok if r["sweep"] == "zero" and r["mode"] == "fwd" and r.get("paired_to_base")),
                   key=lambda r: r["zero_picked"])  # fmt: skip
    if len(sweep) >= 2 and sweep[-1].get("paired_to_lora") is not None:
        first, last = sweep[0], sweep[-1]
        falls = last["paired_to_base"] < first["paired_to_base"] and last["paired_to_lora"] <= 1.0
        out.append((
            f"zero sweep: {provider}'s time falls with the zero slots picked, and with {last['zero_picked']} of "
            f"{last['top_k']} picked is no more than the dense rank-{last['lora_rank']} LoRA",
            "met" if falls else "missed",
            " -> ".join(f"{r['paired_to_base']:.3f}x@z{r['zero_picked']}" for r in sweep)
            + f" base; {last['paired_to_lora']:.3f}x the rank-{last['lora_rank']} LoRA",
        ))  # fmt: skip
    return out


def print_targets(rows: list[dict]) -> None:
    """The lines of :func:`cpu_targets` under a heading (nothing when no target can be judged)."""
    targets = cpu_targets(rows)
    if targets:
        print("targets on this CPU (issue 13, benchmarks/README.md 'CPU results'; paired ratios of this run):")
        for text, verdict, measured in targets:
            print(f"  {verdict.upper():6s} {text}: {measured}")


def header(meta: dict) -> str:
    lines = [
        f"MoR layer benchmark on {meta['device']} ({meta['device_name']}), {meta['threads_note']}; torch "
        f"{meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; commit {(meta['git_commit'] or '?')[:10]}"
        f"{' (dirty)' if meta['git_dirty'] else ''}; {meta['time_utc']}",
        f"copy ceiling {meta['copy_GBps']:.1f} GB/s; MoR S={meta['shared']} E={meta['routed']} Z={meta['zero']} k={meta['top_k']}, "
        f"{meta['zero_picked']} zero slots picked (z = zero slots picked per unit, act/R = active ranks / total ranks; dense LoRA rank = active)",
    ]
    lines.append(f"timer: {meta['timer']}")
    if meta.get("load_avg_1min") is not None and meta["load_avg_1min"] > 0.75 * (meta["cpu_count"] or 1):
        load = f"load average {meta['load_avg_1min']:.1f} on {meta['cpu_count']} cores: other processes are running; "
        if meta["device"] == "cpu" and meta["torch_threads"] > 1:
            load = "WARNING: " + load + "wall-clock timings on several threads are unreliable (drop --threads)"
        else:
            load = "note: " + load + "providers are interleaved; cache and memory-bandwidth contention remain"
        lines.append(load)
    if meta["token_scale"] != 1.0:
        lines.append(
            f"REDUCED SIZES: token counts x{meta['token_scale']} (conv images {math.sqrt(meta['token_scale']):.2g}x per side) "
            "for a quick CPU run; --full or --token-scale 1 for the SD 2.1 sizes"
        )
    ratio = (
        "median over the interleaved rounds of provider sample / base sample of the same round (paired_to_base; "
        "the ratio of the medians is ratio_to_base in the CSV/JSON)"
        if meta["device"] == "cpu"
        else "provider median / base median"
    )
    lines.append(
        f"columns: ratio = {ratio} (same run; ! = unreliable, see below); ±% = half the p20-p80 spread of base"
    )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if r["status"] == "ok" and r["provider"] != "base" and r.get("ratio_to_base")]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(cases) * max(1, len(provs)) / 2), 5))
    width = 0.8 / max(1, len(provs))
    for j, p in enumerate(provs):
        vals = {r["case"]: r["ratio_to_base"] for r in ok if r["provider"] == p}
        ax.bar([i + j * width for i in range(len(cases))], [vals.get(c, 0) for c in cases], width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=75, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("time / bare base layer (log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
