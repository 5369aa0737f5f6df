"""Public-op behaviour shared by every backend: autocast, empty batches, out-of-range indices."""

import pytest
import torch

import mor_kernels
from mor_kernels import _extension
from mor_kernels.testing import random_case

CPU_BACKENDS = ["reference"] + (["cpp"] if _extension.has_kernel("lora_fwd", "CPU") else [])


def _linear(c, backend, **kw):
    return mor_kernels.mor_linear(
        c.x, c.weight, c.bias, c.lora_a, c.lora_b, c.idx, c.gate, c.num_shared, c.scaling, backend=backend, **kw
    )


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("routing", ["sample", "token"])
def test_unchecked_out_of_range_index_is_a_zero_slot(routing, backend):
    """With check_indices=False an index outside [0, E) is treated as a zero slot by every backend
    (never an out-of-bounds read)."""
    c = random_case(routing=routing, seed=5)  # E = 6
    bad, zero = c.idx.clone(), c.idx.clone()
    bad[..., 0], zero[..., 0] = 6 + 3, -1
    c_bad, c_zero = c.to(torch.float32), c.to(torch.float32)
    c_bad.idx, c_zero.idx = bad, zero
    assert torch.equal(_linear(c_bad, backend, check_indices=False), _linear(c_zero, backend))
    with pytest.raises(ValueError, match=r"idx values must be in \[-1, 6\)"):
        _linear(c_bad, backend)


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
