#!/usr/bin/env python
"""The ``kernels`` stage of gpu_check.sh: every Triton kernel that the forward and the backward compile at the
SD 2.1-base shapes, read from the compiled artefacts: wgmma (Hopper's warpgroup MMA) or not, registers, spills,
stack, shared memory, warps and pipeline stages.

    python benchmarks/gpu_check_kernels.py --mode launch --cache DIR --csv OUT.csv     # on a GPU
    python benchmarks/gpu_check_kernels.py --mode aot --cache DIR --csv OUT.csv        # anywhere (sm_90)

``launch`` runs the real ops (``backend="triton"``) on the GPU; ``aot`` runs them on CPU tensors with every
Triton launch intercepted and compiled ahead of time for sm_90 instead (what
tests/kernels/test_triton_gpu_compile.py does; it leans on triton 3.8's JIT internals). Either way the kernels
land in the Triton cache ``--cache`` (an empty folder), and each new entry is attributed to the first case that
compiled it. Registers and spills come from ``ptxas -v`` on the cached PTX (Triton's own ptxas when it ships
one), wgmma from the PTX, HGMMA from the cubin's SASS (``cuobjdump``) when that tool is found.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys

SD_LINEAR = {"lin4096x320": (4096, 320), "lin1024x640": (1024, 640), "lin256x1280": (256, 1280),
             "lin64x1280": (64, 1280)}  # fmt: skip
SD_CONV = {
    f"conv{k}x{k}-{s}x{s}x{c}": (k, s, c) for k in (3, 1) for s, c in ((64, 320), (32, 640), (16, 1280), (8, 1280))
}
PAPER = dict(num_shared=8, num_routed=32, num_zero=4, top_k=8)
FIELDS = ("kernel", "dtype", "first_case", "num_warps", "num_stages", "shared_bytes", "registers", "spill_stores",
          "spill_loads", "stack_bytes", "wgmma", "mma_sync", "sass_hgmma", "arch", "hash", "note")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The cases: forward (no grad) and forward + backward (x, lora_a, lora_b and gate trainable, the base weight
# frozen, as in bench_mor_lora.py) of each SD layer, and the router.


def cases(args):
    import torch

    from mor_kernels.testing import random_case

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for dt in args.dtypes:
        dtype = dtypes[dt]
        for batch in args.batch:
            for name in args.shapes:
                if name in SD_LINEAR:
                    tokens, ch = SD_LINEAR[name]
                    for routing in args.routing:
                        c = random_case(routing=routing, batch=batch, tokens=tokens, d_in=ch, d_out=ch, **PAPER)
                        yield f"{name} b{batch} {routing} {dt}", "mor_linear", c.to(dtype, device=args.device)
                else:
                    k, side, ch = SD_CONV[name]
                    c = random_case(kernel_size=k, conv={"padding": (k // 2,) * 2}, batch=batch, d_in=ch, d_out=ch,
                                    height=side, width=side, **PAPER)  # fmt: skip
                    yield f"{name} b{batch} {dt}", "mor_conv2d", c.to(dtype, device=args.device)
            logits = torch.randn(batch * 4096, 36).to(dtype).to(args.device)
            yield f"route {batch * 4096}x36 {dt}", "route", logits


def run_case(op, c, ops, backward: bool) -> None:
    import torch

    if op == "route":
        ops.route(c, 8, 4)
        return
    t = {
        n: v.detach().requires_grad_(backward and n in ("x", "lora_a", "lora_b", "gate"))
        for n, v in c.tensors().items()
    }
    args = (t["x"], t["weight"], t.get("bias"), t["lora_a"], t["lora_b"], c.idx, t["gate"], c.num_shared, c.scaling)
    with torch.set_grad_enabled(backward):
        if op == "mor_linear":
            y = ops.mor_linear(*args)
        else:
            conv = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), **c.conv}
            y = ops.mor_conv2d(*args, conv["stride"], conv["padding"], conv["dilation"])
        if backward:
            y.backward(torch.ones_like(y))


class LaunchOps:
    """The public ops with ``backend="triton"`` (launch mode, on the GPU)."""

    def __init__(self):
        import mor_kernels

        self.m = mor_kernels

    def route(self, logits, k, z):
        return self.m.route(logits, k, z, backend="triton")

    def mor_linear(self, *args):
        return self.m.mor_linear(*args, backend="triton")

    def mor_conv2d(self, *args):
        return self.m.mor_conv2d(*args[:9], stride=args[9], padding=args[10], dilation=args[11], backend="triton")


def answer_as_on_a_gpu() -> list[str]:
    """Every tile-table function of ``mor_kernels.kernels`` (a ``*_config`` whose first parameter is ``device``),
    in every module that holds it, answers as for a CUDA device, so the launchers pick their GPU tiles on CPU
    tensors. Returns the patched ``module.name``s."""
    import importlib
    import inspect
    import pkgutil

    import torch

    import mor_kernels.kernels as package

    cuda, patched = torch.device("cuda"), []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, fn in list(vars(module).items()):
            if not (name.endswith("_config") and inspect.isfunction(fn)):
                continue
            params = list(inspect.signature(fn).parameters)
            if params[:1] == ["device"]:
                setattr(module, name, lambda device, *a, _f=fn, **k: _f(cuda, *a, **k))
                patched.append(f"{info.name}.{name}")
    return patched


class AotOps:
    """aot mode: the Triton backend's ops on CPU tensors, every ``JITFunction.run`` recorded instead of launched
    and compiled for sm_90 by :meth:`compile` (triton 3.8's JIT internals, as in test_triton_gpu_compile.py)."""

    def __init__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        from mor_kernels.ops import triton_backend

        self.triton, self.ASTSource = triton, ASTSource
        self.target = GPUTarget("cuda", 90, 32)
        backend = make_backend(self.target)
        self.pending: dict = {}

        def record(fn, *args, grid, warmup, **kwargs):
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
            key = (fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
            self.pending.setdefault(key, (fn, signature, constexprs, attrs, options))

        JITFunction.run = record
        answer_as_on_a_gpu()
        self.ops = triton_backend

    def route(self, logits, k, z):
        return self.ops.route(logits, k, z)

    def mor_linear(self, *args):
        return self.ops.mor_linear(*args)

    def mor_conv2d(self, *args):
        return self.ops.mor_conv2d(*args)

    def compile(self) -> list[str]:
        """Compiles what was recorded since the last call; returns the failures."""
        failures = []
        for (name, *_), (fn, signature, constexprs, attrs, options) in self.pending.items():
            try:
                src = self.ASTSource(fn, signature, constexprs, attrs)
                self.triton.compile(src, target=self.target, options=options.__dict__)
            except Exception as err:  # every failure is reported, not only the first
                failures.append(f"{name}: {type(err).__name__}: {str(err)[:500]}")
        self.pending.clear()
        return failures


# ------------------------------------------------------------------------------------------------
# Reading the artefacts


def find_tool(name: str) -> str | None:
    """Triton's bundled copy of ``name`` first (the one that compiled the kernels), then PATH and CUDA_HOME."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    return None


def _int(pattern: str, text: str) -> int | None:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def analyse(entry: str, ptxas: str | None, cuobjdump: str | None) -> dict | None:
    """One Triton cache entry (a folder) -> a row, or None when it holds no compiled kernel."""
    metas = [p for p in glob.glob(os.path.join(entry, "*.json")) if not os.path.basename(p).startswith("__grp__")]
    meta = None
    for path in metas:
        with open(path) as f:
            data = json.load(f)
        if "name" in data and "num_warps" in data:
            meta = data
    if meta is None:
        return None
    name = meta["name"]
    row = {"kernel": name, "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
           "shared_bytes": meta.get("shared"), "hash": str(meta.get("hash", ""))[:12], "note": ""}  # fmt: skip
    ptx_path, cubin_path = os.path.join(entry, f"{name}.ptx"), os.path.join(entry, f"{name}.cubin")
    ttir = os.path.join(entry, f"{name}.ttir")
    if os.path.exists(ttir):
        with open(ttir) as f:
            head = f.read()
        m = re.search(r"tt\.func public @\w+\((.*?)\)\s*(attributes|\{)", head, re.S)
        ptrs = re.findall(r"!tt\.ptr<(\w+)>", m.group(1) if m else "")
        row["dtype"] = next((t for t in ("bf16", "f16", "f32") if t in ptrs), "")  # a 16-bit operand, else f32
    if not os.path.exists(ptx_path):
        row["note"] = "no PTX in the cache entry"
        return row
    with open(ptx_path) as f:
        ptx = f.read()
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M)
    row["arch"] = arch.group(1) if arch else ""
    row["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
    row["mma_sync"] = len(re.findall(r"\bmma\.sync", ptx))
    if ptxas and row["arch"]:
        proc = subprocess.run([ptxas, f"-arch={row['arch']}", "-v", ptx_path, "-o", os.devnull],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        text = proc.stdout + proc.stderr
        row["registers"] = _int(r"Used (\d+) registers", text)
        row["spill_stores"] = _int(r"(\d+) bytes spill stores", text)
        row["spill_loads"] = _int(r"(\d+) bytes spill loads", text)
        row["stack_bytes"] = _int(r"(\d+) bytes stack frame", text)
        if proc.returncode != 0:
            row["note"] = f"ptxas failed: {text.strip()[-200:]}"
    elif not ptxas:
        row["note"] = "no ptxas found: registers and spills unknown"
    if cuobjdump and os.path.exists(cubin_path):
        proc = subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, text=True, timeout=120)
        row["sass_hgmma"] = len(re.findall(r"\bHGMMA\b", proc.stdout)) if proc.returncode == 0 else ""
    return row


def write_csv(rows: list[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("launch", "aot"), required=True)
    p.add_argument("--cache", required=True, help="the Triton cache folder to fill (empty or absent)")
    p.add_argument("--csv", required=True, help="where the table goes")
    p.add_argument("--shapes", default=",".join([*SD_LINEAR, *SD_CONV]), help="comma list of SD layer names")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--dtypes", default="bf16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--routing", default="sample,token", help="Linear routing levels (convs route per sample)")
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.batch = [int(b) for b in args.batch.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.routing = args.routing.split(",")
    unknown = [s for s in args.shapes if s not in SD_LINEAR and s not in SD_CONV]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join([*SD_LINEAR, *SD_CONV])}")
    os.makedirs(args.cache, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.cache)  # before triton is imported
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    args.device = "cuda" if args.mode == "launch" else "cpu"
    if args.mode == "launch" and not torch.cuda.is_available():
        raise SystemExit("--mode launch needs a CUDA device; use --mode aot")
    ops = LaunchOps() if args.mode == "launch" else AotOps()
    ptxas, cuobjdump = find_tool("ptxas"), find_tool("cuobjdump")
    rows, failures = [], []
    try:
        for label, op, c in cases(args):
            for backward in (False, True) if op != "route" else (False,):
                before = set(os.listdir(args.cache))
                case = f"{label} {'fwd+bwd' if backward else 'fwd'}"
                try:
                    run_case(op, c, ops, backward)
                    if args.mode == "launch":
                        torch.cuda.synchronize()
                    else:
                        failures += [f"{case}: {f}" for f in ops.compile()]
                except Exception as err:  # report every case that fails, then go on
                    failures.append(f"{case}: {type(err).__name__}: {str(err)[:500]}")
                for entry in sorted(set(os.listdir(args.cache)) - before):
                    row = analyse(os.path.join(args.cache, entry), ptxas, cuobjdump)
                    if row is not None:
                        rows.append({**row, "first_case": case})
                write_csv(rows, args.csv)  # after every case: a run stopped at its time cap keeps the table so far
    except KeyboardInterrupt:  # gpu_check.sh's time cap (SIGINT): keep what was compiled
        failures.append("interrupted at the time cap: the table holds the cases run so far")
    print(f"{'kernel':22s} {'dtype':5s} {'warps':>5s} {'stages':>6s} {'smem':>7s} {'regs':>5s} {'spill':>6s} "
          f"{'wgmma':>5s} {'HGMMA':>5s}  first compiled for")  # fmt: skip
    for r in rows:
        print(f"{r['kernel']:22s} {r.get('dtype', ''):5s} {r['num_warps']!s:>5s} {r['num_stages']!s:>6s} "
              f"{r['shared_bytes']!s:>7s} {r.get('registers')!s:>5s} {r.get('spill_stores')!s:>6s} "
              f"{r.get('wgmma')!s:>5s} {r.get('sass_hgmma', '')!s:>5s}  {r['first_case']}")  # fmt: skip
    print(f"{len(rows)} compiled kernels ({args.mode}, ptxas: {ptxas or 'not found'}); wrote {args.csv}")
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
