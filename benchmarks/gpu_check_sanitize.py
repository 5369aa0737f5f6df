#!/usr/bin/env python
"""The program the ``sanitize`` stage of gpu_check.sh runs under ``compute-sanitizer`` (memcheck, racecheck):
one small call of each compiled op (``torch.ops.mor.route``, ``dense_gate``, ``lora_fwd`` with and without a
base, ``lora_bwd``, ``conv_up``) in float32 and bfloat16, sample and token routing, at an odd shape (ragged
token and channel tiles) and an aligned one (the tensor-core forward's full tiles).

    python benchmarks/gpu_check_sanitize.py [--device cuda|cpu]

Inputs are made on the CPU and copied over (the two convolutions that feed ``conv_up`` too), so the only kernels
the sanitizer sees are the extension's and a few copies. ``--device cpu`` runs the same calls on the C++
kernels: the dry run's check that this program still matches the ops' schemas.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from mor_kernels import _extension
from mor_kernels.testing import random_case

PAPER = dict(num_shared=8, num_routed=32, num_zero=4, top_k=8)
SHAPES = {"odd": dict(tokens=70, d_in=45, d_out=37), "aligned": dict(tokens=64, d_in=64, d_out=64)}


def calls(device: str):
    """Yields ``(label, thunk)`` for every op call; each thunk returns the op's outputs."""
    ops = torch.ops.mor
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        logits = torch.randn(70, 36, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
        yield f"route {tag}", lambda logits=logits: ops.route(logits, 8, 4, True)
        for shape_name, shape in SHAPES.items():
            for routing in ("sample", "token"):
                c = random_case(routing=routing, **shape, **PAPER, seed=2).to(dtype, device=device)
                label = f"{tag} {routing} {shape_name}"
                base = torch.randn(2, shape["tokens"], shape["d_out"]).to(dtype).to(device)
                args = (c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
                yield f"dense_gate {label}", lambda c=c: ops.dense_gate(c.idx, c.gate, c.num_shared, 40)
                yield f"lora_fwd {label}", lambda args=args: ops.lora_fwd(*args, None)
                yield f"lora_fwd+base {label}", lambda args=args, base=base: ops.lora_fwd(*args, base)

                def bwd(args=args, c=c):
                    y, h = ops.lora_fwd(*args, None)
                    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
                    return ops.lora_bwd(dy, c.x, c.lora_a, c.lora_b, c.idx, c.gate, h, c.num_shared, c.scaling,
                                        [True] * 4)  # fmt: skip

                yield f"lora_bwd {label}", bwd
        conv = random_case(kernel_size=3, conv={"padding": (1, 1)}, d_in=5, d_out=37, height=9, width=7, **PAPER,
                           seed=4)  # fmt: skip
        base = F.conv2d(conv.x, conv.weight, padding=1).to(dtype).to(device)  # conv_up's schema: base, z_rank
        z_rank = F.conv2d(conv.x, conv.lora_a, padding=1).to(dtype).to(device)
        c = conv.to(dtype, device=device)
        yield f"conv_up {tag}", lambda base=base, z=z_rank, c=c: ops.conv_up(base, z, c.lora_b, c.idx, c.gate,
                                                                            c.num_shared, c.scaling)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    ext, why = _extension.load()
    if ext is None:
        print(f"the compiled extension is not built here: {why}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not _extension.has_kernel("lora_fwd", "CUDA"):
        print("the extension has no CUDA kernels (built without its CUDA sources)", file=sys.stderr)
        return 2
    done = 0
    for label, thunk in calls(args.device):
        outs = thunk()
        outs = outs if isinstance(outs, tuple | list) else (outs,)
        if args.device == "cuda":
            torch.cuda.synchronize()  # an error is reported at this call, not a later one
        bad = [i for i, t in enumerate(outs) if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            print(f"{label}: non-finite values in outputs {bad}", file=sys.stderr)
            return 1
        done += 1
    print(f"sanitize program: {done} op calls ran on {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
