"""Non-contiguous inputs (transposed views, channels_last, extra token dims) give the same numbers,
on every backend that runs on this machine, and no input is ever modified."""

import pytest
import torch

import mor_kernels
from mor_kernels import dispatch
from mor_kernels.testing import random_case


def _backends(op, dtype=torch.float32):
    return dispatch.available_backends("cpu", op, dtype)


def _snapshot(*tensors):
    return [t.clone() for t in tensors if torch.is_tensor(t)]


@pytest.mark.parametrize("backend", _backends("mor_linear"))
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_linear_transposed_views(backend, routing):
    case = random_case(tokens=9, d_in=12, d_out=10, routing=routing, seed=21)
    x_t = case.x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (.., 1, T)
    w_t = case.weight.T.contiguous().T
    a_t = case.lora_a.T.contiguous().T
    b_t = case.lora_b.T.contiguous().T
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    inputs = (x_t, w_t, case.bias, a_t, b_t, case.idx, case.gate)
    before = _snapshot(*inputs)
    got = mor_kernels.mor_linear(*inputs, case.num_shared, case.scaling, backend=backend)
    want = mor_kernels.mor_linear(
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
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for t, b in zip([t for t in inputs if torch.is_tensor(t)], before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", _backends("mor_lora"))
def test_lora_extra_token_dims_and_token_routing(backend):
    case = random_case(tokens=12, d_in=8, d_out=6, routing="token", seed=22)
    x4 = case.x.reshape(2, 3, 4, 8)
    idx4, gate4 = case.idx.reshape(2, 3, 4, -1), case.gate.reshape(2, 3, 4, -1)
    got = mor_kernels.mor_lora(
        x4, case.lora_a, case.lora_b, idx4, gate4, case.num_shared, case.scaling, backend=backend
    )
    want = mor_kernels.mor_lora(
        case.x, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling, backend="reference"
    )
    assert got.shape == (2, 3, 4, 6)
    torch.testing.assert_close(got.reshape(2, 12, 6), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends("mor_lora"))
def test_lora_two_dim_input_is_one_token_per_sample(backend):
    case = random_case(tokens=1, d_in=8, d_out=6, seed=23)
    got = mor_kernels.mor_lora(
        case.x[:, 0], case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling, backend=backend
    )
    want = mor_kernels.mor_lora(
        case.x, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling, backend="reference"
    )
    torch.testing.assert_close(got, want[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends("mor_conv2d"))
def test_conv_channels_last(backend):
    case = random_case(d_in=6, d_out=5, kernel_size=3, height=7, width=6, seed=24)
    args = (
        case.weight,
        case.bias,
        case.lora_a,
        case.lora_b,
        case.idx,
        case.gate,
        case.num_shared,
        case.scaling,
        1,
        1,
        1,
    )
    x_cl = case.x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    before = x_cl.clone()
    got = mor_kernels.mor_conv2d(x_cl, *args, backend=backend)
    want = mor_kernels.mor_conv2d(case.x, *args, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(x_cl, before)


@pytest.mark.parametrize("backend", _backends("mor_lora"))
def test_int64_indices_equal_int32(backend):
    case = random_case(seed=25)
    args = (case.x, case.lora_a, case.lora_b)
    a = mor_kernels.mor_lora(*args, case.idx, case.gate, case.num_shared, case.scaling, backend=backend)
    b = mor_kernels.mor_lora(*args, case.idx.long(), case.gate, case.num_shared, case.scaling, backend=backend)
    assert torch.equal(a, b)
