"""The Triton backend's torch.library custom ops (opcheck), torch.compile(fullgraph=True), and the
dispatcher's view of the backend (float64 unsupported). Runs under ``TRITON_INTERPRET=1`` on CPU."""

import pytest
import torch
from triton_env import DEVICE, INTERPRETED, skip_if_triton_imported_too_late

# isort: split
# (triton after triton_env, which switches the interpreter on before triton's first import)
import triton
import triton.language as tl

import mor_kernels
from mor_kernels import dispatch
from mor_kernels import reference as ref_ops
from mor_kernels.kernels.mor_lora import _dot
from mor_kernels.ops import cudnn_conv
from mor_kernels.ops import triton_mor_conv2d as conv_ops
from mor_kernels.ops import triton_mor_lora as lora_ops
from mor_kernels.ops import triton_route as route_ops
from mor_kernels.testing import assert_parity, random_case

skip_if_triton_imported_too_late()


def _r(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def _lora_inputs(token: bool):
    b, t, d_in, d_out, s, k = 2, 5, 20, 18, 2, 3
    x, w, bias = _r(b, t, d_in, seed=1), _r(d_out, d_in, seed=2), _r(d_out, seed=3)
    a, bb = _r(6, d_in, seed=4), _r(d_out, 6, seed=5)
    shape = (b, t, k) if token else (b, k)
    idx = torch.tensor([0, -1, 3], dtype=torch.int32).repeat(*shape[:-1], 1).to(DEVICE)
    gate = _r(*shape, seed=6).abs()
    return x, w, bias, a, bb, idx, gate, s


def _op_cases():
    cases = [("route", route_ops.triton_route, (_r(4, 6, seed=7), 2, 1, True))]
    for token in (False, True):
        x, w, bias, a, bb, idx, gate, s = _lora_inputs(token)
        tag = "token" if token else "sample"
        _, u = lora_ops.triton_lora_fwd(x, w, bias, a, bb, idx, gate, None, s, 0.5, True)
        dy = _r(*x.shape[:2], bb.shape[0], seed=8)
        all4, no_a = [True] * 4, [True, False, True, True]
        cases += [
            (f"fwd-linear-{tag}", lora_ops.triton_lora_fwd, (x, w, bias, a, bb, idx, gate, None, s, 0.5, True)),
            (f"fwd-linear-infer-{tag}", lora_ops.triton_lora_fwd, (x, w, None, a, bb, idx, gate, None, s, 0.5, False)),
            (f"fwd-lora-base-{tag}", lora_ops.triton_lora_fwd, (x, None, None, a, bb, idx, gate, dy, s, 0.5, True)),
            (f"fwd-lora-{tag}", lora_ops.triton_lora_fwd, (x, None, None, a, bb, idx, gate, None, s, 0.5, False)),
            (f"bwd-linear-{tag}", lora_ops.triton_lora_bwd, (dy, x, w, a, bb, u, idx, gate, s, 0.5, all4)),
            (f"bwd-lora-{tag}", lora_ops.triton_lora_bwd, (dy, x, None, a, bb, u, idx, gate, s, 0.5, no_a)),
        ]
    _, _, bias, _, bb, idx, gate, s = _lora_inputs(False)
    x4, w4, a4 = _r(2, 20, 6, 5, seed=9), _r(18, 20, 3, 3, seed=17), _r(6, 20, 3, 3, seed=18)
    conv = ([2, 1], [1, 0], [1, 2])
    y4, z_rank = conv_ops.triton_conv2d(x4, w4, bias, a4, bb, idx, gate, s, 0.5, *conv)
    dy4 = _r(*y4.shape, seed=19)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, tag = x4.contiguous(memory_format=fmt), "channels_last" if fmt == torch.channels_last else "nchw"
        cases += [
            (f"conv-{tag}", conv_ops.triton_conv2d, (xf, w4, bias, a4, bb, idx, gate, s, 0.5, *conv)),
            (f"conv_bwd-{tag}", conv_ops.triton_conv2d_bwd,
             (dy4.contiguous(memory_format=fmt), xf, w4, a4, bb, z_rank, idx, gate, s, 0.5, *conv, [True] * 5)),
        ]  # fmt: skip
    x, w = _r(2, 3, 6, 5, seed=10), _r(7, 3, 3, 3, seed=11)
    conv = ([2, 1], [1, 0], [1, 2])
    dz = _r(2, 7, *torch.nn.functional.conv2d(x, w, None, *conv).shape[2:], seed=12)
    cases += [
        ("conv2d", cudnn_conv.conv2d_op, (x, w, *conv)),
        ("conv2d_input", cudnn_conv.conv2d_input_op, (x, w, dz, *conv)),
        ("conv2d_weight", cudnn_conv.conv2d_weight_op, (x, w, dz, *conv)),
    ]
    return cases


_CASES = _op_cases()


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def test_ops_are_registered_in_the_mor_namespace():
    names = {"triton_route", "triton_lora_fwd", "triton_lora_bwd", "triton_conv2d", "triton_conv2d_bwd", "conv2d",
             "conv2d_input", "conv2d_weight"}  # fmt: skip
    for name in names:
        assert hasattr(torch.ops.mor, name), name
    # the former two-launch forward, the three-launch backward and the [W0; A] conv epilogue
    for gone in ("triton_lora_shrink", "triton_lora_expand", "triton_lora_bwd_dh", "triton_lora_bwd_dx",
                 "triton_lora_rank_grad", "triton_conv_up"):  # fmt: skip
        assert not hasattr(torch.ops.mor, gone), gone


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_mor_linear_compiles_fullgraph_with_backward(routing):
    c = random_case(routing=routing, tokens=9, seed=21).to(torch.float32, device=DEVICE, requires_grad=True)

    def fn(x, w, b, a, bb, i, g):
        return mor_kernels.mor_linear(x, w, b, a, bb, i, g, c.num_shared, c.scaling, backend="triton")

    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*args)
    want = ref_ops.mor_linear(*[t.detach().double() if t.is_floating_point() else t for t in args], 2, c.scaling)
    assert_parity(got, want, dtype=torch.float32)
    got.sum().backward()
    assert c.x.grad is not None and c.lora_a.grad is not None and c.gate.grad is not None


def test_route_and_mor_conv2d_compile_fullgraph():
    c = random_case(kernel_size=3, d_in=4, d_out=5, seed=22)
    logits = torch.randn(c.x.shape[0], 8)

    def fn(x, w, b, a, bb, logits):
        idx, gate, _ = mor_kernels.route(logits, 3, 2, backend="triton")
        return mor_kernels.mor_conv2d(x, w, b, a, bb, idx, gate, c.num_shared, c.scaling, 1, 1, 1, backend="triton")

    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, logits)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(*args)
    torch.testing.assert_close(got, fn(*args), rtol=1e-5, atol=1e-5)
    # and the backward through the compiled graph, into the router logits as well
    leaves = [t.detach().clone().requires_grad_(True) for t in (c.x, c.lora_a, c.lora_b, logits)]
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(leaves[0], c.weight, c.bias, leaves[1], leaves[2], leaves[3])
    eager_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    eager = fn(eager_leaves[0], c.weight, c.bias, eager_leaves[1], eager_leaves[2], eager_leaves[3])
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(out, leaves, dy)
    want_grads = torch.autograd.grad(eager, eager_leaves, dy)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_conv_ops_match_torch_and_count_flops():
    """The convolution custom ops compute what torch's do, and the FLOP counter sees them as it sees
    aten's convolutions (formulas registered with the ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w = _r(2, 3, 6, 5, seed=13), _r(7, 3, 3, 3, seed=14)
    conv = ([1, 1], [1, 1], [1, 1])
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as want_count:
        z = torch.nn.functional.conv2d(xr, wr, None, *conv)
        dz = torch.ones_like(z)
        want_dx, want_dw = torch.autograd.grad(z, [xr, wr], dz)
    with FlopCounterMode(display=False) as got_count:
        got_z = cudnn_conv.conv2d_op(x, w, *conv)
        got_dx = cudnn_conv.conv2d_input_op(x, w, dz, *conv)
        got_dw = cudnn_conv.conv2d_weight_op(x, w, dz, *conv)
    for got, want in ((got_z, z), (got_dx, want_dx), (got_dw, want_dw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_count.get_total_flops() == want_count.get_total_flops() > 0


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    acc = _dot(a, b, tl.zeros((16, 16), dtype=tl.float32))
    tl.store(out_ptr + r[:, None] * 16 + r[None, :], acc)


def _profiled_names(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("kind", ["linear-sample", "linear-token", "conv3x3", "conv1x1"])
def test_eager_inference_launches_directly_and_matches_the_custom_op(kind):
    """Without a backward to record (no_grad), eager calls launch the kernels without their custom op and
    autograd Function (host time per layer on a GPU); with one, the custom op runs. Same results either way."""
    if kind.startswith("linear"):
        c = random_case(routing=kind.split("-")[1], seed=4).to(torch.float32, device=DEVICE)
        op_name = "mor::triton_lora_fwd"

        def call():
            return mor_kernels.mor_linear(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared,
                                          c.scaling, backend="triton", check_indices=False)  # fmt: skip
    else:
        k = 3 if kind == "conv3x3" else 1
        c = random_case(kernel_size=k, conv={"padding": k // 2}, d_in=5, d_out=7, seed=4)
        c = c.to(torch.float32, device=DEVICE)
        op_name = "mor::triton_conv2d" if k == 3 else "mor::triton_lora_fwd"

        def call():
            return mor_kernels.mor_conv2d(c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared,
                                          c.scaling, padding=k // 2, backend="triton", check_indices=False)  # fmt: skip

    with torch.no_grad():
        y, names = _profiled_names(call)
    assert op_name not in names
    c.x.requires_grad_(True)
    y_op, names = _profiled_names(call)
    assert op_name in names
    assert torch.equal(y, y_op.detach())


@pytest.mark.parametrize("prepared", [True, False], ids=["per_image_state", "per_call"])
def test_model_layers_launch_directly_in_inference(prepared):
    """Inside a model the operands are nn.Parameter (the base weights, float32 adapters): the direct launch must
    take them as it takes plain tensors (it did not, and every layer call of a MoR model went through the
    custom op), through the per-image state and per call alike. With a backward to record, the custom op runs;
    the outputs agree."""
    from torch import nn

    import mor_model

    torch.manual_seed(0)
    root = nn.Module()
    root.lin, root.conv = nn.Linear(8, 6), nn.Conv2d(4, 5, 3, padding=1)
    cfg = mor_model.MoRConfig(target_modules=("lin", "conv"), num_shared=2, num_routed=4, num_zero=1, top_k=2,
                              backend="triton")  # fmt: skip
    mor_model.inject_mor(root.to(DEVICE), cfg)
    for layer in mor_model.mor_layers(root).values():
        nn.init.normal_(layer.lora_b, std=0.1)
    scores = torch.rand(2, cfg.num_degradation_dims, device=DEVICE)
    x, xc = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 4, 5, 5, device=DEVICE)
    if prepared:
        mor_model.set_degradation(root, scores)
    else:  # the routers' scores alone: no per-image state, each call routes and calls the public op
        for layer in mor_model.mor_layers(root).values():
            layer.router.set_degradation(scores)

    def call():
        return root.lin(x), root.conv(xc)

    with torch.no_grad():
        call()  # the per-image state's first call checks the arguments through the public op
        (y, yc), names = _profiled_names(call)
    assert not {"mor::triton_lora_fwd", "mor::triton_conv2d"} & names, sorted(n for n in names if "mor::" in n)
    assert isinstance(root.lin.lora_a, nn.Parameter) and isinstance(root.lin.base_layer.weight, nn.Parameter)
    for layer in (root.lin, root.conv):
        assert ("routing prepared per image" in layer.explain()) == prepared, layer.explain()
    mor_model.set_degradation(root, None)
    x.requires_grad_(True)
    xc.requires_grad_(True)
    with mor_model.degradation(root, scores):
        (y_op, yc_op), names = _profiled_names(call)
    assert "mor::triton_lora_fwd" in names and "mor::triton_conv2d" in names
    torch.testing.assert_close(y, y_op.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(yc, yc_op.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_prepared_entry_points_match_the_public_ops(kind):
    """``mor_linear_prepared``/``mor_conv2d_prepared`` (mor_model.inference's calls after an image's first, via
    ``dispatch.prepared_implementation``) give exactly what the backend's public functions give, launching the
    kernels directly; under a dispatch mode they take the public path (the custom op runs)."""
    from mor_kernels.ops import triton_backend

    assert dispatch.prepared_implementation("mor_linear", "triton", torch.device(DEVICE)) is (
        triton_backend.mor_linear_prepared
    )
    assert dispatch.prepared_implementation("mor_linear", "reference", torch.device(DEVICE)) is (
        dispatch.implementation("mor_linear", "reference", torch.device(DEVICE))
    )
    if kind == "linear":
        c = random_case(routing="sample", seed=6).to(torch.float32, device=DEVICE)
        args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx.int(), c.gate, c.num_shared, float(c.scaling))
        prepared, public, op_name = (
            triton_backend.mor_linear_prepared,
            triton_backend.mor_linear,
            "mor::triton_lora_fwd",
        )
    else:
        k = 3 if kind == "conv3x3" else 1
        c = random_case(kernel_size=k, conv={"padding": k // 2}, d_in=5, d_out=7, seed=6).to(
            torch.float32, device=DEVICE
        )
        conv = ((1, 1), (k // 2, k // 2), (1, 1))
        args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx.int(), c.gate, c.num_shared, float(c.scaling), *conv)
        prepared, public = triton_backend.mor_conv2d_prepared, triton_backend.mor_conv2d
        op_name = "mor::triton_conv2d" if k == 3 else "mor::triton_lora_fwd"
    with torch.no_grad():
        y, names = _profiled_names(lambda: prepared(*args))
        assert op_name not in names
        assert torch.equal(y, public(*args))
        with torch.utils.flop_counter.FlopCounterMode(display=False):  # a dispatch mode: the custom op
            y_mode, names = _profiled_names(lambda: prepared(*args))
    assert op_name in names and torch.equal(y_mode, y)


def test_dot_refuses_mixed_dtypes():
    """The interpreter widens bf16 dot operands to float32 (its bf16 tl.dot is wrong); it must not
    thereby accept a bf16 x float32 dot, which a compiled kernel rejects."""
    a, b = _r(16, 16, seed=15), _r(16, 16, seed=16)
    out = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a.bfloat16(), b.bfloat16(), out)
    torch.testing.assert_close(out, a.bfloat16().float() @ b.bfloat16().float(), rtol=1e-5, atol=1e-5)
    for left, right in ((a.bfloat16(), b), (a, b.bfloat16()), (a.half(), b)):
        with pytest.raises(Exception, match="same dtype"):
            _dot_kernel[(1,)](left, right, out)


def test_float64_is_unavailable_and_auto_skips_it():
    c = random_case(seed=23).to(torch.float64)
    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    with pytest.raises(dispatch.BackendUnavailableError, match="float64"):
        mor_kernels.mor_linear(*args, backend="triton")
    assert dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float64).backend != "triton"
    assert "triton" in dispatch.available_backends("cpu", "mor_linear", torch.float32)


def test_bad_input_raises_before_any_kernel():
    c = random_case(seed=24)
    with pytest.raises(ValueError, match="lora_b"):
        mor_kernels.mor_linear(c.x, c.weight, c.bias, c.lora_a, c.lora_b[:, :-1], c.idx, c.gate, 2, 1.0,
                               backend="triton")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, not the interpreter")
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_forward_captures_in_a_cuda_graph(routing):
    """No host synchronisation and a routing-independent grid: the forward replays in a CUDA graph,
    and new routing data copied into the captured inputs changes the result as it should."""
    c = random_case(routing=routing, tokens=64, d_in=64, d_out=96, seed=25).to(torch.float16, device="cuda")
    args = [c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx.to(torch.int32), c.gate]

    def fn():
        return mor_kernels.mor_linear(*args, c.num_shared, c.scaling, backend="triton")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    other = random_case(routing=routing, tokens=64, d_in=64, d_out=96, seed=26)
    args[5].copy_(other.idx.to(torch.int32))
    args[6].copy_(other.gate)
    graph.replay()
    torch.cuda.synchronize()
    want = ref_ops.mor_linear(*[a.double() if a.is_floating_point() else a for a in args], c.num_shared, c.scaling)
    assert_parity(out, want, dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, not the interpreter")
def test_split_k_forward_replays_in_a_cuda_graph():
    """A forward the tile table splits (64 tokens x 1280 channels, batch 1): its workspace and tile counts are
    set up outside the capture and the counts return to zero after each launch, so the graph replays again and
    again with new routing and gives the eager result."""
    from mor_kernels.kernels.mor_lora_tiles import fwd_config

    assert fwd_config(torch.device("cuda"), torch.bfloat16, 1, 64, 1280, 1280, 16)["SPLIT_K"] > 1
    c = random_case(batch=1, tokens=64, d_in=1280, d_out=1280, num_shared=8, num_routed=32, num_zero=4, top_k=8,
                    seed=30).to(torch.bfloat16, device="cuda")  # fmt: skip
    args = [c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx.to(torch.int32), c.gate]

    def fn():
        return mor_kernels.mor_linear(*args, c.num_shared, c.scaling, backend="triton", check_indices=False)

    graph, out = _capture(fn)
    for seed in (31, 32, 33):
        other = random_case(batch=1, tokens=64, d_in=1280, d_out=1280, num_shared=8, num_routed=32, num_zero=4,
                            top_k=8, seed=seed)  # fmt: skip
        args[5].copy_(other.idx.to(torch.int32))
        args[6].copy_(other.gate)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn())


def _capture(fn):
    """``fn()`` captured in a CUDA graph after a warm-up run on a side stream (the kernels compile
    there, outside the capture): ``(graph, output)``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, not the interpreter")
def test_route_captures_in_a_cuda_graph():
    """One launch, no host synchronisation: route replays in a CUDA graph on new logits."""
    logits = torch.randn(64, 36, device="cuda")
    graph, (idx, gate, probs) = _capture(lambda: mor_kernels.route(logits, 8, 4, backend="triton"))
    new = torch.randn(64, 36, generator=torch.Generator().manual_seed(27)).cuda()
    logits.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    r_idx, r_gate, r_probs = ref_ops.route(new.double(), 8, 4)
    assert torch.equal(idx.cpu(), r_idx.cpu())
    assert_parity(gate, r_gate, dtype=torch.float32, name="gate")
    assert_parity(probs, r_probs, dtype=torch.float32, name="probs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device, not the interpreter")
def test_conv_forward_captures_in_a_cuda_graph():
    """The fused conv forward (cuDNN conv + conv_up, fixed grid) replays in a CUDA graph, and new
    routing copied into the captured inputs changes the result as it should."""
    c = random_case(kernel_size=3, conv={"padding": 1}, d_in=16, d_out=32, height=8, width=8, seed=28)
    c = c.to(torch.float16, device="cuda")
    args = [c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx.to(torch.int32), c.gate]

    def fn():
        return mor_kernels.mor_conv2d(*args, c.num_shared, c.scaling, padding=1, backend="triton")

    graph, out = _capture(fn)
    other = random_case(kernel_size=3, conv={"padding": 1}, d_in=16, d_out=32, height=8, width=8, seed=29)
    args[5].copy_(other.idx.to(torch.int32))
    args[6].copy_(other.gate)
    graph.replay()
    torch.cuda.synchronize()
    want = ref_ops.mor_conv2d(*[a.double() if a.is_floating_point() else a for a in args], c.num_shared, c.scaling,
                              padding=1)  # fmt: skip
    assert_parity(out, want, dtype=torch.float16)
