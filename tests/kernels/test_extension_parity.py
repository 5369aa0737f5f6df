"""Parity of the compiled extension against the reference (MOR_SPEC section 7), forward and every gradient.

``backend="cpp"`` (C++ CPU kernels) runs everywhere the extension is built; the same tests run
``backend="cuda"`` on a GPU (marked ``gpu``). Oracle: the reference in float64; low-precision budget: the
reference with ``upcast=False`` in the tested dtype.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import mor_kernels
from mor_kernels import _extension
from mor_kernels import reference as ref
from mor_kernels.testing import assert_parity, poison_allocations, random_case

_C, WHY = _extension.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"the compiled extension is not built here ({WHY})")

DEVICES = [
    pytest.param("cpu", id="cpp"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="backend='cuda' needs a CUDA device"),
        ],
    ),
]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# MOR_SPEC 7 corner cases (random_case keyword overrides); the default is B=2, T=17, d_in=41, d_out=33.
CASES = {
    "default": {},
    "t1": {"tokens": 1},
    "r1": {"num_shared": 0, "num_routed": 1, "num_zero": 1, "top_k": 2},
    "r40": {"num_shared": 8, "num_routed": 32, "num_zero": 4, "top_k": 8, "d_in": 64, "d_out": 40, "tokens": 9},
    "k_all": {"num_shared": 1, "num_routed": 4, "num_zero": 2, "top_k": 6},
    "zero_only": {"zero_only_unit": True, "num_zero": 3, "top_k": 2},
    "s0": {"num_shared": 0},
    "t33_d1": {"tokens": 33, "d_in": 1, "d_out": 3, "batch": 3},
    "t130_d320": {"tokens": 130, "d_in": 320, "d_out": 65, "batch": 1},
}
CONV_CASES = {
    "3x3_pad1": {"kernel_size": 3, "conv": {"padding": (1, 1)}},
    "3x3_stride2": {"kernel_size": 3, "conv": {"stride": (2, 2), "padding": (1, 1)}},
    "1x1": {"kernel_size": 1},
    "3x3_dil2_r1": {
        "kernel_size": 3,
        "conv": {"padding": (2, 2), "dilation": (2, 2)},
        "num_shared": 0,
        "num_routed": 1,
        "num_zero": 1,
        "top_k": 2,
    },
    "zero_only_s0": {"kernel_size": 3, "conv": {"padding": (1, 1)}, "zero_only_unit": True, "num_shared": 0},
}


def _run(op, c, impl, **kw):
    """Calls ``op`` with ``c``'s tensors through ``impl`` (a backend name or a reference function)."""
    if op == "lora":
        base = kw.pop("base", None)
        if isinstance(impl, str):
            return mor_kernels.mor_lora(
                c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, base=base, backend=impl
            )
        return impl(c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, base=base, **kw)
    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    if op == "linear":
        if isinstance(impl, str):
            return mor_kernels.mor_linear(*args, backend=impl)
        return impl(*args, **kw)
    conv = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), **c.conv}
    if isinstance(impl, str):
        return mor_kernels.mor_conv2d(*args, **conv, backend=impl)
    return impl(*args, **conv, **kw)


REF = {"lora": ref.mor_lora, "linear": ref.mor_linear, "conv": ref.mor_conv2d}


def _check(op, case, dtype, device, with_base=False):
    """Forward and every gradient of ``backend`` against the float64 oracle and the low-precision reference."""
    gen = torch.Generator().manual_seed(1)
    # The oracle sees the same (rounded to dtype) inputs as the kernel, in float64 (MOR_SPEC 7).
    oracle = case.to(dtype).to(torch.float64, requires_grad=True)
    mags = case.to(dtype).magnitudes()  # the oracle on |inputs|: the rounding floor of the 2x rule
    lowp = case.to(dtype, requires_grad=True)
    test = case.to(dtype, device=device, requires_grad=True)
    extra = {}
    if with_base:
        base = torch.randn(*case.x.shape[:-1], case.lora_b.shape[0], generator=gen, dtype=torch.float64)
        base = base.to(dtype).double()
        extra = {
            "oracle": {"base": base.clone().requires_grad_()},
            "mags": {"base": base.abs().requires_grad_()},
            "lowp": {"base": base.to(dtype).requires_grad_()},
            "test": {"base": base.to(dtype=dtype, device=device).requires_grad_()},
        }
    y64 = _run(op, oracle, REF[op], **extra.get("oracle", {}))
    cond = _run(op, mags, REF[op], **extra.get("mags", {}))
    ylp = _run(op, lowp, REF[op], upcast=False, **extra.get("lowp", {}))
    with poison_allocations():
        y = _run(op, test, BACKEND[device], **extra.get("test", {}))
    assert y.dtype == dtype and y.device.type == device
    assert_parity(y, y64, dtype=dtype, lowp=ylp, cond=cond, name=f"{op} forward")

    dy = torch.randn(y64.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    y64.backward(dy)
    cond.backward(dy.abs())
    ylp.backward(dy.to(dtype))
    with poison_allocations():
        y.backward(dy.to(dtype=dtype, device=device))
    names = [n for n in test.tensors() if op != "lora" or n not in ("weight", "bias")]
    for name in names:
        g, g64, glp = test.tensors()[name].grad, oracle.tensors()[name].grad, lowp.tensors()[name].grad
        assert g is not None, f"no gradient for {name}"
        # gate stays float32, but its gradient comes from a computation in dtype: judged with dtype's tolerances
        assert_parity(g, g64, dtype=dtype, lowp=glp, cond=mags.tensors()[name].grad, name=f"d{name}")
    if with_base:
        b = extra["test"]["base"]
        assert_parity(b.grad, extra["oracle"]["base"].grad, dtype=dtype, name="dbase")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", ["linear", "lora"])
def test_parity(op, case, routing, dtype, device):
    c = random_case(routing=routing, **CASES[case], seed=zlib.crc32(f"{op}-{case}-{routing}".encode()) % 1000)
    _check(op, c, dtype, device, with_base=(op == "lora" and case in ("default", "zero_only")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="backend='cuda' needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_cuda_sd_sized_backward_above_the_split_threshold(routing, dtype):
    """An SD-sized layer (T = 1024, d = 640, the paper's 40 ranks): 1024 tokens in all, above the 256 from
    which the CUDA backward splits its dA/dB token sums (4 splits summed by split_sum_kernel)."""
    c = random_case(routing=routing, batch=1, tokens=1024, d_in=640, d_out=640, num_shared=8, num_routed=32,
                    num_zero=4, top_k=8, seed=29)  # fmt: skip
    _check("lora", c, dtype, "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_parity(case, dtype, device):
    kw = dict(CONV_CASES[case])
    c = random_case(d_in=5, d_out=7, height=6, width=5, **kw, seed=3)
    _check("conv", c, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shape,top_k,num_zero", [((5, 7), 3, 2), ((2, 3, 36), 8, 4), ((4, 2), 2, 1), ((3, 40), 1, 0)])
def test_route_parity(shape, top_k, num_zero, renormalize, dtype, device):
    gen = torch.Generator().manual_seed(top_k)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    l64 = logits.clone().requires_grad_()
    lt = logits.to(dtype=dtype, device=device).requires_grad_()
    i64, g64, p64 = ref.route(l64.to(dtype).double(), top_k, num_zero, renormalize)  # same rounded logits
    with poison_allocations():
        idx, gate, probs = mor_kernels.route(lt, top_k, num_zero, renormalize, backend=BACKEND[device])
    assert idx.dtype == torch.int32 and gate.dtype == torch.float32 and probs.dtype == torch.float32
    assert torch.equal(idx.cpu(), i64), "selection differs from the reference"
    assert_parity(gate, g64, dtype=torch.float32, name="gate")
    assert_parity(probs, p64, dtype=torch.float32, name="probs")
    wg = torch.randn(gate.shape, generator=gen, dtype=torch.float64)
    wp = torch.randn(probs.shape, generator=gen, dtype=torch.float64)
    ((g64 * wg).sum() + (p64 * wp).sum()).backward()
    ((gate * wg.to(device).float()).sum() + (probs * wp.to(device).float()).sum()).backward()
    assert lt.grad.dtype == dtype
    assert_parity(lt.grad, l64.grad, dtype=dtype, name="dlogits")


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_go_to_the_lower_slot(device):
    logits = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 0.0], [0.0] * 6, [3.0, 3.0, -1.0, 3.0, 3.0, 3.0]])
    idx, gate, _ = mor_kernels.route(logits.to(device), 4, 2, backend=BACKEND[device])
    ridx, rgate, _ = ref.route(logits, 4, 2)
    assert idx.cpu().tolist() == [[1, 2, -1, 0], [0, 1, 2, 3], [0, 1, 3, -1]]
    assert torch.equal(idx.cpu(), ridx)
    assert_parity(gate, rgate, dtype=torch.float32, name="gate")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    c = random_case(routing="sample", tokens=300, d_in=64, d_out=48, batch=3, seed=5)
    results = []
    threads = torch.get_num_threads()
    for n_threads in (1, max(2, threads)):
        torch.set_num_threads(n_threads)
        try:
            t = c.to(torch.float32, device=device, requires_grad=True)
            y = mor_kernels.mor_lora(
                t.x, t.lora_a, t.lora_b, t.idx, t.gate, t.num_shared, t.scaling, backend=BACKEND[device]
            )
            y.backward(torch.ones_like(y))
            results.append([y.detach()] + [t.tensors()[n].grad for n in ("x", "lora_a", "lora_b", "gate")])
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b), "results differ between runs / thread counts"


@pytest.mark.parametrize("device", DEVICES)
def test_needs_input_grad_is_honoured(device):
    c = random_case(seed=7).to(torch.float32, device=device)
    x = c.x.clone().requires_grad_()
    y = mor_kernels.mor_lora(x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, backend=BACKEND[device])
    y.sum().backward()
    r = c.to(torch.float64)
    xr = r.x.clone().requires_grad_()
    ref.mor_lora(xr, r.lora_a, r.lora_b, r.idx, r.gate, r.num_shared, r.scaling).sum().backward()
    assert_parity(x.grad, xr.grad, dtype=torch.float32, name="dx")
    assert c.lora_a.grad is None and c.gate.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_are_not_modified(device):
    c = random_case(seed=11).to(torch.float32, device=device)
    base = torch.randn(c.x.shape[0], c.x.shape[1], c.lora_b.shape[0], device=device)
    before = [t.clone() for t in (c.x, c.lora_a, c.lora_b, c.idx, c.gate, base)]
    mor_kernels.mor_lora(
        c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, base=base, backend=BACKEND[device]
    )
    for a, b in zip(before, (c.x, c.lora_a, c.lora_b, c.idx, c.gate, base), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    c = random_case(seed=13, tokens=9).to(torch.float32, device=device)
    x_t = c.x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not x_t.is_contiguous()
    y = mor_kernels.mor_linear(
        x_t, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, backend=BACKEND[device]
    )
    r = c.to(torch.float64)
    y64 = ref.mor_linear(r.x, r.weight, r.bias, r.lora_a, r.lora_b, r.idx, r.gate, r.num_shared, r.scaling)
    assert_parity(y, y64, dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_runs_under_autocast(op, device):
    """Mixed precision: like F.linear/F.conv2d, the MoR op runs in (and returns) the autocast dtype."""
    kw = {"kernel_size": 3, "conv": {"padding": (1, 1)}, "d_in": 5, "d_out": 7} if op == "conv" else {}
    c = random_case(seed=17, **kw).to(torch.float32, device=device, requires_grad=True)
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=low):
        y = _run(op, c, BACKEND[device])
    y.sum().backward()
    r = c.to(torch.float64)
    y64 = _run(op, r, REF[op])
    assert y.dtype == low
    assert_parity(y, y64, dtype=low, name=f"{op} under autocast")
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in c.tensors().values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_rank_picked_twice_sums_the_gates(routing, device):
    """Hand-made idx that picks a routed rank twice: the rank's gate is the sum of both (dense_gate semantics)."""
    c = random_case(routing=routing, seed=19, num_zero=0, top_k=3)
    c.idx[..., 1] = c.idx[..., 0]
    _check("lora", c, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_channels_last(device):
    c = random_case(kernel_size=3, conv={"padding": (1, 1)}, d_in=6, d_out=5, seed=23)
    t = c.to(torch.float32, device=device, requires_grad=True)
    x = t.x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = mor_kernels.mor_conv2d(
        x,
        t.weight,
        t.bias,
        t.lora_a,
        t.lora_b,
        t.idx,
        t.gate,
        t.num_shared,
        t.scaling,
        padding=1,
        backend=BACKEND[device],
    )
    y.backward(torch.ones_like(y))
    r = c.to(torch.float64, requires_grad=True)
    y64 = ref.mor_conv2d(r.x, r.weight, r.bias, r.lora_a, r.lora_b, r.idx, r.gate, r.num_shared, r.scaling, padding=1)
    y64.backward(torch.ones_like(y64))
    assert_parity(y, y64, dtype=torch.float32)
    assert_parity(x.grad, r.x.grad, dtype=torch.float32, name="dx")
