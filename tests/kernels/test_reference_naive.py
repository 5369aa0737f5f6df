"""The reference ops against the independent naive loops of tests/naive.py: forward and gradients."""

import pytest
import torch
from naive import naive_conv, naive_lora, naive_route

import mor_kernels
from mor_kernels import reference
from mor_kernels.testing import random_case

ROUTINGS = ["sample", "token"]
# (batch, tokens, d_in, d_out, S, E, Z, k): odd sizes, R = 1, S = 0, k = E + Z, k > E.
SHAPES = [
    (2, 5, 7, 6, 2, 6, 2, 3),
    (1, 1, 3, 2, 1, 0, 1, 1),  # R = 1, only a zero slot to pick
    (3, 4, 5, 4, 0, 4, 2, 6),  # S = 0, k = E + Z
    (2, 3, 41, 9, 3, 5, 3, 7),  # k > E: zero slots must be picked
]


def _f64(case):
    """Everything in float64, the gate included (its float32 gradient would round differently)."""
    case = case.to(torch.float64, requires_grad=True)
    case.gate = case.gate.detach().double().requires_grad_()
    return case


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_mor_lora_matches_naive(routing, shape):
    b, t, d_in, d_out, s, e, z, k = shape
    case = random_case(
        batch=b,
        tokens=t,
        d_in=d_in,
        d_out=d_out,
        num_shared=s,
        num_routed=e,
        num_zero=z,
        top_k=k,
        routing=routing,
        zero_only_unit=True,
        seed=sum(shape),
    )
    case = _f64(case)
    args = (case.x, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling)
    out = mor_kernels.mor_lora(*args, backend="reference")
    expected = naive_lora(*args)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    leaves = (case.x, case.lora_a, case.lora_b, case.gate)
    for got, want in zip(_grads(out, leaves), _grads(expected, leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_mor_linear_matches_naive_with_base_grads(routing):
    case = _f64(random_case(routing=routing, tokens=6, d_in=11, d_out=7, seed=3))
    out = mor_kernels.mor_linear(
        case.x,
        case.weight,
        case.bias,
        case.lora_a,
        case.lora_b,
        case.idx,
        case.gate,
        case.num_shared,
        case.scaling,
        backend="reference",
    )
    expected = torch.nn.functional.linear(case.x, case.weight, case.bias) + naive_lora(
        case.x, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    leaves = (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.gate)
    for got, want in zip(_grads(out, leaves), _grads(expected, leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mor_lora_base_is_added_and_left_untouched():
    case = random_case(seed=4).to(torch.float64)
    base = torch.randn(case.x.shape[0], case.x.shape[1], case.lora_b.shape[0], dtype=torch.float64)
    before = base.clone()
    args = (case.x, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling)
    out = mor_kernels.mor_lora(*args, base=base, backend="reference")
    torch.testing.assert_close(out, base + naive_lora(*args), rtol=1e-12, atol=1e-12)
    assert torch.equal(base, before)


CONVS = [
    dict(kernel_size=3, conv=dict(stride=1, padding=1, dilation=1)),
    dict(kernel_size=3, conv=dict(stride=2, padding=(1, 0), dilation=1)),
    dict(kernel_size=1, conv=dict(stride=1, padding=0, dilation=1)),
    dict(kernel_size=3, conv=dict(stride=(1, 2), padding=2, dilation=2)),
]


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("num_shared", [0, 2])
def test_mor_conv2d_matches_naive(spec, num_shared):
    case = random_case(
        d_in=5,
        d_out=4,
        num_shared=num_shared,
        num_routed=3,
        num_zero=2,
        top_k=3,
        height=6,
        width=7,
        zero_only_unit=True,
        seed=7,
        **spec,
    )
    case = _f64(case)
    args = (
        case.x,
        case.weight,
        case.bias,
        case.lora_a,
        case.lora_b,
        case.idx,
        case.gate,
        case.num_shared,
        case.scaling,
    )
    conv = case.conv
    out = mor_kernels.mor_conv2d(*args, conv["stride"], conv["padding"], conv["dilation"], backend="reference")
    expected = naive_conv(*args, conv["stride"], conv["padding"], conv["dilation"])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    leaves = (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.gate)
    for got, want in zip(_grads(out, leaves), _grads(expected, leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("n,z,k", [(8, 2, 3), (5, 1, 5), (4, 3, 4), (1, 0, 1)])
def test_route_matches_naive(renormalize, n, z, k):
    logits = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(n * 10 + k))
    idx, gate, probs = mor_kernels.route(logits, k, z, renormalize, backend="reference")
    want_idx, want_gate = naive_route(logits, k, z, renormalize)
    assert idx.dtype == torch.int32 and gate.dtype == torch.float32 and probs.dtype == torch.float32
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(gate.double(), want_gate, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.double(), torch.softmax(logits.double(), -1), rtol=1e-6, atol=1e-7)


def test_upcast_false_computes_in_low_precision():
    case = random_case(seed=5).to(torch.float16)
    args = (case.x, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling)
    exact = reference.mor_lora(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
    up = reference.mor_lora(*args, upcast=True)
    low = reference.mor_lora(*args, upcast=False)
    assert up.dtype == low.dtype == torch.float16
    err_up = (up.double() - exact).abs().max()
    err_low = (low.double() - exact).abs().max()
    assert not torch.equal(up, low)  # really a different computation
    assert err_up <= err_low
