"""backend="blas" (the compiled extension's BLAS CPU path, ``mor_kernels.ops.cpu_blas``) against the reference
(MOR_SPEC section 7): forward and every gradient, Linear and Conv2d, the merged and the low-rank forward, the
errors, torch.compile. Oracle: the reference in float64; low-precision budget: the reference with
``upcast=False`` in the tested dtype (as ``test_extension_parity.py`` does for ``"cpp"``)."""

from __future__ import annotations

import zlib

import pytest
import torch
from test_extension_parity import CONV_CASES as EXTENSION_CONV_CASES

import mor_kernels
from mor_kernels import dispatch
from mor_kernels import reference as ref
from mor_kernels.testing import assert_parity, poison_allocations, random_case

WHY = dispatch.unavailable_reason("blas", "mor_linear", torch.device("cpu"))
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"backend='blas' cannot run here ({WHY})")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LINEAR_CASES = {
    "default": {},
    "t1": {"tokens": 1},
    "r1": {"num_shared": 0, "num_routed": 1, "num_zero": 1, "top_k": 2},
    "r40": {"num_shared": 8, "num_routed": 32, "num_zero": 4, "top_k": 8, "d_in": 64, "d_out": 40, "tokens": 9},
    "k_all": {"num_shared": 1, "num_routed": 4, "num_zero": 2, "top_k": 6},
    "zero_only": {"zero_only_unit": True, "num_zero": 3, "top_k": 2},
    "s0": {"num_shared": 0},
    "no_bias_b3": {"bias": False, "batch": 3, "tokens": 5},
    "t130_d320": {"tokens": 130, "d_in": 320, "d_out": 65, "batch": 1},
}
CONV_CASES = {  # the extension's conv cases, plus a non-square padding without bias
    **EXTENSION_CONV_CASES,
    "2x3_no_bias": {"kernel_size": 3, "conv": {"padding": (0, 1)}, "bias": False, "batch": 3},
}


def _run(op, c, impl, channels_last=False, **kw):
    x = c.x.contiguous(memory_format=torch.channels_last) if channels_last else c.x
    args = (x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    if op == "linear":
        if isinstance(impl, str):
            return mor_kernels.mor_linear(*args, backend=impl, **kw)
        return impl(*args, **kw)
    conv = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), **c.conv}
    if isinstance(impl, str):
        return mor_kernels.mor_conv2d(*args, **conv, backend=impl, **kw)
    return impl(*args, **conv, **kw)


REF = {"linear": ref.mor_linear, "conv": ref.mor_conv2d}


def _check(op, case, dtype, channels_last=False, grads=True):
    """Forward and every gradient of backend='blas' against the float64 oracle and the low-precision reference."""
    gen = torch.Generator().manual_seed(1)
    oracle = case.to(dtype).to(torch.float64, requires_grad=True)
    mags = case.to(dtype).magnitudes()
    lowp = case.to(dtype, requires_grad=True)
    test = case.to(dtype, requires_grad=grads)
    y64 = _run(op, oracle, REF[op])
    cond = _run(op, mags, REF[op])
    ylp = None if dtype == torch.float64 else _run(op, lowp, REF[op], upcast=False)
    with poison_allocations():
        y = _run(op, test, "blas", channels_last)
    assert y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_parity(y, y64, dtype=dtype, lowp=ylp, cond=cond, name=f"{op} forward")
    if not grads:
        return
    dy = torch.randn(y64.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    y64.backward(dy)
    cond.backward(dy.abs())
    if ylp is not None:
        ylp.backward(dy.to(dtype))
    with poison_allocations():
        y.backward(dy.to(dtype))
    for name, t in test.tensors().items():
        assert t.grad is not None, f"no gradient for {name}"
        glp = None if ylp is None else lowp.tensors()[name].grad
        g64 = oracle.tensors()[name].grad
        assert_parity(t.grad, g64, dtype=dtype, lowp=glp, cond=mags.tensors()[name].grad, name=f"d{name}")


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode()) % 1000


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_parity(case, routing, dtype):
    c = random_case(routing=routing, **LINEAR_CASES[case], seed=_seed("blas-linear", case, routing))
    _check("linear", c, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_parity(case, channels_last, dtype):
    c = random_case(**CONV_CASES[case], seed=_seed("blas-conv", case))
    _check("conv", c, dtype, channels_last)


def _shared_rank_case(op, seed):
    """Two slots of one sample pick the same routed rank (their contributions add up), the other sample differs."""
    kw = {"kernel_size": 3, "conv": {"padding": (1, 1)}} if op == "conv" else {}
    c = random_case(batch=2, top_k=3, seed=seed, **kw)
    c.idx = torch.tensor([[1, 1, -1], [0, 3, 1]], dtype=c.idx.dtype)
    c.gate = torch.tensor([[0.3, 0.5, 0.2], [0.6, 0.25, 0.15]])
    return c


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_a_rank_picked_twice_adds_both_contributions(op):
    _check(op, _shared_rank_case(op, _seed("twice", op)), torch.float32)


@pytest.mark.parametrize("merge", ["always", "never"])
@pytest.mark.parametrize("alike", [False, True], ids=["distinct", "alike"])
@pytest.mark.parametrize("op", ["linear", "conv", "conv_nhwc"])
def test_merged_and_low_rank_forward_agree_with_the_reference(op, alike, merge):
    """Inference: merge='always' (per-sample merged weights, one GEMM/conv per distinct routing; samples routed
    alike share one) and merge='never' (the low-rank path) both within MOR_SPEC 7 of the oracle."""
    nhwc, op = op == "conv_nhwc", op.removesuffix("_nhwc")
    kw = {"kernel_size": 3, "conv": {"padding": (1, 1), "stride": (2, 1)}} if op == "conv" else {}
    c = random_case(batch=3, seed=_seed("merge", op, alike), **kw)
    if alike:
        c.idx, c.gate = c.idx[:1].expand_as(c.idx).clone(), c.gate[:1].expand_as(c.gate).clone()
    y64 = _run(op, c.to(torch.float64), REF[op])
    with torch.no_grad(), poison_allocations():
        y = _run(op, c, "blas", channels_last=nhwc, merge=merge)
    assert y.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    assert_parity(y, y64, dtype=torch.float32, name=f"{op} merge={merge}")


def test_auto_merges_by_the_cost_model_and_still_matches():
    """backend='auto' with merge='auto' passes the measured crossover to the C++ op: a many-token Linear merges
    (rho > limit), a one-token one does not; both match the oracle."""
    plan = dispatch.lean_plan("mor_linear", "auto", "auto", torch.float32)
    assert plan is not None and plan[0] == dispatch.MERGE_CROSSOVER[("cpu", "linear")]
    for tokens in (1, 64):
        c = random_case(batch=2, tokens=tokens, d_in=16, d_out=12, seed=tokens)
        with torch.no_grad():
            y = _run("linear", c, "auto")
        assert_parity(y, _run("linear", c.to(torch.float64), REF["linear"]), dtype=torch.float32, name="auto")


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_bad_index_with_check_indices_is_a_value_error(op):
    kw = {"kernel_size": 1} if op == "conv" else {}
    c = random_case(seed=3, **kw)
    c.idx = c.idx.clone()
    c.idx[1, 0] = 6  # E = 6 routed ranks: 6 is out of range
    with pytest.raises(ValueError, match="idx"):
        _run(op, c, "blas", check_indices=True)


def test_bad_shape_is_the_documented_value_error():
    """The C++ checks fire first; the call then raises the Python checks' documented error."""
    c = random_case(seed=4)
    with pytest.raises(ValueError, match="lora_b"):
        mor_kernels.mor_linear(c.x, c.weight, c.bias, c.lora_a, c.lora_b[:, :-1], c.idx, c.gate, c.num_shared,
                               c.scaling, backend="blas")  # fmt: skip


def test_torch_compile_runs_the_op_through_its_fakes():
    """aot_eager traces the CompositeImplicitAutograd op down to blas_mor_linear_fwd/_bwd on fake tensors."""
    c = random_case(seed=5).to(torch.float32, requires_grad=True)

    def fn(x, w, b, a, bb, g):
        return mor_kernels.mor_linear(x, w, b, a, bb, c.idx, g, c.num_shared, c.scaling, backend="blas")

    leaves = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.gate)
    y = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
    want = ref.mor_linear(*(t.detach().double() for t in leaves[:5]), c.idx, c.gate.detach(), c.num_shared, c.scaling)
    assert_parity(y, want, dtype=torch.float32, name="compiled forward")
    y.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_inference_calls_record_no_graph_and_training_calls_do(op):
    """The public op's inference branch dispatches below autograd: under no_grad (inputs requiring grad or not)
    and with grad enabled but nothing requiring it, the output has no grad_fn and equals the forward op's; with
    an input requiring grad it records the backward and its gradient is the reference's."""
    kw = {"kernel_size": 3, "conv": {"padding": (1, 1)}} if op == "conv" else {}
    c = random_case(seed=_seed("graph", op), **kw)
    want = _run(op, c.to(torch.float64), REF[op])
    plain = _run(op, c, "blas", merge="never")
    assert plain.grad_fn is None and not plain.requires_grad
    assert_parity(plain, want, dtype=torch.float32, name=f"{op} grad enabled, nothing requiring it")
    leaves = c.to(torch.float32, requires_grad=True)
    with torch.no_grad():
        y = _run(op, leaves, "blas", merge="never")
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, plain, rtol=0, atol=0)
    y = _run(op, leaves, "blas")
    assert y.grad_fn is not None
    torch.testing.assert_close(y, plain, rtol=0, atol=0)
    y.sum().backward()
    oracle = c.to(torch.float64, requires_grad=True)
    _run(op, oracle, REF[op]).sum().backward()
    assert_parity(leaves.x.grad, oracle.x.grad, dtype=torch.float32, name=f"{op} dx")


def test_torch_compile_traces_the_inference_branch():
    """Under no_grad the compiled call takes the op's inference branch (below autograd) and matches eager."""
    c = random_case(seed=8, tokens=40, d_in=24, d_out=20).to(torch.float32)

    def fn(x, w, b, a, bb, g):
        return mor_kernels.mor_linear(x, w, b, a, bb, c.idx, g, c.num_shared, c.scaling, backend="blas")

    leaves = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.gate)
    with torch.no_grad():
        y = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
        eager = fn(*leaves)
    torch.testing.assert_close(y, eager, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_opcheck(op):
    c = random_case(seed=6, **({"kernel_size": 3, "conv": {"padding": (1, 1)}} if op == "conv" else {}))
    if op == "linear":
        args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
        fwd, bwd, extra = torch.ops.mor.blas_mor_linear_fwd, torch.ops.mor.blas_mor_linear_bwd, ()
    else:
        args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
        fwd, bwd, extra = torch.ops.mor.blas_mor_conv2d_fwd, torch.ops.mor.blas_mor_conv2d_bwd, ([1, 1], [1, 1], [1, 1])
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(fwd, (*args, *extra, 2.0, True, True), test_utils=tests)
    torch.library.opcheck(fwd, (*args, *extra, -1.0, True, False), test_utils=tests)
    y, u = fwd(*args, *extra, 2.0, True, True)
    bargs = (torch.randn_like(y), c.x, c.weight, c.lora_a, c.lora_b, c.idx, c.gate, u, c.num_shared, c.scaling)
    torch.library.opcheck(bwd, (*bargs, *extra, [True] * 6), test_utils=tests)
    torch.library.opcheck(bwd, (*bargs, *extra, [False, True, False, True, False, True]), test_utils=tests)


def test_without_the_extension_auto_falls_back_to_the_reference(monkeypatch):
    """With mor_kernels._C absent the blas backend says why, and 'auto' runs the reference and explains it."""
    from mor_kernels.ops import cpu_blas

    monkeypatch.setattr(cpu_blas, "_C", None)
    monkeypatch.setattr(cpu_blas, "_LOAD_ERROR", "simulated: not built")
    dispatch.clear_cache()
    try:
        choice = dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32)
        assert choice.backend == "reference"
        assert "not built" in dict(choice.skipped)["blas"]
        assert dispatch.lean_plan("mor_linear", "auto", "auto", torch.float32) is None
        c = random_case(seed=7)
        with torch.no_grad():
            y = _run("linear", c, "auto")
        assert_parity(y, _run("linear", c.to(torch.float64), REF["linear"]), dtype=torch.float32, name="fallback")
    finally:
        monkeypatch.undo()
        dispatch.clear_cache()
