"""The cases of bench_mor_lora.py: the SD 2.1-base MoR layer shapes, one case per (shape, batch, ranks,
routing, mode, dtype), its random inputs with routing built directly (every unit picks exactly
``zero_picked`` zero slots), and the case list that the command-line flags select."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from mor_kernels import flops

MOR_BACKENDS = ("reference", "triton", "cuda", "cpp", "blas")
#: ``mor:auto`` is what a MoR layer runs (backend and per-call merge decision of ``"auto"``); ``mor:merged``
#: forces the per-sample merged weights (``merge="always"``: built in every call, as a layer pays once per image;
#: forward only), the other side of the merge decision; the ``mor:<backend>`` providers run that backend's
#: low-rank path
PROVIDERS = ("base", "lora", "mor:auto", "mor:merged") + tuple(f"mor:{b}" for b in MOR_BACKENDS)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    """One adapted layer of SD 2.1-base at 512x512 (64x64 latent), per sample."""

    name: str
    kind: str  # "linear" or "conv2d"
    tokens: int  # T for a Linear, H * W for a conv
    c_in: int
    c_out: int
    kernel: int = 1

    @property
    def side(self) -> int:
        return math.isqrt(self.tokens)


def _sd21_shapes() -> dict[str, Shape]:
    shapes = {}
    for tokens, ch in ((4096, 320), (1024, 640), (256, 1280), (64, 1280)):
        side = math.isqrt(tokens)
        shapes[f"lin{tokens}x{ch}"] = Shape(f"lin{tokens}x{ch}", "linear", tokens, ch, ch)
        for k in (3, 1):
            name = f"conv{k}x{k}-{side}x{side}x{ch}"
            shapes[name] = Shape(name, "conv2d", tokens, ch, ch, k)
    return shapes


SHAPES = _sd21_shapes()
QUICK_SHAPES = ("lin4096x320", "lin1024x640", "lin256x1280", "lin64x1280", "conv3x3-32x32x640", "conv1x1-64x64x320")


@dataclass(frozen=True)
class Case:
    shape: Shape
    batch: int
    num_shared: int
    num_routed: int
    num_zero: int
    top_k: int
    zero_picked: int  # zero slots each routing unit picks (sets the active ranks)
    routing: str  # "sample" or "token"
    mode: str
    dtype: str
    sweep: str = "main"

    @property
    def ranks(self) -> int:
        return self.num_shared + self.num_routed

    @property
    def active(self) -> int:
        return self.num_shared + self.top_k - self.zero_picked

    @property
    def op(self) -> str:
        return "mor_linear" if self.shape.kind == "linear" else "mor_conv2d"

    def layer(self) -> flops.Layer:
        s = self.shape
        if s.kind == "linear":
            return flops.linear_layer(self.batch, s.tokens, s.c_in, s.c_out)
        pad = s.kernel // 2
        return flops.conv2d_layer(self.batch, s.c_in, s.c_out, (s.side, s.side), (s.kernel,) * 2, padding=(pad, pad))


# ----------------------------------------------------------------------------------------------
# Inputs


def make_routing(case: Case, device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx`` int32 and ``gate`` float32, ``(B, k)`` or ``(B, T, k)``: every unit picks exactly
    ``zero_picked`` zero slots (``-1``) and ``k - zero_picked`` distinct routed ranks at random."""
    lead = (case.batch,) if case.routing == "sample" else (case.batch, case.shape.tokens)
    real = case.top_k - case.zero_picked
    picks = torch.rand(*lead, case.num_routed, generator=gen).argsort(dim=-1)[..., :real]
    idx = torch.cat([picks, torch.full((*lead, case.zero_picked), -1, dtype=torch.long)], dim=-1)
    idx = idx.gather(-1, torch.rand(*lead, case.top_k, generator=gen).argsort(dim=-1))  # zero slots anywhere
    gate = torch.rand(*lead, case.top_k, generator=gen) + 0.1
    gate = gate / gate.sum(-1, keepdim=True)
    return idx.to(torch.int32).to(device), gate.to(device)


def make_inputs(case: Case, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    s, dtype = case.shape, DTYPES[case.dtype]
    kk = (s.kernel, s.kernel) if s.kind == "conv2d" else ()
    fan_in = s.c_in * s.kernel * s.kernel

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = randn(case.batch, s.c_in, s.side, s.side) if s.kind == "conv2d" else randn(case.batch, s.tokens, s.c_in)
    idx, gate = make_routing(case, device, gen)
    lora_rank = case.active
    return {
        "x": x,
        "weight": randn(s.c_out, s.c_in, *kk, scale=fan_in**-0.5),
        "bias": randn(s.c_out, scale=0.1),
        "lora_a": randn(case.ranks, s.c_in, *kk, scale=fan_in**-0.5),
        "lora_b": randn(s.c_out, case.ranks, scale=case.ranks**-0.5),
        "idx": idx,
        "gate": gate,
        "dense_a": randn(lora_rank, s.c_in, *kk, scale=fan_in**-0.5),
        "dense_b": randn(s.c_out, lora_rank, scale=lora_rank**-0.5),
    }


def case_label(case: Case) -> str:
    return (
        f"{case.sweep}: {case.shape.name} B{case.batch} {case.dtype} {case.routing[:3]} {case.mode} "
        f"R{case.ranks} Z{case.num_zero} k{case.top_k} z{case.zero_picked}"
    )


# ----------------------------------------------------------------------------------------------
# Cases from the command line


def scaled(shape: Shape, scale: float) -> Shape:
    """``shape`` with its token count scaled (a conv keeps a square image)."""
    if scale == 1.0:
        return shape
    if shape.kind == "conv2d":
        side = max(4, round(shape.side * math.sqrt(scale)))
        return replace(shape, tokens=side * side)
    return replace(shape, tokens=max(16, round(shape.tokens * scale)))


def pick_shapes(spec: str) -> list[Shape]:
    names = []
    for item in spec.split(","):
        item = item.strip()
        if item == "all":
            names += list(SHAPES)
        elif item in ("linear", "conv", "conv3x3", "conv1x1"):
            names += [n for n in SHAPES if n.startswith(item.replace("linear", "lin"))]
        elif item in SHAPES:
            names.append(item)
        else:
            raise SystemExit(
                f"unknown shape {item!r}; choose from all, linear, conv, conv3x3, conv1x1, {', '.join(SHAPES)}"
            )
    return [SHAPES[n] for n in dict.fromkeys(names)]


def build_cases(args) -> list[Case]:
    shapes = [scaled(s, args.token_scale) for s in pick_shapes(args.shapes)]
    base = dict(
        num_shared=args.shared,
        num_routed=args.routed,
        num_zero=args.zero,
        top_k=args.top_k,
        zero_picked=args.zero_picked,
    )
    cases = []
    for shape in shapes:
        for batch in args.batch:
            for dtype in args.dtypes:
                for routing in args.routing:
                    if routing == "token" and shape.kind == "conv2d":
                        continue
                    for mode in args.modes:
                        cases.append(Case(shape, batch, routing=routing, mode=mode, dtype=dtype, **base))
    sweep_shape = scaled(pick_shapes(args.sweep_shape)[0], args.token_scale)
    sweep_modes = args.modes if args.full else ("fwd",)
    variants = []
    if "ranks" in args.sweep:
        variants += [
            ("ranks", dict(base, num_shared=s, num_routed=e)) for s, e in ((4, 16), (8, 32), (8, 64), (16, 64))
        ]
    if "k" in args.sweep:
        variants += [("k", dict(base, top_k=k, zero_picked=0)) for k in (2, 4, 8, 16) if k <= args.routed]
    if "zero" in args.sweep:  # zero slots picked per sample: 0 .. k (Z = k here so every fraction is reachable)
        k = args.top_k
        variants += [
            ("zero", dict(base, num_zero=max(args.zero, k), zero_picked=z)) for z in range(0, k + 1, max(1, k // 4))
        ]
    for name, cfg in variants:
        for mode in sweep_modes:
            cases.append(
                Case(sweep_shape, args.batch[0], routing="sample", mode=mode, dtype=args.dtypes[0], sweep=name, **cfg)
            )
    bad = [
        c
        for c in cases
        if not (0 <= c.zero_picked <= min(c.num_zero, c.top_k) and c.top_k - c.zero_picked <= c.num_routed)
    ]
    if bad:
        raise SystemExit(f"--zero-picked/--top-k/--zero/--routed inconsistent for {case_label(bad[0])}")
    return cases
