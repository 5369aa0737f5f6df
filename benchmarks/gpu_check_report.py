"""What gpu_check.sh writes: the JUnit parts of the parity stage merged and counted, the five speed goals read
from the benchmarks' CSV rows (each ratio next to its goal, met / missed), and the one-page ``summary.md``.

Reads the benchmark CSVs by column name and tolerates missing columns (a row without the columns a goal needs
is left out, and a goal without rows says "not measured" with the reason), so the benchmark scripts can change
without breaking the summary.
"""

from __future__ import annotations

import collections
import csv
import os
import xml.etree.ElementTree as ET

CPU_MARK = "CPU, not a GPU result"

# The goals of issue 11 (README "Performance"): (key, text, target, comparison).
GOALS = (
    ("linear", "fused MoR Linear vs bare F.linear (forward)", 1.15, "<="),
    ("conv", "MoR Conv2d vs bare cuDNN conv (forward)", 1.15, "<="),
    ("fwd_bwd", "fwd+bwd speed-up over the reference path", 2.0, ">="),
    ("unet", "UNet with MoR vs the no-adapter UNet", 1.05, "<="),
    ("ranks", "LoRA-branch time falls with active ranks (zero sweep)", None, "falls"),
)
#: a step of the zero sweep may rise by this fraction of the first overhead and still count as "falling" (noise)
SWEEP_NOISE = 0.05


# ------------------------------------------------------------------------------------------------
# JUnit


def merge_junit(parts: list[tuple[str, str]], out_path: str) -> None:
    """Merges pytest's JUnit files ``[(label, path)]`` into one ``<testsuites>``, each suite named by its label."""
    root = ET.Element("testsuites")
    for label, path in parts:
        try:
            tree = ET.parse(path)
        except (OSError, ET.ParseError) as err:
            suite = ET.SubElement(root, "testsuite", name=label, errors="1", tests="0")
            ET.SubElement(suite, "system-err").text = f"no JUnit report: {err}"
            continue
        suites = [tree.getroot()] if tree.getroot().tag == "testsuite" else list(tree.getroot())
        for suite in suites:
            suite.set("name", label)
            root.append(suite)
    ET.ElementTree(root).write(out_path + ".tmp", encoding="utf-8", xml_declaration=True)
    os.replace(out_path + ".tmp", out_path)


def junit_counts(path: str) -> dict:
    """``{passed, failed, errors, skipped, failures: [(test, first line)], skip_reasons: Counter}`` of one file."""
    counts = {
        "passed": 0,
        "failed": 0,
        "errors": 0,
        "skipped": 0,
        "failures": [],
        "skip_reasons": collections.Counter(),
    }
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            key = "failed" if "failure" in kinds else "errors"
            counts[key] += 1
            child = kinds.get("failure", kinds.get("error"))
            message = (child.get("message") or child.text or "").strip().splitlines()
            counts["failures"].append((name, message[0][:200] if message else ""))
        elif "skipped" in kinds:
            counts["skipped"] += 1
            counts["skip_reasons"][(kinds["skipped"].get("message") or "").strip()[:160]] += 1
        else:
            counts["passed"] += 1
    for suite in root.iter("testsuite"):  # a collection error has no testcase of its own
        if not list(suite.iter("testcase")) and int(suite.get("errors", "0") or 0):
            counts["errors"] += int(suite.get("errors"))
            counts["failures"].append((suite.get("name", "?"), "no tests ran (collection error or no report)"))
    return counts


# ------------------------------------------------------------------------------------------------
# Benchmark CSVs and goals


def read_csv(path: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN -> None


def _ok(rows, **match) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _fused_providers(rows) -> list[str]:
    """The MoR providers the goals judge: what a layer runs (``mor:auto``) and each fused backend; not the
    reference, and not ``mor:merged`` (forced merged weights: the merge crossover's data, not a path of its own)."""
    found = {r["provider"] for r in rows if r.get("provider", "").startswith("mor:")}
    return sorted(found - {"mor:reference", "mor:merged"})


def _case(r: dict) -> str:
    return f"{r.get('layer', '?')} b{r.get('batch', '?')}"


def goals(bench_rows: list[dict], pipeline_rows: list[dict], bench_note: str, pipeline_note: str) -> list[dict]:
    """One dict per goal and backend: ``goal, target, backend, measured, verdict, detail``; ``verdict`` is
    ``met`` / ``missed`` / ``not measured`` (the ``detail`` says why); CPU rows are judged by the caller."""
    out = []

    def add(key, backend, measured, ok, detail):
        text, target = next((g[1], f"{g[3]} {g[2]}x" if g[2] else g[3]) for g in GOALS if g[0] == key)
        verdict = "not measured" if ok is None else ("met" if ok else "missed")
        out.append(dict(goal=text, key=key, target=target, backend=backend, measured=measured, verdict=verdict,
                        detail=detail))  # fmt: skip

    for key, kind in (("linear", "linear"), ("conv", "conv2d")):
        rows = _ok(bench_rows, kind=kind, mode="fwd", sweep="main")
        providers = _fused_providers(rows)
        for p in providers:
            ratios = [(_num(r.get("ratio_to_base")), _case(r)) for r in _ok(rows, provider=p)]
            ratios = [(v, c) for v, c in ratios if v is not None]
            if not ratios:
                continue
            worst = max(ratios)
            add(key, p, f"{min(ratios)[0]:.2f}x - {worst[0]:.2f}x over {len(ratios)} cases",
                worst[0] <= 1.15, f"worst {worst[1]}")  # fmt: skip
        if not any(g["key"] == key for g in out):
            add(key, "-", "-", None, bench_note or f"no fused-backend {kind} forward rows in the benchmark output")

    rows = _ok(bench_rows, mode="fwd+bwd", sweep="main")
    providers = _fused_providers(rows)
    for p in providers:
        ref_ms = {(_case(r), r.get("kind")): _num(r.get("median_ms")) for r in _ok(rows, provider="mor:reference")}
        speedups = []
        for r in _ok(rows, provider=p):
            ref, ms = ref_ms.get((_case(r), r.get("kind"))), _num(r.get("median_ms"))
            if ref and ms:
                speedups.append((ref / ms, f"{_case(r)}"))
        if speedups:
            worst = min(speedups)
            add("fwd_bwd", p, f"{worst[0]:.2f}x - {max(speedups)[0]:.2f}x over {len(speedups)} cases",
                worst[0] >= 2.0, f"worst {worst[1]}")  # fmt: skip
    if not any(g["key"] == "fwd_bwd" for g in out):
        add("fwd_bwd", "-", "-", None, bench_note or "no fwd+bwd rows with both a fused backend and mor:reference")

    # part "unet": eager calls (host time included); "unet-graph": the same replayed from a CUDA graph (device time)
    unet = [r for r in pipeline_rows if r.get("part") in ("unet", "unet-graph") and r.get("status") == "ok"]
    for r in unet:
        ratio = _num(r.get("ratio_to_none"))
        if r.get("variant", "").startswith("mor") and ratio is not None:
            label = r["variant"] + (" (CUDA graph)" if r["part"] == "unet-graph" else "")
            add("unet", label, f"{ratio:.3f}x", ratio <= 1.05, f"median {_num(r.get('median_ms')) or 0:.2f} ms")
    if not any(g["key"] == "unet" for g in out):
        add("unet", "-", "-", None, pipeline_note or "no UNet rows with a MoR variant in the pipeline output")

    sweep = _ok(bench_rows, sweep="zero", mode="fwd")
    for p in _fused_providers(sweep) + (["mor:reference"] if _ok(sweep, provider="mor:reference") else []):
        points = sorted(
            ((_num(r.get("active_ranks")), _num(r.get("overhead_ms"))) for r in _ok(sweep, provider=p)),
            key=lambda t: -(t[0] or 0),
        )
        points = [(a, o) for a, o in points if a is not None and o is not None]
        if len(points) < 2:
            continue
        first, last = points[0][1], points[-1][1]
        rises = [b - a for (_, a), (_, b) in zip(points, points[1:], strict=False)]
        falls = last < first and all(r <= SWEEP_NOISE * abs(first) for r in rises)
        add("ranks", p, " -> ".join(f"{o * 1e3:.1f} us@{a:g}" for a, o in points), falls,
            f"overhead over base by active ranks; a step may rise {SWEEP_NOISE:.0%} of the first (noise)")  # fmt: skip
    if not any(g["key"] == "ranks" for g in out):
        add("ranks", "-", "-", None, bench_note or "no zero-sweep rows in the benchmark output")
    return out


# ------------------------------------------------------------------------------------------------
# summary.md


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def render(info: dict, stages: list[dict], goal_rows: list[dict], kernels: list[dict], parity: dict) -> str:
    """The one-page summary: headline, stages, goals, parity failures, kernels."""
    cpu = info.get("dry_run")
    lines = [f"# GPU check: {info.get('device', '?')} ({info.get('date', '?')})", ""]
    if cpu:
        lines += [f"**Dry run on the CPU: every number on this page is {CPU_MARK}.**", ""]
    lines += [
        f"- result: **{info.get('verdict', 'incomplete (the run was cut short?)')}** (exit code "
        f"{info.get('exit_code', '-')})",
        f"- command: `{info.get('command', '?')}`",
        f"- commit {info.get('commit', '?')}; {info.get('versions', '')}",
        "",
        "## Stages",
        "",
        "| stage | status | seconds (cap) | what happened |",
        "| --- | --- | --- | --- |",
    ]
    for s in stages:
        cap = f" ({s['cap_s']:.0f})" if s.get("cap_s") else ""
        lines.append(
            f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f}{cap} | {_cell(s.get('summary', ''))} |"
        )
    lines += [
        "",
        "## Goals",
        "",
        "| goal | target | backend | measured | verdict | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for g in goal_rows:
        verdict = g["verdict"] if not cpu or g["verdict"] == "not measured" else f"not judged ({CPU_MARK})"
        measured = g["measured"] + (f" ({CPU_MARK})" if cpu and g["measured"] != "-" else "")
        lines.append(f"| {g['goal']} | {g['target']} | {g['backend']} | {_cell(measured)} | **{verdict}** | "
                     f"{_cell(g['detail'])} |")  # fmt: skip
    failures = parity.get("failures", [])
    if failures:
        lines += ["", f"## Parity failures ({len(failures)}; the first 25, full list in parity.xml)", ""]
        lines += [f"- `{_cell(name)}`: {_cell(msg)}" for name, msg in failures[:25]]
    reasons = parity.get("skip_reasons")
    if reasons:
        lines += ["", "## Why tests were skipped (most frequent)", ""]
        lines += [f"- {n} x {_cell(r) or '(no reason given)'}" for r, n in reasons.most_common(6)]
    if kernels:
        lines += ["", f"## Triton kernels at the SD shapes ({len(kernels)} compiled; all in kernels.csv)", "",
                  "| kernel | dtype | warps/stages | smem B | regs | spill B | wgmma | HGMMA | first compiled for |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for k in kernels[:40]:
            lines.append(f"| {k.get('kernel')} | {k.get('dtype', '')} | {k.get('num_warps')}/{k.get('num_stages')} | "
                         f"{k.get('shared_bytes')} | {k.get('registers', '')} | {k.get('spill_stores', '')} | "
                         f"{k.get('wgmma', '')} | {k.get('sass_hgmma', '')} | {k.get('first_case', '')} |")  # fmt: skip
    lines += ["", "Files: " + ", ".join(info.get("files", [])), ""]
    return "\n".join(lines)
