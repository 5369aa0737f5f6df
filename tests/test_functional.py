"""Public-op behaviour shared by every backend: autocast, empty batches, out-of-range indices."""

import warnings

import pytest
import torch

import mor_kernels
from mor_kernels import _extension, dispatch
from mor_kernels.testing import random_case

CPU_BACKENDS = ["reference"] + (["cpp"] if _extension.has_kernel("lora_fwd", "CPU") else [])
CPU_BACKENDS += ["blas"] if dispatch.unavailable_reason("blas", "mor_linear", torch.device("cpu")) is None else []


def _linear(c, backend, **kw):
    return mor_kernels.mor_linear(
        c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, backend=backend, **kw
    )


def _backend_params(op: str):
    """Every backend ``dispatch`` knows (a backend added later is tested by default), each on the first
    device it runs ``op`` on here; unavailable ones are skipped with the reason."""
    params = []
    for name in dispatch.BACKENDS:
        devices = [d for d in ("cpu", "cuda") if dispatch.unavailable_reason(name, op, torch.device(d)) is None]
        if devices:
            params.append(pytest.param(name, devices[0], id=name))
        else:
            why = dispatch.unavailable_reason(name, op, torch.device("cpu"))
            params.append(pytest.param(name, "cpu", id=name, marks=pytest.mark.skip(reason=f"{name}: {why}")))
    return params


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad_mode"])
@pytest.mark.parametrize("op", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("backend,device", _backend_params("mor_linear"))
def test_inference_under_vmap_equals_a_loop(backend, device, op, grad):
    """``torch.vmap`` over an inference call (no_grad, or grad mode with nothing requiring a gradient) gives
    what a loop over the vmapped dimension gives, on every backend. The Triton backend's direct launch met a
    storage-less batched tensor, and the autograd Functions of the triton/cpp/cuda backends are rejected by
    functorch; an inference call now reaches the ops, which torch's fallback runs sample by sample."""
    if op == "linear":
        c = random_case(routing="sample", seed=5).to(torch.float32, device=device)

        def call(x):
            return mor_kernels.mor_linear(x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared,
                                          c.scaling, backend=backend, check_indices=False)  # fmt: skip
    else:
        if dispatch.unavailable_reason(backend, "mor_conv2d", torch.device(device)) is not None:
            pytest.skip(dispatch.unavailable_reason(backend, "mor_conv2d", torch.device(device)))
        k = 3 if op == "conv3x3" else 1
        c = random_case(kernel_size=k, conv={"padding": k // 2}, d_in=5, d_out=7, seed=5)
        c = c.to(torch.float32, device=device)

        def call(x):
            return mor_kernels.mor_conv2d(x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared,
                                          c.scaling, padding=k // 2, backend=backend, check_indices=False)  # fmt: skip

    xs = torch.stack([c.x, 0.5 * c.x.flip(-1), -c.x])
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")  # the per-sample fallback's notice
        got = torch.vmap(call)(xs)
        want = torch.stack([call(x) for x in xs])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_autocast_runs_in_the_autocast_dtype_like_the_torch_layers(op, backend):
    """Inside torch.autocast the ops cast their float operands like F.linear/F.conv2d do, and return
    the autocast dtype; the result equals the op on operands cast by hand (gate stays float32)."""
    kw = dict(kernel_size=3, conv={"padding": 1}, d_in=5, d_out=7) if op == "conv" else {}
    c = random_case(seed=3, **kw)
    low = c.to(torch.bfloat16)

    def run(case):
        if op == "linear":
            return _linear(case, backend)
        args = (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.idx, case.gate, 2, 0.75)
        return mor_kernels.mor_conv2d(*args, padding=1, backend=backend)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(c)
        torch_layer = torch.nn.functional.linear(c.x, c.weight) if op == "linear" else None
    assert got.dtype == torch.bfloat16
    assert torch_layer is None or torch_layer.dtype == got.dtype
    assert torch.equal(got, run(low))
    assert c.x.dtype == torch.float32  # the caller's tensors are untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_empty_batch(routing, backend):
    c = random_case(routing=routing, batch=1, seed=4)
    empty_idx = c.idx[:0]
    x = c.x[:0].requires_grad_(True)
    y = mor_kernels.mor_linear(x, c.weight, c.bias, c.lora_a, c.lora_b, empty_idx, c.gate[:0], 2, 0.75, backend=backend)
    assert y.shape == (0, c.x.shape[1], c.weight.shape[0])
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("backend,device", _backend_params("mor_linear"))
def test_unchecked_out_of_range_index_is_a_zero_slot(backend, device, routing):
    """With check_indices=False an index outside [0, E) (here E, the first one past the end) is a zero slot
    on every backend, forward and backward, never an out-of-bounds read: the rank it would name, row R of
    lora_a and column R of lora_b, exists in memory next to the weights and holds NaN, so reading it shows."""
    c = random_case(routing=routing, seed=5)  # E = 6, R = 8
    bad, zero = c.idx.clone(), c.idx.clone()
    bad[..., 0], zero[..., 0] = 6, -1
    ranks, d_in = c.lora_a.shape
    a_mem = torch.full((ranks + 1, d_in), float("nan"))
    b_mem = torch.full((c.lora_b.shape[0], ranks + 1), float("nan"))
    a_mem[:ranks], b_mem[:, :ranks] = c.lora_a, c.lora_b

    def run(idx, check_indices):
        t = c.to(torch.float32, device=device, requires_grad=True)
        a, b = a_mem.to(device)[:ranks].requires_grad_(), b_mem.to(device)[:, :ranks].requires_grad_()
        args = (t.x, t.weight, t.bias, a, b, idx.to(device), t.gate, c.num_shared, c.scaling)
        y = mor_kernels.mor_linear(*args, backend=backend, check_indices=check_indices)
        grads = torch.autograd.grad(y, [t.x, a, b, t.gate, t.weight], torch.ones_like(y))
        return [y.cpu()] + [g.cpu() for g in grads]

    got, want = run(bad, False), run(zero, True)
    for name, g, w in zip(["y", "dx", "dlora_a", "dlora_b", "dgate", "dweight"], got, want, strict=True):
        assert torch.isfinite(w).all() and torch.equal(g, w), name
    with pytest.raises(ValueError, match=r"idx values must be in \[-1, 6\)"):
        run(bad, True)


@pytest.mark.parametrize("scaling", [float("nan"), float("inf")])
def test_non_finite_scaling_is_refused(scaling):
    c = random_case(seed=6)
    with pytest.raises(ValueError, match="scaling must be finite"):
        mor_kernels.mor_lora(c.x, c.lora_a, c.lora_b, c.idx, c.gate, 2, scaling)


def test_meta_tensors_give_shapes():
    """Shape inference on meta tensors (no data, no autocast device) runs through the reference."""
    c = random_case(seed=7).to(device="meta")
    assert _linear(c, "reference").shape == (2, 17, 33)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unchecked_int64_indices_beyond_int32_do_not_wrap(backend):
    c = random_case(seed=8)
    c64, zero = c.to(torch.float32), c.to(torch.float32)
    c64.idx = c.idx.long()
    c64.idx[:, 0] = 2**32 + 1  # would wrap to rank 1 in a plain int32 cast
    zero.idx = c.idx.clone()
    zero.idx[:, 0] = -1
    assert torch.equal(_linear(c64, backend, check_indices=False), _linear(zero, backend))


# ---------------------------------------------------------------------------------------------------------
# MOR_SPEC 2.2: a rank a unit does not pick contributes exactly zero to it, whatever its weights hold.


POISON = {"nan_a": ("a", float("nan")), "inf_b": ("b", float("inf")), "both": ("ab", float("-inf"))}


def _poisoned_case(op: str, routing: str):
    """A case in which routed rank ``S + 5`` is picked by exactly one routing unit, returned with that unit
    (a sample index, or a (sample, token) pair) and the rank."""
    if op == "conv":
        c = random_case(kernel_size=3, conv={"padding": 1}, d_in=5, d_out=7, batch=3, seed=21)
    else:
        c = random_case(routing=routing, batch=3, tokens=9, seed=21)
    s = c.num_shared
    # E = 6 routed ranks, k = 3; routed slot 5 only where chosen below
    c.idx = c.idx.clone()
    c.idx[c.idx == 5] = -1
    c.idx[1, ..., 0] = -1 if routing == "token" else 5  # sample routing: sample 1 picks it
    picker = (1,) if (routing == "sample" or op == "conv") else (1, 4)
    if picker != (1,):
        c.idx[picker + (0,)] = 5
    return c, picker, s + 5


def _poisoned(c, rank: int, poison: str):
    """A copy of case ``c`` with NaN/inf (``POISON[poison]``) in ``lora_a``'s row and/or ``lora_b``'s column
    ``rank``."""
    where, value = POISON[poison]
    bad = c.to(torch.float32)
    if "a" in where:
        bad.lora_a[rank].view(-1)[1] = value
    if "b" in where:
        bad.lora_b[3, rank] = value
    return bad


def _run_poison(op, c, backend, device):
    t = c.to(torch.float32, device=device, requires_grad=True)
    if op == "conv":
        y = mor_kernels.mor_conv2d(
            t.x, t.weight, t.bias, t.lora_a, t.lora_b, t.idx, t.gate, t.num_shared, t.scaling, padding=1,
            backend=backend, check_indices=False,
        )  # fmt: skip
    else:
        y = _linear(t, backend, check_indices=False)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device)
    names = ["x", "lora_a", "lora_b", "gate", "weight", "bias"]
    grads = torch.autograd.grad(y, [getattr(t, n) for n in names], dy)
    return y.detach().cpu(), {n: g.cpu() for n, g in zip(names, grads, strict=True)}


@pytest.mark.parametrize("poison", list(POISON))
@pytest.mark.parametrize("op,routing", [("linear", "sample"), ("linear", "token"), ("conv", "sample")])
@pytest.mark.parametrize("backend,device", _backend_params("mor_linear"))
def test_a_rank_not_picked_contributes_exactly_zero_even_when_not_finite(backend, device, op, routing, poison):
    """A routed rank picked by one unit only holds NaN/inf: every other unit's output, x gradient and gate
    gradient, and every other rank's lora_a/lora_b gradient equal those of the run with finite values in
    that rank, bit for bit (no ``0 * NaN``); the unit that picks it is not silently repaired."""
    if op == "conv" and dispatch.unavailable_reason(backend, "mor_conv2d", torch.device(device)) is not None:
        pytest.skip(dispatch.unavailable_reason(backend, "mor_conv2d", torch.device(device)))
    c, picker, rank = _poisoned_case(op, routing)
    clean_y, clean_g = _run_poison(op, c, backend, device)
    y, g = _run_poison(op, _poisoned(c, rank, poison), backend, device)
    others = torch.ones(y.shape[: len(picker)], dtype=torch.bool)
    others[picker] = False
    assert torch.isfinite(clean_y).all() and torch.isfinite(y[others]).all()
    assert torch.equal(y[others], clean_y[others]), "an unpicked non-finite rank changed other units' outputs"
    assert not torch.isfinite(y[picker]).all(), "the unit that picks the non-finite rank came out finite"
    assert torch.equal(g["x"][others], clean_g["x"][others]), "dx of other units changed"
    assert torch.equal(g["gate"][others], clean_g["gate"][others]), "dgate of other units changed"
    keep = torch.arange(c.lora_a.shape[0]) != rank
    assert torch.equal(g["lora_a"][keep], clean_g["lora_a"][keep]), "dlora_a of other ranks changed"
    assert torch.equal(g["lora_b"][:, keep], clean_g["lora_b"][:, keep]), "dlora_b of other ranks changed"
    for name in ("weight", "bias"):  # the base layer's gradients see only dy and x
        assert torch.equal(g[name], clean_g[name]), f"d{name} changed"


@pytest.mark.parametrize("backend,device", _backend_params("mor_conv2d"))
def test_conv_with_no_input_channels_is_a_value_error(backend, device):
    """C_in = 0 (x, weight and lora_a with zero input channels) fails up front on every backend."""
    c = random_case(kernel_size=3, conv={"padding": 1}, d_in=1, seed=9).to(torch.float32, device=device)
    x, weight, lora_a = c.x[:, :0], c.weight[:, :0], c.lora_a[:, :0]
    with pytest.raises(
        ValueError, match=r"x must have at least one input channel \(C_in >= 1\), got shape \(2, 0, 5, 7\)"
    ):
        mor_kernels.mor_conv2d(x, weight, c.bias, lora_a, c.lora_b, c.idx, c.gate, 2, 0.75, padding=1, backend=backend)


# ---------------------------------------------------------------------------------------------------------
# MOR_SPEC 2.2: g_r = 0 means the unit does not use rank r. A slot that picks a rank with a gate of exactly 0
# (a softmax probability that underflowed, or a gate set to 0 by hand) is therefore a zero slot: it adds
# nothing, whatever the rank's weights hold, and its gate gets no gradient, like every rank the unit does not
# use.


def _zero_gate_case(op: str, routing: str):
    """The poisoned case of the test above with the picking unit's slot-0 gate set to exactly 0, and the same
    case with that slot a zero slot (``idx = -1``) instead."""
    c, picker, rank = _poisoned_case(op, routing)
    c.gate = c.gate.clone()
    c.gate[picker + (0,)] = 0.0
    zero = c.to(torch.float32)
    zero.idx = c.idx.clone()
    zero.idx[picker + (0,)] = -1
    return c, zero, rank


def _merged_forward(op, c, backend):
    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    with torch.no_grad():
        if op == "conv":
            return mor_kernels.mor_conv2d(*args, padding=1, backend=backend, check_indices=False, merge="always")
        return mor_kernels.mor_linear(*args, backend=backend, check_indices=False, merge="always")


@pytest.mark.parametrize("poison", [None, *POISON])
@pytest.mark.parametrize("op,routing", [("linear", "sample"), ("linear", "token"), ("conv", "sample")])
@pytest.mark.parametrize("backend,device", _backend_params("mor_linear"))
def test_a_picked_slot_with_gate_zero_is_a_zero_slot(backend, device, op, routing, poison):
    """Output and every gradient (the slot's own gate gradient included: 0) equal those of the same call with
    that slot a zero slot, bit for bit, with finite weights and with NaN/inf in the rank it points at; the
    merged path (inference) too."""
    if op == "conv" and dispatch.unavailable_reason(backend, "mor_conv2d", torch.device(device)) is not None:
        pytest.skip(dispatch.unavailable_reason(backend, "mor_conv2d", torch.device(device)))
    c, zero, rank = _zero_gate_case(op, routing)
    want_y, want_g = _run_poison(op, zero, backend, device)
    if poison is not None:
        c = _poisoned(c, rank, poison)
    y, g = _run_poison(op, c, backend, device)
    assert torch.isfinite(want_y).all()
    assert torch.equal(y, want_y), "a slot with gate 0 changed the output"
    for name in ("x", "gate", "weight", "bias"):
        assert torch.equal(g[name], want_g[name]), f"d{name} differs from the zero-slot call"
    keep = torch.arange(c.lora_a.shape[0]) != rank  # a poisoned rank's own gradient may be anything
    if poison is None:
        keep[:] = True
    assert torch.equal(g["lora_a"][keep], want_g["lora_a"][keep]), "dlora_a differs from the zero-slot call"
    assert torch.equal(g["lora_b"][:, keep], want_g["lora_b"][:, keep]), "dlora_b differs from the zero-slot call"
    if routing == "sample" and device == "cpu":
        t, z = c.to(torch.float32), zero.to(torch.float32)
        got = _merged_forward(op, t, backend)
        assert torch.isfinite(got).all(), "the merged path let a zero-gate slot's rank into W_b"
        assert torch.equal(got, _merged_forward(op, z, backend))
        if backend == "blas":  # the per-image merged weights of mor_model.inference
            merged = [torch.ops.mor.blas_merged_weights(u.weight, u.lora_a, u.lora_b, u.idx, u.gate, u.num_shared,
                                                        u.scaling) for u in (t, z)]  # fmt: skip
            assert torch.isfinite(merged[0]).all() and torch.equal(merged[0], merged[1])
