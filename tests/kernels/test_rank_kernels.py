"""The rank kernels of the BLAS CPU path (``csrc/cpu/rank_kernels.h``), AVX-512 and AVX2 (each where the CPU has
it; both on an AVX-512 CPU): the float32 forward with them on, against the float64 oracle (MOR_SPEC section 7) and against the same op with them off (ATen GEMMs on the
gathered ranks), on shapes that reach every edge of their blocking: 1..40 active ranks (groups of 16 and of 4,
and their remainders), feature and channel counts around multiples of 16 (masked columns), token and row counts
around multiples of 4 and 8, per-sample and shared routing, merged and low-rank, NCHW and channels_last. The
training forward (``store_u``) saves the same rank activations either way. The backward never uses them; its
parity is ``test_blas_parity.py``'s (which runs with them on, the default)."""

from __future__ import annotations

import pytest
import torch

import mor_kernels
from mor_kernels import dispatch
from mor_kernels import reference as ref
from mor_kernels.testing import assert_parity, poison_allocations, random_case

WHY = dispatch.unavailable_reason("blas", "mor_linear", torch.device("cpu"))
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"backend='blas' cannot run here ({WHY})")
HAVE = WHY is None and torch.ops.mor.cpu_rank_kernels(None)
needs_kernels = pytest.mark.skipif(
    not HAVE, reason="the rank kernels do not run here (neither AVX-512F nor AVX2+FMA, or switched off)"
)
INF = float("inf")


def _runnable_isas() -> list[str]:
    """The instruction sets this CPU runs the kernels in (cpu_rank_isa refuses the others)."""
    if WHY is not None:
        return []
    before, found = torch.ops.mor.cpu_rank_isa(None), []
    for isa in ("avx512", "avx2"):
        try:
            torch.ops.mor.cpu_rank_isa(isa)
        except ValueError:
            continue
        found.append(isa)
    torch.ops.mor.cpu_rank_isa("auto")
    assert torch.ops.mor.cpu_rank_isa(None) in (before, "none")
    return found


ISAS = _runnable_isas()


@pytest.fixture(params=ISAS or ["none"])
def kernels(request):
    """``kernels(on)`` switches the rank kernels, run in the instruction set of the parameter (each one this CPU
    has); the switch and the choice are restored afterwards."""
    before = torch.ops.mor.cpu_rank_kernels(None)
    if request.param != "none":
        torch.ops.mor.cpu_rank_isa(request.param)
    yield lambda on: torch.ops.mor.cpu_rank_kernels(on)
    torch.ops.mor.cpu_rank_kernels(before)
    torch.ops.mor.cpu_rank_isa("auto")


# (batch, tokens, d_in, d_out, num_shared, num_routed, top_k): active ranks n = S + picks
LINEAR = {
    "n1_t1": (1, 1, 7, 5, 0, 3, 1),
    "n4_t5_d16": (2, 5, 16, 16, 2, 6, 2),
    "n16_t9_d17x65": (1, 9, 17, 65, 8, 32, 8),
    "n30_t13_d70x33": (3, 13, 70, 33, 20, 30, 10),
    "n40_t8_d130x129": (2, 8, 130, 129, 16, 24, 24),
}


def _linear_case(name, alike):
    batch, tokens, d_in, d_out, s, e, k = LINEAR[name]
    c = random_case(batch=batch, tokens=tokens, d_in=d_in, d_out=d_out, num_shared=s, num_routed=e, num_zero=1,
                    top_k=k, seed=len(name) + 7 * alike)  # fmt: skip
    if alike:
        c.idx, c.gate = c.idx[:1].expand_as(c.idx).clone(), c.gate[:1].expand_as(c.gate).clone()
    return c


def _args(c):
    return (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)


def _linear(c, merge_above, store_u):
    return torch.ops.mor.blas_mor_linear_fwd(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared,
                                             c.scaling, merge_above, True, store_u)  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("path", ["merged", "low_rank", "training"])
@pytest.mark.parametrize("alike", [False, True], ids=["distinct", "alike"])
@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_forward_with_and_without_the_kernels(name, alike, path, kernels):
    c = _linear_case(name, alike)
    merge_above, store_u = {"merged": (-1.0, False), "low_rank": (INF, False), "training": (INF, True)}[path]
    y64 = ref.mor_linear(*_args(c.to(torch.float64)))
    kernels(True)
    with torch.no_grad(), poison_allocations():
        y_on, u_on = _linear(c, merge_above, store_u)
    kernels(False)
    with torch.no_grad():
        y_off, u_off = _linear(c, merge_above, store_u)
    assert_parity(y_on, y64, dtype=torch.float32, name=f"linear {path} (rank kernels)")
    assert_parity(y_off, y64, dtype=torch.float32, name=f"linear {path} (ATen)")
    torch.testing.assert_close(y_on, y_off, rtol=1e-5, atol=1e-5 * float(y64.abs().max()))
    assert u_on.shape == u_off.shape
    if store_u:  # u = x A_act^T per sample, zero past each sample's active ranks (the backward reads it)
        torch.testing.assert_close(u_on, u_off, rtol=1e-5, atol=1e-5 * float(u_off.abs().max()))


CONV = {  # (batch, c_in, c_out, kernel, height, width, stride, num_shared, num_routed, top_k)
    "k1_c24x40_n11": (2, 24, 40, 1, 6, 5, 1, 3, 9, 8),
    "k3_c5x17_n5": (1, 5, 17, 3, 9, 9, 1, 2, 6, 3),
    "k3_c33x18_s2_n21": (3, 33, 18, 3, 7, 10, 2, 8, 20, 13),
}


@needs_kernels
@pytest.mark.parametrize("merge", ["always", "never"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(CONV))
def test_conv_forward_with_and_without_the_kernels(name, layout, merge, kernels):
    batch, c_in, c_out, kk, h, w, stride, s, e, k = CONV[name]
    c = random_case(batch=batch, d_in=c_in, d_out=c_out, kernel_size=kk, height=h, width=w, num_shared=s,
                    num_routed=e, num_zero=1, top_k=k, conv={"padding": (kk // 2, kk // 2), "stride": (stride, stride)},
                    seed=len(name))  # fmt: skip
    x = c.x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else c.x
    conv = {"stride": (stride, stride), "padding": (kk // 2, kk // 2), "dilation": (1, 1)}
    y64 = ref.mor_conv2d(*_args(c.to(torch.float64)), **conv)
    args = (x, *_args(c)[1:])
    outs = {}
    for on in (True, False):
        kernels(on)
        with torch.no_grad(), poison_allocations():
            outs[on] = mor_kernels.mor_conv2d(*args, **conv, backend="blas", merge=merge)
        assert_parity(outs[on], y64, dtype=torch.float32, name=f"conv {merge} {layout} (kernels {on})")
    assert outs[True].is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5 * float(y64.abs().max()))


@needs_kernels
@pytest.mark.parametrize("merge", [-1.0, INF], ids=["merged", "low_rank"])
def test_ranks_not_picked_are_never_read(merge, kernels):
    """The kernels read lora_a's rows and lora_b's columns of the active ranks only (lora_b's columns by vector
    gathers, 16 rows at a time): NaN in every other rank, next to the active ones in memory, stays out."""
    c = random_case(batch=2, tokens=9, d_in=35, d_out=37, num_shared=2, num_routed=12, num_zero=1, top_k=3, seed=3)
    y_clean = _linear(c, merge, False)[0]
    picked = {0, 1} | {2 + int(v) for v in c.idx.flatten() if 0 <= int(v) < 12}
    for r in set(range(14)) - picked:
        c.lora_a[r] = float("nan")
        c.lora_b[:, r] = float("nan")
    kernels(True)
    y = _linear(c, merge, False)[0]
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_clean, rtol=0, atol=0)


def test_the_switch_and_what_explain_says(kernels):
    """cpu_rank_kernels(None) reads the state, True/False set it and return the state before; explain_backend
    says where the BLAS path's rank work runs and why."""
    before = kernels(None)
    assert kernels(False) == before
    assert kernels(None) is False
    assert torch.ops.mor.cpu_rank_isa(None) == "none"
    auto_is_blas = dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32).backend == "blas"
    text = mor_kernels.explain_backend("cpu", "mor_linear", torch.float32)
    if auto_is_blas:
        assert "rank work: ATen GEMMs on the gathered ranks" in text
    assert kernels(True) is False
    assert kernels(None) is HAVE  # on only where the CPU has AVX-512F or AVX2+FMA
    if HAVE:
        isa = torch.ops.mor.cpu_rank_isa(None)
        assert isa in ISAS
        name = {"avx512": "AVX-512", "avx2": "AVX2"}[isa]
        if auto_is_blas:
            assert f"rank work: the {name} rank kernels" in mor_kernels.explain_backend("cpu", "mor_linear")


@pytest.mark.skipif(WHY is not None, reason="needs the extension")
def test_the_instruction_set_choice():
    """cpu_rank_isa picks among the sets this CPU has, names a bad one, and "auto" goes back to the widest."""
    before = torch.ops.mor.cpu_rank_isa(None)
    try:
        with pytest.raises(ValueError, match="isa must be 'auto', 'avx512' or 'avx2', got 'sse'"):
            torch.ops.mor.cpu_rank_isa("sse")
        for isa in ("avx512", "avx2"):
            if isa in ISAS:
                torch.ops.mor.cpu_rank_isa(isa)
                assert torch.ops.mor.cpu_rank_isa(None) == isa
            else:
                with pytest.raises(ValueError, match=f"this CPU cannot run isa='{isa}'"):
                    torch.ops.mor.cpu_rank_isa(isa)
        torch.ops.mor.cpu_rank_isa("auto")
        assert torch.ops.mor.cpu_rank_isa(None) == (ISAS[0] if ISAS and before != "none" else before)
    finally:
        torch.ops.mor.cpu_rank_isa("auto")


@pytest.mark.skipif(WHY is not None, reason="needs the extension")
def test_the_environment_switch():
    """MOR_CPU_RANK_KERNELS (read when the BLAS backend is imported): 0 switches the kernels off, avx2/avx512 pick a
    set the CPU has; other values, and a set the CPU lacks, are ValueErrors naming the variable."""
    from mor_kernels.ops import cpu_blas

    before_on, before_isa = torch.ops.mor.cpu_rank_kernels(None), torch.ops.mor.cpu_rank_isa(None)
    try:
        cpu_blas.apply_rank_kernels_setting("0")
        assert torch.ops.mor.cpu_rank_isa(None) == "none"
        torch.ops.mor.cpu_rank_kernels(True)
        for isa in ("avx512", "avx2"):
            if isa in ISAS:
                cpu_blas.apply_rank_kernels_setting(isa)
                assert torch.ops.mor.cpu_rank_isa(None) == isa
            else:
                with pytest.raises(ValueError, match=f"MOR_CPU_RANK_KERNELS={isa}: .*cannot run isa='{isa}'"):
                    cpu_blas.apply_rank_kernels_setting(isa)
        with pytest.raises(ValueError, match="MOR_CPU_RANK_KERNELS must be 1, 0, avx2 or avx512, got 'yes'"):
            cpu_blas.apply_rank_kernels_setting("yes")
    finally:
        torch.ops.mor.cpu_rank_kernels(before_on)
        torch.ops.mor.cpu_rank_isa("auto")
    assert before_isa in ("none", torch.ops.mor.cpu_rank_isa(None))


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alike", [False, True], ids=["distinct", "alike"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_merged_weights_op_matches_the_reference_merge(kind, alike, dtype, on, kernels):
    """mor::blas_merged_weights (mor_model.inference's per-image merged weights on a CPU): W0 + B_act diag(g)
    A_act per distinct routing, (1, ...) when the samples route alike, else one per sample; float32 for 16-bit."""
    kw = {"kernel_size": 3} if kind == "conv" else {}
    c = random_case(batch=3, d_in=21, d_out=19, num_shared=2, num_routed=9, num_zero=2, top_k=4, seed=11, **kw)
    if alike:
        c.idx, c.gate = c.idx[:1].expand_as(c.idx).clone(), c.gate[:1].expand_as(c.gate).clone()
    kernels(on)
    low = c.to(dtype)
    with poison_allocations():
        got = torch.ops.mor.blas_merged_weights(low.weight, low.lora_a, low.lora_b, c.idx, c.gate, c.num_shared,
                                                c.scaling)  # fmt: skip
    r = low.to(torch.float64)  # the same maths in float64 on the inputs as rounded to dtype
    f = ref.factors.rank_factors(r.lora_a, r.lora_b, r.idx, r.gate, c.num_shared, c.scaling, torch.float64)
    exact = ref.factors.merge_weights(r.weight, f)
    assert got.shape == (1 if alike else 3, *c.weight.shape) and got.shape == exact.shape
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_merged_weights_op_names_bad_arguments():
    c = random_case(d_in=6, d_out=5)
    with pytest.raises(ValueError, match="lora_b \\(d_out, R\\)"):
        torch.ops.mor.blas_merged_weights(c.weight, c.lora_a, c.lora_b.t(), c.idx, c.gate, c.num_shared, 1.0)
    with pytest.raises(ValueError, match="idx \\(B, k\\) int32/int64 and a float gate"):
        torch.ops.mor.blas_merged_weights(c.weight, c.lora_a, c.lora_b, c.gate, c.gate, c.num_shared, 1.0)
    with pytest.raises(ValueError, match="a float gate"):
        torch.ops.mor.blas_merged_weights(c.weight, c.lora_a, c.lora_b, c.idx, c.idx, c.num_shared, 1.0)
