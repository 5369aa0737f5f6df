"""The Triton backend's torch.library custom ops (opcheck), torch.compile(fullgraph=True), and the
dispatcher's view of the backend (float64 unsupported). Runs under ``TRITON_INTERPRET=1`` on CPU."""

import pytest
import torch
from triton_env import DEVICE, INTERPRETED, skip_if_triton_imported_too_late

import mor_kernels
from mor_kernels import dispatch
from mor_kernels import reference as ref_ops
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
        h, u = lora_ops.triton_lora_shrink(x, a, idx, gate, s, 0.5, True)
        dy = _r(*x.shape[:2], bb.shape[0], seed=8)
        du, _, _ = lora_ops.triton_lora_bwd_dh(dy, bb, u, idx, gate, s, 0.5, False)
        cases += [
            (f"shrink-{tag}", lora_ops.triton_lora_shrink, (x, a, idx, gate, s, 0.5, True)),
            (f"expand-linear-{tag}", lora_ops.triton_lora_expand, (x, w, bias, bb, h, idx, None, s)),
            (f"expand-lora-{tag}", lora_ops.triton_lora_expand, (x, None, None, bb, h, idx, dy, s)),
            (f"bwd_dh-{tag}", lora_ops.triton_lora_bwd_dh, (dy, bb, u, idx, gate, s, 0.5, True)),
            (f"bwd_dx-{tag}", lora_ops.triton_lora_bwd_dx, (du, a, idx, s, dy, w)),
            (f"rank_grad-{tag}", lora_ops.triton_lora_rank_grad, (du, x, idx, s, 6)),
        ]
    z = _r(2, 18 + 6, 3, 4, seed=9)
    _, _, bias, _, bb, idx, gate, s = _lora_inputs(False)
    cases.append(("conv_up", conv_ops.triton_conv_up, (z, bb, bias, idx, gate, s, 0.5, True)))
    z_cl = z.to(memory_format=torch.channels_last)
    cases.append(("conv_up-channels_last", conv_ops.triton_conv_up, (z_cl, bb, None, idx, gate, s, 0.5, False)))
    return cases


_CASES = _op_cases()


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def test_ops_are_registered_in_the_mor_namespace():
    names = {"triton_route", "triton_lora_shrink", "triton_lora_expand", "triton_lora_bwd_dh", "triton_lora_bwd_dx",
             "triton_lora_rank_grad", "triton_conv_up"}  # fmt: skip
    for name in names:
        assert hasattr(torch.ops.mor, name), name


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
