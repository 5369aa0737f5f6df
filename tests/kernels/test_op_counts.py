"""What one call of each MoR op costs in launches, aten ops and allocations, counted on the CPU (the Triton
kernels under the interpreter; see counting.py), so that the fusion does not depend on a GPU to be checked:

- Triton ``mor_linear``/``mor_lora`` forward: one launch, nothing allocated but ``y`` (and ``u`` when a backward
  will run), split-K included (its workspace is kept per stream);
- Triton backward: two launches at any shape (plus a torch matmul / sum for a trained base weight / bias);
- convolution forward: nothing weight-sized allocated, on every backend; the Triton 1x1 convolution is the
  linear kernel's one launch;
- Triton conv backward: three launches and four cuDNN calls (five for 16-bit inputs: the ``dA`` halves).
"""

import pytest
import torch
from counting import counting, nbytes
from triton_env import DEVICE, skip_if_triton_imported_too_late

import mor_kernels
from mor_kernels import dispatch
from mor_kernels.testing import random_case

skip_if_triton_imported_too_late()
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="counts the CPU profile (interpreter and CPU backends)")


def _linear(c, backend="triton", **kw):
    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    return mor_kernels.mor_linear(*args, backend=backend, check_indices=False, **kw)


def _conv(c, backend="triton", padding=1):
    args = (c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling)
    return mor_kernels.mor_conv2d(*args, padding=padding, backend=backend, check_indices=False)


def _rp(c):
    from mor_kernels.kernels.mor_lora_tiles import padded_ranks

    return padded_ranks(c.lora_a.shape[0], c.num_shared, c.idx.shape[-1], c.idx.dim() == 3)


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_triton_linear_forward_is_one_launch_allocating_only_its_outputs(routing):
    c = random_case(routing=routing, tokens=40, d_out=150, seed=1).to(torch.float32, requires_grad=True)
    with torch.no_grad(), counting() as n:
        y = _linear(c)
    assert n.launches == ["_fwd_kernel"] and n.ops == []
    assert n.allocations == nbytes(y)  # inference: y only, no u
    with counting() as n:
        y = _linear(c)
    assert n.launches == ["_fwd_kernel"] and n.ops == []
    assert n.allocations == nbytes(y) + [y.shape[0] * y.shape[1] * _rp(c) * 4]  # + u, float32 (B, T, RP)
    base = torch.randn(y.shape)
    with torch.no_grad(), counting() as n:
        out = mor_kernels.mor_lora(
            c.x, c.lora_a, c.lora_b, c.idx, c.gate, 2, 0.75, base=base, backend="triton", check_indices=False
        )
    assert n.launches == ["_fwd_kernel"] and n.ops == [] and n.allocations == nbytes(out)


def test_split_k_forward_allocates_its_workspace_once(monkeypatch):
    """With split-K (a GPU tile config, forced here) the partials go to a workspace kept per stream: the
    first launch may allocate it, later ones allocate only y."""
    from mor_kernels.kernels import mor_lora

    monkeypatch.setattr(
        mor_lora,
        "fwd_config",
        lambda *a: dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, SPLIT_K=4, num_warps=4, num_stages=2),
    )
    c = random_case(tokens=40, d_in=70, d_out=150, seed=2)
    with torch.no_grad():
        _linear(c)
        with counting() as n:
            y = _linear(c)
    assert n.launches == ["_fwd_kernel"] and n.ops == [] and n.allocations == nbytes(y)


@pytest.mark.parametrize("routing", ["sample", "token"])
@pytest.mark.parametrize("trained_base", [False, True])
def test_triton_linear_backward_is_two_launches(routing, trained_base):
    c = random_case(routing=routing, tokens=40, d_out=150, seed=3).to(torch.float32, requires_grad=True)
    c.weight.requires_grad_(trained_base)
    c.bias.requires_grad_(trained_base)
    y = _linear(c)
    leaves = [c.x, c.lora_a, c.lora_b, c.gate] + ([c.weight, c.bias] if trained_base else [])
    with counting(within="Backward") as n:
        grads = torch.autograd.grad(y, leaves, torch.randn(y.shape))
    assert n.launches == ["_bwd_kernel", "_bwd_reduce_kernel"]
    assert n.ops == (["aten::matmul", "aten::sum"] if trained_base else [])
    # the four gradients of the low-rank path, dA/dB partials (B, n_m, RP, d_in + d_out) and, under sample
    # routing, the gate partials (B, n_m, RP); the dW matmul's and bias sum's own outputs when trained
    n_m, rp = -(-40 // 32), _rp(c)
    scratch = [2 * n_m * rp * (41 + 150) * 4] + ([2 * n_m * rp * 4] if routing == "sample" else [])
    assert sorted(n.allocations) == sorted(nbytes(*grads) + scratch)


def test_triton_backward_launch_count_does_not_grow_with_the_shape():
    """The same two launches at a shape with several token blocks, d_in tiles, samples and dA/dB columns."""
    c = random_case(batch=3, tokens=130, d_in=150, d_out=70, seed=4).to(torch.float32, requires_grad=True)
    y = _linear(c)
    with counting(within="Backward") as n:
        torch.autograd.grad(y, [c.x, c.lora_a, c.lora_b, c.gate, c.weight, c.bias], torch.randn(y.shape))
    assert n.launches == ["_bwd_kernel", "_bwd_reduce_kernel"] and n.ops == ["aten::matmul", "aten::sum"]


def _conv_backends():
    out = []
    for name in dispatch.BACKENDS:
        why = dispatch.unavailable_reason(name, "mor_conv2d", torch.device("cpu"))
        out.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


@pytest.mark.parametrize("backend", _conv_backends())
def test_conv_forward_allocates_nothing_weight_sized(backend):
    """A 3x3 convolution whose weight is far larger than its activations: no allocation of the call is as
    large as the weight (no [W0; A] concatenation, no merged weight), on every backend."""
    c = random_case(kernel_size=3, conv={"padding": 1}, batch=1, d_in=48, d_out=64, height=4, width=4, seed=5)
    weight_bytes = nbytes(c.weight)[0]
    with torch.no_grad(), counting() as n:
        y = _conv(c, backend)
    assert nbytes(y)[0] * 4 < weight_bytes
    assert n.allocations and max(n.allocations) < weight_bytes, n.allocations


def test_triton_conv_forward_counts():
    c = random_case(kernel_size=3, conv={"padding": 1}, d_in=6, d_out=20, seed=6).to(torch.float32)
    with torch.no_grad(), counting() as n:
        y = _conv(c)
    ranks = c.lora_a.shape[0]
    assert n.launches == ["_conv_up_kernel"] and n.ops == ["aten::conv2d", "aten::conv2d"]  # z, z_rank
    assert n.allocations == nbytes(y) + [y.shape[0] * ranks * y.shape[2] * y.shape[3] * 4]


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_1x1_conv_is_the_linear_kernel(channels_last):
    """A 1x1 convolution is one launch of the linear kernel on a token view of x, and y keeps x's layout."""
    c = random_case(kernel_size=1, d_in=6, d_out=20, height=5, width=7, seed=7).to(torch.float32)
    if channels_last:
        c.x = c.x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), counting() as n:
        y = _conv(c, padding=0)
    assert n.launches == ["_fwd_kernel"] and n.ops == [] and n.allocations == nbytes(y)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_conv_backward_counts(dtype):
    """Three Triton launches (rank gradients, their reduction, the finite rank filters) and cuDNN for dx (base
    and rank parts, added) and dA; 16-bit inputs add the sum of dA's two halves."""
    c = random_case(kernel_size=3, conv={"padding": 1}, d_in=6, d_out=20, seed=8).to(dtype, requires_grad=True)
    c.weight.requires_grad_(False)
    c.bias.requires_grad_(False)
    y = _conv(c)
    with counting(within="Backward") as n:
        torch.autograd.grad(y, [c.x, c.lora_a, c.lora_b, c.gate], torch.randn(y.shape).to(dtype))
    assert n.launches == ["_conv_bwd_kernel", "_bwd_reduce_kernel", "_finite_ranks_kernel"]
    convs = ["aten::convolution_backward"] * 2 + ["aten::add_", "aten::convolution_backward"]
    if dtype == torch.float32:
        assert n.ops == convs
    else:  # on CPU the 16-bit backward convolutions run in float32 (casts around them), then dA's halves
        assert [op for op in n.ops if op != "aten::to"] == convs + ["aten::add"]


def _need(backend, op="mor_linear"):
    why = dispatch.unavailable_reason(backend, op, torch.device("cpu"))
    if why is not None:
        pytest.skip(f"{backend}: {why}")


def test_cpp_linear_counts():
    """backend='cpp': the base GEMM (F.linear) and one mor::lora_fwd, which copies lora_b transposed (a rank-sized
    copy) and writes h (zeros at the unpicked ranks) only when a backward will run."""
    _need("cpp")
    c = random_case(tokens=40, d_out=150, seed=9).to(torch.float32, requires_grad=True)
    with torch.no_grad(), counting() as n:
        y = _linear(c, "cpp")
    assert n.launches == [] and n.ops == ["aten::linear", "aten::contiguous"]
    assert sorted(n.allocations) == sorted(nbytes(y) * 2 + nbytes(c.lora_b))  # base, y, lora_b^T
    with counting() as n:
        y = _linear(c, "cpp")
    assert n.ops == ["aten::linear", "aten::contiguous", "aten::zeros"]  # + h (B, T, R) float32
    assert sorted(n.allocations) == sorted(nbytes(y) * 2 + nbytes(c.lora_b) + [2 * 40 * 8 * 4])


def test_cpp_conv_forward_counts():
    """backend='cpp': the base and the rank convolutions (no [W0; A] weight), the bias add, one mor::conv_up."""
    _need("cpp", "mor_conv2d")
    c = random_case(kernel_size=3, conv={"padding": 1}, d_in=6, d_out=20, seed=10).to(torch.float32)
    with torch.no_grad(), counting() as n:
        y = _conv(c, "cpp")
    assert n.ops == ["aten::conv2d", "aten::add_", "aten::conv2d"]
    z_rank = y.shape[0] * c.lora_a.shape[0] * y.shape[2] * y.shape[3] * 4
    assert n.allocations == nbytes(y) + [z_rank] + nbytes(y)  # base, z_rank, y
