"""Triton ``mor_conv2d`` (one torch conv with ``[W0; A]`` + the Triton gate/up/add pass) against the
reference (MOR_SPEC section 7): forward and every gradient, float32/float16/bfloat16, odd
sizes, stride/padding/dilation, zero-slot corners, channels_last."""

import pytest
import torch
from triton_env import DEVICE, INTERPRETED, skip_if_triton_imported_too_late

import mor_kernels
from mor_kernels import reference as ref_ops
from mor_kernels.testing import assert_parity, poison_allocations, random_case

skip_if_triton_imported_too_late()
NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "gate")


def _args(c):
    return (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)


def check_conv(case, dtype, channels_last=False, seed=1):
    case = case.to(dtype)  # every path sees the same (rounded) inputs
    oracle = case.to(torch.float64, requires_grad=True)
    lowp = case.to(dtype, device=DEVICE, requires_grad=True)
    test = case.to(dtype, device=DEVICE, requires_grad=True)
    x_test = test.x.to(memory_format=torch.channels_last) if channels_last else test.x
    mags = case.magnitudes()  # the oracle on |inputs|: the rounding floor of the 2x rule
    want = ref_ops.mor_conv2d(*_args(oracle), **case.conv)
    cond = ref_ops.mor_conv2d(*_args(mags), **case.conv)
    want_lowp = ref_ops.mor_conv2d(*_args(lowp), **case.conv, upcast=False)
    with poison_allocations():
        got = mor_kernels.mor_conv2d(x_test, *_args(test)[1:], **case.conv, backend="triton")
    assert got.dtype == dtype
    if channels_last and min(got.shape[2:]) > 1:  # the output keeps the input's layout
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert_parity(got, want, dtype=dtype, lowp=want_lowp, cond=cond, name="y")
    names = [n for n in NAMES if getattr(case, n) is not None]
    dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed)).to(dtype).double()
    g_want = torch.autograd.grad(want, [getattr(oracle, n) for n in names], dy)
    g_cond = torch.autograd.grad(cond, [getattr(mags, n) for n in names], dy.abs())
    dy_l = dy.to(dtype=dtype, device=DEVICE)
    g_lowp = torch.autograd.grad(want_lowp, [getattr(lowp, n) for n in names], dy_l)
    with poison_allocations():
        g_got = torch.autograd.grad(got, [getattr(test, n) for n in names], dy_l)
    for name, a, w, c, lp in zip(names, g_got, g_want, g_cond, g_lowp, strict=True):
        assert_parity(a, w, dtype=dtype, lowp=lp, cond=c, name=f"d{name}")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16],
)
@pytest.mark.parametrize("conv", [{}, dict(stride=2, padding=1), dict(padding=2, dilation=2)])
def test_conv_parity(conv, dtype):
    check_conv(random_case(kernel_size=3, conv=conv, d_in=6, d_out=20, zero_only_unit=True, seed=2), dtype)


ODD = {
    "1x1_kernel": dict(kernel_size=1),
    "R40_paper": dict(kernel_size=3, num_shared=8, num_routed=32, num_zero=4, top_k=8, d_out=70, conv={"padding": 1}),
    "zero_slots_only_S0": dict(kernel_size=3, num_shared=0, top_k=2, num_zero=2, zero_only_unit=True),
    "k_eq_E_plus_Z": dict(kernel_size=3, top_k=8, height=1, width=1, conv={"padding": 1}),
    "R1_no_bias": dict(kernel_size=3, num_shared=1, num_routed=0, num_zero=1, top_k=1, bias=False),
    "odd_pixels": dict(kernel_size=3, height=13, width=11, d_in=5),
}


@pytest.mark.parametrize("name", list(ODD))
def test_conv_odd(name):
    check_conv(random_case(seed=3, **ODD[name]), torch.float32)


def test_conv_channels_last():
    check_conv(random_case(kernel_size=3, conv={"padding": 1}, seed=4), torch.float16, channels_last=True)


def test_conv_deterministic_and_inputs_untouched():
    c = random_case(kernel_size=3, conv={"padding": 1}, height=9, width=9, seed=5)

    def run():
        t = c.to(torch.float32, device=DEVICE, requires_grad=True)
        y = mor_kernels.mor_conv2d(*_args(t), padding=1, backend="triton")
        dy = torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)
        return (y, *torch.autograd.grad(y, [getattr(t, n) for n in NAMES], dy))

    before = [t.clone() for t in c.tensors().values()]
    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for t, b in zip(c.tensors().values(), before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, not the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_sd_conv(dtype):
    """GPU: the paper's ranks on an SD-like 3x3 conv (320 channels, 32x32)."""
    case = random_case(kernel_size=3, conv={"padding": 1}, batch=2, d_in=320, d_out=320, height=32, width=32,
                       num_shared=8, num_routed=32, num_zero=4, top_k=8, seed=6)  # fmt: skip
    check_conv(case, dtype)
