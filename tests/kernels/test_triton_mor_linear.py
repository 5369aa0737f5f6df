"""Triton ``mor_lora``/``mor_linear`` against the reference (MOR_SPEC section 7): forward and every
gradient, sample and token routing, float32/float16/bfloat16, odd sizes, zero-slot corners,
duplicates, strides, determinism. On CPU the kernels run under ``TRITON_INTERPRET=1``."""

import pytest
import torch
from triton_env import DEVICE, INTERPRETED, skip_if_triton_imported_too_late

import mor_kernels
from mor_kernels import reference as ref_ops
from mor_kernels.testing import assert_parity, poison_allocations, random_case

skip_if_triton_imported_too_late()


# bfloat16 runs under the interpreter too: the kernels widen bf16 dot operands to float32 there (see
# mor_kernels.kernels.mor_lora._dot), because triton 3.8's interpreter gets bf16 tl.dot wrong.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _call(op, c, *, backend, upcast=None, base=None):
    if op == "linear":
        args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
        if backend is None:
            return ref_ops.mor_linear(*args, upcast=upcast)
        return mor_kernels.mor_linear(*args, backend=backend)
    args = (c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    if backend is None:
        return ref_ops.mor_lora(*args, base=base, upcast=upcast)
    return mor_kernels.mor_lora(*args, base=base, backend=backend)


def check_parity(case, dtype, op="linear", with_base=False, grads=True, seed=1):
    """Forward and gradients of the Triton op vs the float64 reference, and vs the reference's own
    error in ``dtype`` (upcast=False). All three see the same inputs, rounded to ``dtype`` first."""
    case = case.to(dtype)
    oracle = case.to(torch.float64, requires_grad=True)
    mags = case.magnitudes()  # the oracle on |inputs|: the rounding floor of the 2x rule
    lowp = case.to(dtype, device=DEVICE, requires_grad=True)
    test = case.to(dtype, device=DEVICE, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    base_shape = (*case.x.shape[:-1], case.lora_b.shape[0])
    base64 = torch.randn(base_shape, generator=gen).to(dtype).double() if with_base else None
    bases = (
        [None] * 4
        if base64 is None
        else [base64.clone().requires_grad_(True), base64.abs().requires_grad_(True)]
        + [base64.to(dtype=dtype, device=DEVICE).requires_grad_(True) for _ in range(2)]
    )
    want = _call(op, oracle, backend=None, upcast=True, base=bases[0])
    cond = _call(op, mags, backend=None, upcast=True, base=bases[1])
    want_lowp = _call(op, lowp, backend=None, upcast=False, base=bases[2])
    with poison_allocations():
        got = _call(op, test, backend="triton", base=bases[3])
    assert got.dtype == dtype and got.device.type == DEVICE
    assert_parity(got, want, dtype=dtype, lowp=want_lowp, cond=cond, name="y")
    if not grads:
        return
    names = ["x", "lora_a", "lora_b", "gate"] + (["weight"] + (["bias"] if case.bias is not None else []))[
        : 2 if op == "linear" else 0
    ]
    dy = torch.randn(got.shape, generator=gen).to(dtype).double()

    def grads_of(out, c, base, dy_):
        inputs = [getattr(c, n) for n in names] + ([base] if base is not None else [])
        return torch.autograd.grad(out, inputs, dy_)

    g_want = grads_of(want, oracle, bases[0], dy)
    g_cond = grads_of(cond, mags, bases[1], dy.abs())
    g_lowp = grads_of(want_lowp, lowp, bases[2], dy.to(dtype=dtype, device=DEVICE))
    with poison_allocations():
        g_got = grads_of(got, test, bases[3], dy.to(dtype=dtype, device=DEVICE))
    for name, a, w, c, lp in zip(names + ["base"] * with_base, g_got, g_want, g_cond, g_lowp, strict=True):
        assert_parity(a, w, dtype=dtype, lowp=lp, cond=c, name=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_linear_parity(routing, dtype):
    check_parity(random_case(routing=routing, tokens=17, zero_only_unit=True, seed=3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_lora_with_base_parity(routing, dtype):
    check_parity(random_case(routing=routing, tokens=17, seed=4), dtype, op="lora", with_base=True)


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_lora_without_base_parity(routing):
    check_parity(random_case(routing=routing, tokens=17, seed=5), torch.float32, op="lora")


ODD = {
    "T1": dict(tokens=1),
    "T130_d320": dict(tokens=130, d_in=320, d_out=65),
    "R1_shared_only": dict(num_shared=1, num_routed=0, num_zero=2, top_k=1),
    "R1_routed_only": dict(num_shared=0, num_routed=1, num_zero=1, top_k=2),
    "R40_paper": dict(num_shared=8, num_routed=32, num_zero=4, top_k=8, tokens=9),
    "k_eq_E_plus_Z": dict(top_k=8, zero_only_unit=True),
    "zero_slots_only": dict(top_k=2, num_zero=2, zero_only_unit=True),
    "S0": dict(num_shared=0, zero_only_unit=True),
    "no_bias": dict(bias=False),
}


@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("name", list(ODD))
def test_odd_shapes(name, routing):
    dtype = torch.float16 if name == "T130_d320" else torch.float32
    check_parity(random_case(routing=routing, seed=6, **ODD[name]), dtype)


def test_zero_only_sample_uses_base_only():
    """A sample whose k slots are all zero slots gets exactly the shared ranks (here: none)."""
    c = random_case(num_shared=0, top_k=2, num_zero=2, zero_only_unit=True, seed=7)
    assert (c.idx[0] == -1).all()
    got = mor_kernels.mor_linear(
        c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, 0, c.scaling, backend="triton"
    )
    base = torch.nn.functional.linear(c.x[:1].double(), c.weight.double(), c.bias.double())
    assert_parity(got[:1], base, dtype=torch.float32)


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_duplicate_ranks_sum_gates(routing):
    """A routed rank picked by two slots (hand-made idx) contributes the sum of both gates."""
    c = random_case(routing=routing, seed=8)
    c.idx = torch.zeros_like(c.idx)  # every slot picks routed rank 0
    c.idx[..., -1] = -1
    check_parity(c, torch.float32)


def test_strided_inputs_and_extra_token_dims():
    c = random_case(routing="token", tokens=12, seed=9)
    x4 = c.x.reshape(2, 3, 4, -1).transpose(1, 2)  # (B, 4, 3, d_in), non-contiguous
    idx4 = c.idx.reshape(2, 3, 4, -1).transpose(1, 2)
    gate4 = c.gate.reshape(2, 3, 4, -1).transpose(1, 2)
    w_t = c.weight.T.contiguous().T
    bias_s = torch.stack([c.bias, -c.bias], 1)[:, 0]  # stride 2
    got = mor_kernels.mor_linear(x4, w_t, bias_s, c.lora_a, c.lora_b, idx4, gate4, 2, 0.5, backend="triton")
    want = ref_ops.mor_linear(x4.double(), c.weight.double(), c.bias.double(), c.lora_a.double(),
                              c.lora_b.double(), idx4, gate4, 2, 0.5)  # fmt: skip
    assert got.shape == (2, 4, 3, c.weight.shape[0])
    assert_parity(got, want, dtype=torch.float32)


def test_base_is_not_modified_and_no_grad_path():
    c = random_case(routing="sample", seed=10)
    base = torch.randn(*c.x.shape[:-1], c.lora_b.shape[0])
    before = base.clone()
    with torch.no_grad():
        got = mor_kernels.mor_lora(c.x, c.lora_a, c.lora_b, c.idx, c.gate, 2, 0.75, base=base, backend="triton")
    assert torch.equal(base, before)
    want = ref_ops.mor_lora(c.x.double(), c.lora_a.double(), c.lora_b.double(), c.idx, c.gate, 2, 0.75,
                            base=base.double())  # fmt: skip
    assert_parity(got, want, dtype=torch.float32)


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_deterministic_bitwise(routing):
    c = random_case(routing=routing, tokens=70, seed=11)

    def run():
        t = c.to(torch.float32, device=DEVICE, requires_grad=True)
        y = mor_kernels.mor_linear(t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.idx, t.gate, 2, 0.75,
                                   backend="triton")  # fmt: skip
        dy = torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)
        grads = torch.autograd.grad(y, [t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.gate], dy)
        return (y, *grads)

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, not the interpreter")
@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_sd_shapes(routing, dtype):
    """GPU: the paper's rank setting at an SD 2.1 shape, forward and gradients."""
    case = random_case(routing=routing, batch=2, tokens=1024, d_in=640, d_out=640, num_shared=8, num_routed=32,
                       num_zero=4, top_k=8, seed=12)  # fmt: skip
    check_parity(case, dtype)


def _random_config(seed):
    rng = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    num_zero, num_routed = pick(0, 3), pick(0, 9)
    if num_routed + num_zero == 0:
        num_zero = 1
    return dict(
        batch=pick(1, 3),
        tokens=pick(1, 40),
        d_in=pick(1, 70),
        d_out=pick(1, 70),
        num_shared=pick(0, 5),
        num_routed=num_routed,
        num_zero=num_zero,
        top_k=pick(1, num_routed + num_zero),
        routing="token" if pick(0, 1) else "sample",
        bias=bool(pick(0, 1)),
        zero_only_unit=bool(pick(0, 1)),
        seed=seed,
    )


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes(seed):
    """Seeded random sizes (d_in/d_out down to 1, any S/E/Z/k) through forward and every gradient."""
    config = _random_config(100 + seed)
    if config["num_shared"] + config["num_routed"] == 0:
        config["num_shared"] = 1
    check_parity(random_case(**config), torch.float32)


PAPER_ODD = dict(tokens=130, d_in=320, d_out=65, num_shared=8, num_routed=32, num_zero=4, top_k=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_odd_paper_shapes_low_precision(routing, dtype):
    """T = 130 (ragged blocks), d_in = 320, d_out = 65, the paper's R = 40 in 16 bits."""
    check_parity(random_case(routing=routing, seed=15, **PAPER_ODD), dtype)


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_stored_u_is_the_rank_projection(routing):
    """``u`` (written by the first column tile of each token block) is ``x A^T`` over the rank list:
    sample routing, the shared ranks then each slot's routed rank (zero for a zero slot), token routing,
    rank p at position p; zero on padding."""
    from mor_kernels.ops import triton_mor_lora as lora_ops

    c = random_case(routing=routing, tokens=40, d_out=150, zero_only_unit=True, seed=20)
    t = c.to(torch.float32, device=DEVICE)
    s, ranks = c.num_shared, c.lora_a.shape[0]
    args = (t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.idx.to(torch.int32), t.gate, None, s, c.scaling)
    with poison_allocations():
        y, u = lora_ops.triton_lora_fwd(*args, True)
    rp = u.shape[-1]
    assert u.dtype == torch.float32 and u.shape == (2, 40, 16) and y.shape == (2, 40, 150)
    proj = c.x.double() @ c.lora_a.double().T  # (B, T, R)
    want = torch.zeros(2, 40, rp, dtype=torch.float64)
    if routing == "token":
        want[..., :ranks] = proj
    else:
        want[..., :s] = proj[..., :s]
        for b in range(2):
            for j, sel in enumerate(c.idx[b].tolist()):
                if 0 <= sel < ranks - s:
                    want[b, :, s + j] = proj[b, :, s + sel]
        assert (c.idx[0] < 0).any()  # the first sample picks a zero slot: its position stays zero
    assert_parity(u.cpu(), want, dtype=torch.float32, name="u")
    with poison_allocations():
        y_inf, none = lora_ops.triton_lora_fwd(*args, False)
    assert none.shape == (0,) and torch.equal(y_inf, y)


def test_backend_casts_mixed_operands():
    """Called directly with a 16-bit x and float32 weights, or under autocast, the backend op casts
    every operand to one compute dtype first (x's, or autocast's), so no dot mixes dtypes; float32
    leaves get float32 gradients through the casts."""
    from mor_kernels.ops import triton_backend

    case = random_case(routing="token", tokens=9, seed=17)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "gate"]
    for dtype, autocast in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)):
        test = case.to(torch.float32, device=DEVICE, requires_grad=True)
        x = test.x if autocast else test.x.detach().to(dtype).requires_grad_(True)
        args = (test.weight, test.bias, test.lora_a, test.lora_b, test.idx, test.gate, case.num_shared, case.scaling)
        with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
            got = triton_backend.mor_linear(x, *args)
        assert got.dtype == dtype
        oracle = case.to(dtype).to(torch.float64, requires_grad=True)
        want = ref_ops.mor_linear(oracle.x, oracle.weight, oracle.bias, oracle.lora_a, oracle.lora_b, oracle.idx,
                                  oracle.gate, case.num_shared, case.scaling)  # fmt: skip
        assert_parity(got, want, dtype=dtype, name="y")
        dy = torch.randn(got.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        leaves = [x] + [getattr(test, n) for n in names[1:]]
        g_got = torch.autograd.grad(got, leaves, dy.to(DEVICE))
        g_want = torch.autograd.grad(want, [getattr(oracle, n) for n in names], dy.double())
        for name, leaf, a, w in zip(names, leaves, g_got, g_want, strict=True):
            assert a.dtype == leaf.dtype, name
            assert_parity(a, w, dtype=dtype, name=f"d{name}")


def test_launchers_refuse_mixed_dtypes():
    from mor_kernels.kernels import mor_lora as kernels

    c = random_case(seed=18)
    x = c.x.to(DEVICE, torch.bfloat16)
    with pytest.raises(TypeError, match=r"x torch.bfloat16, lora_a torch.float32"):
        kernels.forward(x, None, None, c.lora_a.to(DEVICE), c.lora_b.to(DEVICE, torch.bfloat16),
                        c.idx.to(DEVICE, torch.int32), c.gate.to(DEVICE), None, 2, 1.0, False)  # fmt: skip
