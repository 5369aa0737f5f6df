"""Triton routing kernel against the reference router (MOR_SPEC 2.1): same selections (ties to the
lower slot), gates/probs within the float32 tolerance, gradients w.r.t. the logits."""

import pytest
import torch
from triton_env import DEVICE, skip_if_triton_imported_too_late

import mor_kernels
from mor_kernels.ops import triton_route as route_ops
from mor_kernels.reference import route as reference_route
from mor_kernels.testing import assert_parity, poison_allocations

skip_if_triton_imported_too_late()


def _check(logits, top_k, num_zero, renormalize=True, grads=True):
    logits = logits.to(DEVICE)
    with poison_allocations():
        idx, gate, probs = mor_kernels.route(logits, top_k, num_zero, renormalize, backend="triton")
    r_idx, r_gate, r_probs = reference_route(logits.double(), top_k, num_zero, renormalize)
    assert idx.dtype == torch.int32 and gate.dtype == torch.float32 and probs.dtype == torch.float32
    assert idx.shape == r_idx.shape and probs.shape == logits.shape
    assert torch.equal(idx.cpu(), r_idx.cpu())
    assert_parity(gate, r_gate, dtype=torch.float32, name="gate")
    assert_parity(probs, r_probs, dtype=torch.float32, name="probs")
    if grads:
        lg = logits.detach().double().requires_grad_(True)
        lt = logits.detach().clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(0)
        wg = torch.randn(gate.shape, generator=gen, dtype=torch.float64)
        wp = torch.randn(probs.shape, generator=gen, dtype=torch.float64)
        _, g1, p1 = mor_kernels.route(lt, top_k, num_zero, renormalize, backend="triton")
        (want,) = torch.autograd.grad(
            [reference_route(lg, top_k, num_zero, renormalize)[i] for i in (1, 2)], lg, [wg, wp]
        )
        (got,) = torch.autograd.grad([g1, p1], lt, [wg.float().to(DEVICE), wp.float().to(DEVICE)])
        assert got.dtype == logits.dtype
        assert_parity(got.float(), want, dtype=torch.float32, name="dlogits")


@pytest.mark.parametrize(
    "shape,top_k,num_zero",
    [((5, 10), 3, 2), ((2, 3, 36), 8, 4), ((4, 8), 8, 2), ((3, 6), 2, 0), ((2, 1), 1, 0), ((1000, 12), 4, 4)],
)
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_reference(shape, top_k, num_zero, renormalize):
    gen = torch.Generator().manual_seed(sum(shape) + top_k)
    _check(torch.randn(*shape, generator=gen), top_k, num_zero, renormalize, grads=shape[0] < 1000)


def test_ties_go_to_the_lower_slot():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0], [0.0] * 6])
    idx, gate, _ = mor_kernels.route(logits.to(DEVICE), 3, 2, backend="triton")
    assert idx.cpu().tolist() == [[1, 2, 3], [0, 1, 2]]
    torch.testing.assert_close(gate.cpu(), torch.full((2, 3), 1 / 3))


def test_zero_slots_map_to_minus_one():
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0]])  # E = 2, Z = 2: both zero slots win
    idx, gate, _ = mor_kernels.route(logits.to(DEVICE), 3, 2, backend="triton")
    assert idx.cpu().tolist() == [[-1, -1, 0]]
    assert gate.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_logits(dtype):
    gen = torch.Generator().manual_seed(3)
    _check(torch.randn(6, 12, generator=gen).to(dtype), 4, 2, grads=False)


def test_empty_rows():
    idx, gate, probs = mor_kernels.route(torch.randn(0, 6, device=DEVICE), 2, 1, backend="triton")
    assert idx.shape == (0, 2) and gate.shape == (0, 2) and probs.shape == (0, 6)


def _grad_pair(logits, top_k, num_zero, renormalize=True, seed=0):
    """(Triton d logits, float64 reference d logits) for random upstream gradients of gate and probs."""
    lg = logits.detach().double().requires_grad_(True)
    lt = logits.detach().clone().to(DEVICE).requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    _, g1, p1 = mor_kernels.route(lt, top_k, num_zero, renormalize, backend="triton")
    wg = torch.randn(g1.shape, generator=gen, dtype=torch.float64)
    wp = torch.randn(p1.shape, generator=gen, dtype=torch.float64)
    ref = reference_route(lg, top_k, num_zero, renormalize)
    (want,) = torch.autograd.grad([ref[1], ref[2]], lg, [wg, wp])
    (got,) = torch.autograd.grad([g1, p1], lt, [wg.float().to(DEVICE), wp.float().to(DEVICE)])
    return got, want


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("renormalize", [True, False])
def test_nan_and_infinite_rows_follow_the_reference(renormalize):
    """A NaN or +inf logit, or a row of -inf, makes the softmax NaN: the reference (torch.sort, NaN
    first, stably) then selects slots 0..k-1 with NaN gates. Finite rows with -inf entries are ordinary.
    The kernel must agree, store only in-range slots, and the backward must run (NaN where the
    reference's is NaN)."""
    logits = torch.tensor(
        [
            [0.1, NAN, 0.3, 0.2, 0.5, 0.0],
            [0.1, INF, 0.3, 0.2, 0.5, 0.0],
            [-INF] * 6,
            [INF, -INF, 0.0, INF, 1.0, 2.0],
            [0.1, -INF, 0.3, -INF, 0.5, 0.0],  # finite softmax, zero probabilities tie
            [1.0, -INF, -INF, -INF, -INF, -INF],
            [0.3, 0.1, 0.4, 0.1, 0.5, 0.9],
        ]
    )
    top_k, num_zero = 3, 2
    idx, gate, probs = mor_kernels.route(logits.to(DEVICE), top_k, num_zero, renormalize, backend="triton")
    r_idx, r_gate, r_probs = reference_route(logits.double(), top_k, num_zero, renormalize)
    assert torch.equal(idx.cpu(), r_idx)
    for name, got, want in (("gate", gate, r_gate), ("probs", probs, r_probs)):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got.cpu()), nan), name
        assert nan[:4].all() and not nan[4:].any()
        assert_parity(got[4:], want[4:], dtype=torch.float32, name=name)
    got, want = _grad_pair(logits, top_k, num_zero, renormalize)
    assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
    assert_parity(got[4:].float(), want[4:], dtype=torch.float32, name="dlogits")


def test_nan_row_slots_stay_in_range():
    """The slots the forward saves for the backward are in [0, E + Z) for every row."""
    logits = torch.tensor([[NAN] * 5, [0.0, NAN, 1.0, 2.0, 3.0], [-INF] * 5]).to(DEVICE)
    _, _, _, slot = route_ops.triton_route(logits, 5, 1, True)
    assert ((slot >= 0) & (slot < 5)).all()
    assert slot.cpu().tolist() == [[0, 1, 2, 3, 4]] * 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_low_precision_logits_gradients(dtype, renormalize):
    """16-bit logits: softmax in float32 on the rounded logits, d logits returned in the logits' dtype."""
    logits = torch.randn(7, 10, generator=torch.Generator().manual_seed(4)).to(dtype)
    got, want = _grad_pair(logits, 4, 2, renormalize, seed=1)
    assert got.dtype == dtype
    assert_parity(got, want, dtype=dtype, name="dlogits")
