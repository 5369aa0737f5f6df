"""One test per validation error: each bad call raises before any kernel runs, naming the argument."""

import re

import pytest
import torch

import mor_kernels
from mor_kernels.testing import random_case


@pytest.fixture
def lin():
    return random_case(batch=2, tokens=5, d_in=6, d_out=4, num_shared=2, num_routed=4, num_zero=2, top_k=3)


@pytest.fixture
def conv():
    return random_case(batch=2, d_in=3, d_out=4, kernel_size=3, height=5, width=5)


def call_lora(c, **over):
    a = dict(
        x=c.x, lora_a=c.lora_a, lora_b=c.lora_b, idx=c.idx, gate=c.gate, num_shared=c.num_shared, scaling=c.scaling
    )
    a.update(over)
    base = a.pop("base", None)
    return mor_kernels.mor_lora(*a.values(), base=base, backend="reference")


def call_linear(c, **over):
    a = dict(
        x=c.x,
        weight=c.weight,
        bias=c.bias,
        lora_a=c.lora_a,
        lora_b=c.lora_b,
        idx=c.idx,
        gate=c.gate,
        num_shared=c.num_shared,
        scaling=c.scaling,
    )
    a.update(over)
    return mor_kernels.mor_linear(*a.values(), backend="reference")


def call_conv(c, **over):
    a = dict(
        x=c.x,
        weight=c.weight,
        bias=c.bias,
        lora_a=c.lora_a,
        lora_b=c.lora_b,
        idx=c.idx,
        gate=c.gate,
        num_shared=c.num_shared,
        scaling=c.scaling,
        stride=1,
        padding=1,
        dilation=1,
    )
    a.update(over)
    return mor_kernels.mor_conv2d(*a.values(), backend="reference")


LORA_ERRORS = [
    # (override, exception, message pattern)
    (lambda c: dict(x=c.x.numpy()), TypeError, r"x must be a torch.Tensor"),
    (lambda c: dict(x=c.x[0, 0]), ValueError, r"x must have at least 2 dimensions, got shape \(6\)"),
    (lambda c: dict(x=c.x.int()), TypeError, r"x must have a floating dtype"),
    (lambda c: dict(lora_a=c.lora_a[:, :5]), ValueError, r"lora_a must have shape \(R, 6\).*got \(6, 5\)"),
    (lambda c: dict(lora_a=c.lora_a[None]), ValueError, r"lora_a must have 2 dimensions"),
    (lambda c: dict(lora_a=c.lora_a.double()), TypeError, r"lora_a has dtype torch.float64 but x has torch.float32"),
    (lambda c: dict(lora_b=c.lora_b[:, :5]), ValueError, r"lora_b must have shape \(d_out, 6\).*got \(4, 5\)"),
    (lambda c: dict(lora_a=c.lora_a[:0], lora_b=c.lora_b[:, :0]), ValueError, r"lora_a must have at least one rank"),
    (lambda c: dict(num_shared=7), ValueError, r"num_shared must be in \[0, 6\], got 7"),
    (lambda c: dict(num_shared=-1), ValueError, r"num_shared must be in \[0, 6\], got -1"),
    (lambda c: dict(num_shared=2.0), TypeError, r"num_shared must be an int, got float"),
    (lambda c: dict(num_shared=True), TypeError, r"num_shared must be an int, got bool"),
    (lambda c: dict(scaling="1"), TypeError, r"scaling must be a real number, got str"),
    (lambda c: dict(idx=c.idx.float()), TypeError, r"idx must be int32 or int64, got torch.float32"),
    (lambda c: dict(gate=c.gate.int()), TypeError, r"gate must have a floating dtype"),
    (lambda c: dict(gate=c.gate[:, :2]), ValueError, r"gate must have the shape of idx \(2, 3\), got \(2, 2\)"),
    (
        lambda c: dict(idx=c.idx[:1], gate=c.gate[:1]),
        ValueError,
        r"idx must have shape \(2, k\) for sample routing or \(2, 5, k\) for token routing, got \(1, 3\)",
    ),
    (lambda c: dict(idx=c.idx[:, :0], gate=c.gate[:, :0]), ValueError, r"k >= 1"),
    (
        lambda c: dict(idx=torch.full_like(c.idx, 4)),
        ValueError,
        r"idx values must be in \[-1, 4\).*got values in \[4, 4\]",
    ),
    (lambda c: dict(idx=torch.full_like(c.idx, -2)), ValueError, r"idx values must be in \[-1, 4\)"),
    (lambda c: dict(num_shared=6, idx=torch.zeros_like(c.idx)), ValueError, r"idx values must be in \[-1, 0\)"),
    (lambda c: dict(base=torch.zeros(2, 5, 3)), ValueError, r"base must have shape \(2, 5, 4\), got \(2, 5, 3\)"),
    (lambda c: dict(base=torch.zeros(2, 5, 4, dtype=torch.float64)), TypeError, r"base has dtype"),
    (lambda c: dict(gate=c.gate.to("meta")), ValueError, r"gate is on meta but x is on cpu"),
    (lambda c: dict(idx=c.idx[0], gate=c.gate[0]), ValueError, r"idx must have at least 2 dimensions, got shape \(3\)"),
    (lambda c: dict(scaling=float("nan")), ValueError, r"scaling must be finite, got nan"),
]


@pytest.mark.parametrize("make, exc, pattern", LORA_ERRORS)
def test_mor_lora_errors(lin, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call_lora(lin, **make(lin))


def test_token_routing_shape_error_names_both_layouts(lin):
    idx = torch.zeros(2, 4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=re.escape("(2, 5, k) for token routing, got (2, 4, 3)")):
        call_lora(lin, idx=idx, gate=idx.float())


LINEAR_ERRORS = [
    (lambda c: dict(weight=c.weight.T), ValueError, r"weight must have shape \(4, 6\).*got \(6, 4\)"),
    (lambda c: dict(weight=c.weight.half()), TypeError, r"weight has dtype torch.float16"),
    (lambda c: dict(bias=c.bias[:3]), ValueError, r"bias must have shape \(4,\), got \(3\)"),
    (lambda c: dict(bias=c.bias[None]), ValueError, r"bias must have 1 dimensions"),
    (lambda c: dict(weight=c.weight.to("meta")), ValueError, r"weight is on meta"),
    (lambda c: dict(weight=c.weight[None]), ValueError, r"weight must have 2 dimensions, got shape \(1, 4, 6\)"),
    (lambda c: dict(bias=c.bias.half()), TypeError, r"bias has dtype torch.float16 but x has torch.float32"),
]


@pytest.mark.parametrize("make, exc, pattern", LINEAR_ERRORS)
def test_mor_linear_errors(lin, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call_linear(lin, **make(lin))


CONV_ERRORS = [
    (lambda c: dict(x=c.x[0]), ValueError, r"x must have 4 dimensions, got shape \(3, 5, 5\)"),
    (lambda c: dict(weight=c.weight[:, :2]), ValueError, r"weight must have shape \(C_out, 3, kh, kw\)"),
    (lambda c: dict(lora_a=c.lora_a[:, :, :2]), ValueError, r"lora_a must have shape \(R, 3, 3, 3\)"),
    (lambda c: dict(lora_b=c.lora_b[:3]), ValueError, r"lora_b must have shape \(4, 8\)"),
    (lambda c: dict(stride=0), ValueError, r"stride and dilation must be >= 1"),
    (lambda c: dict(padding=(1, 2, 3)), ValueError, r"padding must be an int or a pair of ints"),
    (lambda c: dict(padding="same"), TypeError, r"padding must be an int, got str"),
    (lambda c: dict(padding=0, dilation=3), ValueError, r"too small for a 3x3 kernel"),
    (lambda c: dict(dilation=0), ValueError, r"stride and dilation must be >= 1.*dilation=\(0, 0\)"),
    (lambda c: dict(padding=-1), ValueError, r"padding >= 0"),
    (lambda c: dict(weight=c.weight[0]), ValueError, r"weight must have 4 dimensions, got shape \(3, 3, 3\)"),
    (lambda c: dict(weight=c.weight.half()), TypeError, r"weight has dtype torch.float16 but x has torch.float32"),
    (lambda c: dict(weight=c.weight.to("meta")), ValueError, r"weight is on meta but x is on cpu"),
    (lambda c: dict(bias=c.bias[:2]), ValueError, r"bias must have shape \(4,\), got \(2\)"),
    (lambda c: dict(lora_b=c.lora_b.double()), TypeError, r"lora_b has dtype torch.float64"),
    (
        lambda c: dict(idx=c.idx[:, None].expand(2, 5, 3), gate=c.gate[:, None].expand(2, 5, 3)),
        ValueError,
        r"idx must have shape \(2, k\) for sample routing, got \(2, 5, 3\)",
    ),
]


@pytest.mark.parametrize("make, exc, pattern", CONV_ERRORS)
def test_mor_conv2d_errors(conv, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call_conv(conv, **make(conv))


ROUTE_ERRORS = [
    (dict(logits=torch.zeros(2, 6, dtype=torch.int64)), TypeError, r"logits must have a floating dtype"),
    (dict(logits=torch.zeros(2, 0)), ValueError, r"at least one slot"),
    (dict(top_k=0), ValueError, r"top_k must be in \[1, 6\], got 0"),
    (dict(top_k=7), ValueError, r"top_k must be in \[1, 6\], got 7"),
    (dict(num_zero=6), ValueError, r"num_zero must be in \[0, 5\], got 6"),
    (dict(num_zero=-1), ValueError, r"num_zero must be in \[0, 5\], got -1"),
    (dict(renormalize=1), TypeError, r"renormalize must be a bool, got int"),
    (dict(top_k=2.5), TypeError, r"top_k must be an int, got float"),
]


@pytest.mark.parametrize("over, exc, pattern", ROUTE_ERRORS)
def test_route_errors(over, exc, pattern):
    args = dict(logits=torch.zeros(2, 6), top_k=2, num_zero=2, renormalize=True)
    args.update(over)
    with pytest.raises(exc, match=pattern):
        mor_kernels.route(**args, backend="reference")


def test_bad_backend_name(lin):
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        mor_kernels.mor_lora(lin.x, lin.lora_a, lin.lora_b, lin.idx, lin.gate, 2, 1.0, backend="fast")


def test_check_indices_false_skips_the_device_sync(lin, monkeypatch):
    """The MoR layers pass route's indices with check_indices=False: no aminmax (a host sync) runs."""
    want = call_lora(lin)

    def no_sync(*_args, **_kwargs):
        raise AssertionError("the index range check ran")

    monkeypatch.setattr(torch, "aminmax", no_sync)
    args = (lin.x, lin.lora_a, lin.lora_b, lin.idx, lin.gate, lin.num_shared, lin.scaling)
    got = mor_kernels.mor_lora(*args, backend="reference", check_indices=False)
    torch.testing.assert_close(got, want)
    with pytest.raises(AssertionError, match="the index range check ran"):
        mor_kernels.mor_lora(*args, backend="reference")
