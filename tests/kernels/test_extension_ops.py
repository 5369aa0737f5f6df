"""The raw ``torch.ops.mor.*`` C++ ops: clear errors on bad input (never a crash or an out-of-bounds read),
``torch.library.opcheck`` (schema, fake implementation, dispatch) and a ``torch.compile`` smoke test."""

from __future__ import annotations

import pytest
import torch

from mor_kernels import _extension
from mor_kernels.ops import extension_backend
from mor_kernels.testing import random_case

_C, WHY = _extension.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"the compiled extension is not built here ({WHY})")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a CUDA device"),
        ],
    ),
]


def _lora_args(device="cpu", routing="sample", dtype=torch.float32):
    c = random_case(routing=routing, seed=2).to(dtype, device=device)
    return c, [c.x, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, None]


def _bwd_args(device="cpu", routing="sample"):
    c, args = _lora_args(device, routing)
    y, h = torch.ops.mor.lora_fwd(*args)
    return [torch.randn_like(y), c.x, c.lora_a, c.lora_b, c.idx, c.gate, h, c.num_shared, c.scaling, [True] * 4]


def _conv_parts(c):
    """``(base, z_rank)``: the base convolution (with bias) and the rank convolution, conv_up's inputs."""
    base = torch.nn.functional.conv2d(c.x, c.weight, c.bias, padding=1)
    return base, torch.nn.functional.conv2d(c.x, c.lora_a, padding=1)


# ------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("device", DEVICES)
def test_lora_fwd_bad_inputs(device):
    c, args = _lora_args(device)
    op = torch.ops.mor.lora_fwd

    def call(**changes):
        a = list(args)
        names = ["x", "lora_a", "lora_b", "idx", "gate", "num_shared", "scaling", "base"]
        for k, v in changes.items():
            a[names.index(k)] = v
        return op(*a)

    with pytest.raises(ValueError, match=r"x must have shape \(B, T, d_in\)"):
        call(x=c.x[0])
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        call(x=c.x.double(), lora_a=c.lora_a.double(), lora_b=c.lora_b.double())
    with pytest.raises(ValueError, match=r"lora_a must have shape \(R, 41\)"):
        call(lora_a=c.lora_a[:, :5])
    with pytest.raises(ValueError, match=r"lora_b must have shape \(d_out, 8\)"):
        call(lora_b=c.lora_b[:, :3])
    with pytest.raises(TypeError, match="must have the dtype of x"):
        call(lora_a=c.lora_a.half())
    with pytest.raises(TypeError, match="idx must be int32"):
        call(idx=c.idx.long())
    with pytest.raises(TypeError, match="gate must be float32"):
        call(gate=c.gate.half())
    with pytest.raises(ValueError, match="gate must have the shape of idx"):
        call(gate=c.gate[:, :1])
    with pytest.raises(ValueError, match=r"idx must have shape \(2, k\) for sample routing or \(2, 17, k\)"):
        call(idx=c.idx[:1], gate=c.gate[:1])
    with pytest.raises(ValueError, match=r"num_shared must be in \[0, 8\]"):
        call(num_shared=9)
    with pytest.raises(ValueError, match=r"base must have shape \(2, 17, 33\)"):
        call(base=torch.zeros(2, 17, 32, device=device))
    with pytest.raises(ValueError, match="at least one slot"):
        call(idx=c.idx[:, :0], gate=c.gate[:, :0])
    if device == "cuda":
        with pytest.raises(ValueError, match="all tensors must share a device"):
            call(lora_a=c.lora_a.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_out_of_range_indices_are_zero_slots(device, routing):
    """idx values outside [-1, E) never read out of bounds: the kernels treat them as zero slots."""
    c, args = _lora_args(device, routing)
    bad = c.idx.clone()
    flat = bad.view(-1)
    flat[0], flat[1] = 10_000, -(2**31)
    if flat.numel() > 2:
        flat[2] = 6  # E = 6: one past the last routed rank
    cleaned = torch.where((bad >= 0) & (bad < 6), bad, torch.full_like(bad, -1))
    y_bad, h_bad = torch.ops.mor.lora_fwd(c.x, c.lora_a, c.lora_b, bad, *args[4:])
    y_ok, h_ok = torch.ops.mor.lora_fwd(c.x, c.lora_a, c.lora_b, cleaned, *args[4:])
    assert torch.equal(y_bad, y_ok)
    dy = torch.randn_like(y_ok)
    g_bad = torch.ops.mor.lora_bwd(dy, c.x, c.lora_a, c.lora_b, bad, c.gate, h_bad, c.num_shared, c.scaling, [True] * 4)
    g_ok = torch.ops.mor.lora_bwd(
        dy, c.x, c.lora_a, c.lora_b, cleaned, c.gate, h_ok, c.num_shared, c.scaling, [True] * 4
    )
    for a, b in zip(g_bad, g_ok, strict=True):
        assert torch.equal(a, b)
    if routing == "sample":
        cc = random_case(kernel_size=3, d_in=3, d_out=4, seed=4).to(device=device)
        parts = _conv_parts(cc)
        bad = cc.idx.clone()
        bad[0, 0] = 99
        cleaned = torch.where((bad >= 0) & (bad < 6), bad, torch.full_like(bad, -1))
        assert torch.equal(
            torch.ops.mor.conv_up(*parts, cc.lora_b, bad, cc.gate, cc.num_shared, cc.scaling),
            torch.ops.mor.conv_up(*parts, cc.lora_b, cleaned, cc.gate, cc.num_shared, cc.scaling),
        )
        d = torch.ops.mor.dense_gate(bad, cc.gate, cc.num_shared, 8)
        assert torch.isfinite(d).all()


@pytest.mark.parametrize("device", DEVICES)
def test_lora_bwd_bad_inputs(device):
    args = _bwd_args(device)
    op = torch.ops.mor.lora_bwd
    with pytest.raises(ValueError, match=r"grad_y must have shape \(2, 17, 33\)"):
        op(args[0][:, :3], *args[1:])
    with pytest.raises(ValueError, match=r"h \(the rank activations saved by mor::lora_fwd\) must have shape"):
        op(*args[:6], args[6][..., :2], *args[7:])
    with pytest.raises(TypeError, match="h must be float32"):
        op(*args[:6], args[6].half(), *args[7:])
    with pytest.raises(TypeError, match="grad_y has dtype"):
        op(args[0].half(), *args[1:])
    with pytest.raises(ValueError, match=r"num_shared must be in \[0, 8\], got 9"):
        op(*args[:7], 9, *args[8:])


@pytest.mark.parametrize("device", DEVICES)
def test_route_bad_inputs(device):
    op = torch.ops.mor.route
    logits = torch.randn(3, 6, device=device)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 6\], got 0"):
        op(logits, 0, 2, True)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 6\], got 7"):
        op(logits, 7, 2, True)
    with pytest.raises(ValueError, match=r"num_zero must be in \[0, 5\], got 6"):
        op(logits, 2, 6, True)
    with pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
        op(logits.double(), 2, 2, True)
    with pytest.raises(ValueError, match="at least one slot"):
        op(logits[:, :0], 1, 0, True)


@pytest.mark.parametrize("device", DEVICES)
def test_route_non_finite_logits_stay_in_range(device):
    logits = torch.tensor([[float("nan")] * 5, [float("inf"), 0, 1, float("inf"), 2]], device=device)
    idx, gate, probs, slots = torch.ops.mor.route(logits, 3, 1, True)
    assert ((idx >= -1) & (idx < 4)).all()
    assert ((slots >= 0) & (slots < 5)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_conv_up_bad_inputs(device):
    c = random_case(kernel_size=3, d_in=3, d_out=4, seed=4).to(device=device)
    base, z_rank = _conv_parts(c)
    op = torch.ops.mor.conv_up
    with pytest.raises(ValueError, match=r"z_rank must have shape \(2, 3, 5, 7\), got \[2, 8, 5, 7\]"):
        op(base, z_rank, c.lora_b[:, :3], c.idx, c.gate, c.num_shared, c.scaling)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(4, R\)"):
        op(base, z_rank, c.lora_b[:3], c.idx, c.gate, c.num_shared, c.scaling)
    with pytest.raises(ValueError, match=r"base must have shape \(B, C_out, H, W\)"):
        op(base[0], z_rank, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    with pytest.raises(ValueError, match=r"idx must have shape \(2, k\) for sample routing, got"):
        op(base, z_rank, c.lora_b, c.idx[None], c.gate[None], c.num_shared, c.scaling)
    with pytest.raises(TypeError, match="idx must be int32"):
        op(base, z_rank, c.lora_b, c.idx.long(), c.gate, c.num_shared, c.scaling)
    with pytest.raises(TypeError, match="gate must be float32"):
        op(base, z_rank, c.lora_b, c.idx, c.gate.half(), c.num_shared, c.scaling)
    with pytest.raises(TypeError, match="lora_b and z_rank must have the dtype of base"):
        op(base, z_rank, c.lora_b.half(), c.idx, c.gate, c.num_shared, c.scaling)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_gate_bad_inputs(device):
    c = random_case(seed=5).to(device=device)
    op = torch.ops.mor.dense_gate
    with pytest.raises(TypeError, match="idx must be int32"):
        op(c.idx.long(), c.gate, 2, 8)
    with pytest.raises(TypeError, match="gate must be float32"):
        op(c.idx, c.gate.double(), 2, 8)
    with pytest.raises(ValueError, match=r"gate must have the shape of idx"):
        op(c.idx, c.gate[:, :1], 2, 8)
    with pytest.raises(ValueError, match=r"num_shared must be in \[0, 8\], got 9"):
        op(c.idx, c.gate, 9, 8)
    with pytest.raises(ValueError, match=r"num_ranks must be >= 1"):
        op(c.idx, c.gate, 0, 0)


# ------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_cases(device):
    c, args = _lora_args(device)
    ct, args_t = _lora_args(device, "token", torch.float16)
    base = torch.randn(2, 17, 33, device=device)
    conv = random_case(kernel_size=3, d_in=3, d_out=4, seed=4).to(device=device)
    return {
        "dense_gate": (torch.ops.mor.dense_gate.default, (c.idx, c.gate, c.num_shared, 8)),
        "route": (torch.ops.mor.route.default, (torch.randn(4, 3, 9, device=device), 3, 2, True)),
        "lora_fwd": (torch.ops.mor.lora_fwd.default, tuple(args)),
        "lora_fwd_base": (torch.ops.mor.lora_fwd.default, tuple(args[:-1]) + (base,)),
        "lora_fwd_token_fp16": (torch.ops.mor.lora_fwd.default, tuple(args_t)),
        "lora_fwd_no_h": (torch.ops.mor.lora_fwd.default, tuple(args) + (False,)),
        "lora_bwd": (torch.ops.mor.lora_bwd.default, tuple(_bwd_args(device))),
        "lora_bwd_masked": (
            torch.ops.mor.lora_bwd.default,
            tuple(_bwd_args(device, "token")[:-1]) + ([True, False, True, False],),
        ),
        "conv_up": (torch.ops.mor.conv_up.default, (*_conv_parts(conv), conv.lora_b, conv.idx, conv.gate, 2, 0.5)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name",
    [
        "dense_gate",
        "route",
        "lora_fwd",
        "lora_fwd_base",
        "lora_fwd_token_fp16",
        "lora_fwd_no_h",
        "lora_bwd",
        "lora_bwd_masked",
        "conv_up",
    ],
)
def test_opcheck(name, device):
    op, args = _opcheck_cases(device)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """The backend's functions trace without graph breaks (fake implementations + autograd.Function)."""
    from mor_kernels.ops import extension_backend as eb

    torch._dynamo.reset()
    c = random_case(routing="token", seed=9).to(torch.float32, device=device, requires_grad=True)
    logits = torch.randn(2, 17, 8, device=device)

    def f(x, w, b, a, bb, logits):
        idx, gate, probs = eb.route(logits, 3, 2, True)
        y = eb.mor_linear(x, w, b, a, bb, idx, gate, 2, 0.75)
        return y, probs

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, probs = compiled(c.x, c.weight, c.bias, c.lora_a, c.lora_b, logits)
    y_eager, probs_eager = f(c.x, c.weight, c.bias, c.lora_a, c.lora_b, logits)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(probs, probs_eager)
    y.sum().backward()
    assert c.x.grad is not None and c.lora_a.grad is not None and c.weight.grad is not None


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_batches_beyond_the_grid_limit_run_in_chunks(op, monkeypatch):
    """The CUDA launches take at most 65535 samples (gridDim.y); larger batches are split. Checked on
    the CPU twin with a small limit: chunked == unchunked, forward and gradients."""
    import mor_kernels

    kw = dict(kernel_size=3, conv={"padding": 1}, d_in=4, d_out=6) if op == "conv" else {}
    case = random_case(batch=5, seed=21, **kw)

    def run():
        c = case.to(torch.float32, requires_grad=True)
        args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
        if op == "conv":
            y = mor_kernels.mor_conv2d(*args, padding=1, backend="cpp")
        else:
            y = mor_kernels.mor_linear(*args, backend="cpp")
        grads = torch.autograd.grad(y, list(c.tensors().values()), torch.ones_like(y))
        return (y, *grads)

    whole = run()
    monkeypatch.setattr(extension_backend, "MAX_BATCH", 2)
    chunked = run()
    names = ["y", *case.tensors()]
    for name, a, b in zip(names, chunked, whole, strict=True):
        if name in ("y", "x", "gate"):  # per sample: the same arithmetic
            assert torch.equal(a, b), name
        else:  # sums over the batch: summed chunk by chunk
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_arch_list_decides_which_gpus_have_code():
    runs_on = extension_backend.runs_on
    assert runs_on("8.0;9.0+PTX", (8, 0)) and runs_on("8.0;9.0+PTX", (8, 9))  # sm_80 cubins run on 8.x
    assert runs_on("8.0;9.0+PTX", (9, 0)) and runs_on("8.0;9.0+PTX", (12, 0))  # PTX for newer GPUs
    assert not runs_on("8.0;9.0+PTX", (7, 5)) and not runs_on("9.0", (10, 0)) and not runs_on("9.0", (8, 6))


def test_cudnn_settings_are_skipped_only_when_they_would_change_nothing():
    """A 16-bit forward convolution outside autocast needs no settings (no context: ~6 us of Python saved per
    MoR conv call); float32 (TF32 off), a deterministic backward or an active autocast still get theirs."""
    import contextlib

    from mor_kernels.ops import cudnn_conv

    cpu = torch.device("cpu")
    assert isinstance(cudnn_conv.cudnn_settings(torch.bfloat16, cpu, deterministic=False), contextlib.nullcontext)
    for dtype, deterministic in ((torch.float32, False), (torch.float16, True)):
        ctx = cudnn_conv.cudnn_settings(dtype, cpu, deterministic=deterministic)
        assert not isinstance(ctx, contextlib.nullcontext), (dtype, deterministic)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cudnn_conv.cudnn_settings(torch.bfloat16, cpu, deterministic=False):
            assert not torch.is_autocast_enabled("cpu")  # the operands are cast already
        assert torch.is_autocast_enabled("cpu")


def test_conv_runs_with_tf32_off_and_a_deterministic_backward(monkeypatch):
    """The compiled backends' convolution goes through mor_kernels.ops.cudnn_conv: on a GPU, float32
    convolutions would otherwise run in TF32 (PyTorch's cuDNN default), outside the float32 tolerance.
    Checked here by reading the cuDNN settings at each convolution call (the CPU twin shares the code)."""
    import mor_kernels
    from mor_kernels.ops import cudnn_conv

    get_tf32, _ = cudnn_conv._conv_tf32_flag()
    seen = []

    def spy(kind, fn):
        def wrapped(*args, **kwargs):
            seen.append((kind, get_tf32(), torch.backends.cudnn.deterministic))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(cudnn_conv.F, "conv2d", spy("forward", cudnn_conv.F.conv2d))
    monkeypatch.setattr(cudnn_conv, "conv2d_input", spy("input", cudnn_conv.conv2d_input))
    monkeypatch.setattr(cudnn_conv, "conv2d_weight", spy("weight", cudnn_conv.conv2d_weight))
    before = (get_tf32(), torch.backends.cudnn.deterministic)
    c = random_case(kernel_size=3, conv={"padding": 1}, seed=23).to(torch.float32, requires_grad=True)
    y = mor_kernels.mor_conv2d(
        c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, padding=1, backend="cpp"
    )
    torch.autograd.grad(y, [c.x, c.weight, c.bias, c.lora_a], torch.ones_like(y))
    # the base and the rank convolutions (no [W0; A] weight), then the input and weight gradients of each
    kinds = [kind for kind, *_ in seen]
    assert kinds[:2] == ["forward", "forward"] and sorted(kinds[2:]) == ["input", "input", "weight", "weight"]
    assert all(tf32 == "ieee" for _, tf32, _ in seen)
    assert [det for *_, det in seen] == [False, False, True, True, True, True]
    assert (get_tf32(), torch.backends.cudnn.deterministic) == before
