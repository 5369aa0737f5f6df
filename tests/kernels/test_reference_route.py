"""Routing semantics of MOR_SPEC 2.1 on the public route (every backend available on CPU)."""

import pytest
import torch

import mor_kernels
from mor_kernels import dispatch

BACKENDS = dispatch.available_backends("cpu", "route")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_descending_order_and_probs_sum_to_one(backend):
    logits = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    idx, gate, probs = mor_kernels.route(logits, 5, 4, renormalize=False, backend=backend)
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    assert (gate[:, :-1] >= gate[:, 1:]).all()  # gates are the picked probabilities, descending
    for row in range(64):
        real = [int(i) for i in idx[row] if i >= 0]
        for pos, slot in enumerate(idx[row].tolist()):
            if slot >= 0:
                assert gate[row, pos] == probs[row, slot]
        # nothing left out beats the weakest pick
        left_out = [probs[row, j] for j in range(8) if j not in real]
        assert all(p <= gate[row, -1] for p in left_out)
        zero_probs = sorted(probs[row, 8:].tolist(), reverse=True)
        assert sorted(g for g, i in zip(gate[row].tolist(), idx[row].tolist(), strict=True) if i < 0) == sorted(
            zero_probs[: int((idx[row] < 0).sum())]
        )


def test_ties_go_to_the_lower_index(backend):
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 1.0], [2.0] * 6, [0.0, 0.0, 3.0, 0.0, 0.0, 3.0]])
    idx, _, _ = mor_kernels.route(logits, 3, 2, backend=backend)
    assert idx.tolist() == [[1, 2, 3], [0, 1, 2], [2, -1, 0]]


def test_renormalisation_includes_zero_slots(backend):
    logits = torch.tensor([[3.0, 0.0, 1.0, 2.5, -1.0]])  # E = 3, Z = 2: slot 3 is a zero slot
    idx, gate, probs = mor_kernels.route(logits, 2, 2, backend=backend)
    assert idx.tolist() == [[0, -1]]
    p = probs[0]
    torch.testing.assert_close(gate[0], torch.stack([p[0], p[3]]) / (p[0] + p[3]))
    torch.testing.assert_close(gate.sum(-1), torch.ones(1))


def test_without_renormalisation_gates_are_probabilities(backend):
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    _, gate, probs = mor_kernels.route(logits, 4, 3, renormalize=False, backend=backend)
    torch.testing.assert_close(gate, probs.topk(4, dim=-1).values)
    assert (gate.sum(-1) < 1).all()
    _, renormalised, _ = mor_kernels.route(logits, 4, 3, backend=backend)
    torch.testing.assert_close(renormalised, gate / gate.sum(-1, keepdim=True))


def test_zero_slots_are_minus_one_and_k_equals_all_slots(backend):
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    idx, gate, _ = mor_kernels.route(logits, 6, 2, backend=backend)
    assert sorted(idx[0].tolist()) == [-1, -1, 0, 1, 2, 3]
    assert ((idx >= -1) & (idx < 4)).all()
    torch.testing.assert_close(gate.sum(-1), torch.ones(7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_and_leading_dims(backend, dtype):
    if (
        backend != "reference"
        and dtype == torch.float64
        and backend not in dispatch.available_backends("cpu", "route", dtype)
    ):
        pytest.skip(f"{backend} does not take float64 logits")
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(3)).to(dtype)
    idx, gate, probs = mor_kernels.route(logits, 2, 1, backend=backend)
    assert idx.shape == (2, 3, 2) and gate.shape == (2, 3, 2) and probs.shape == (2, 3, 10)
    assert idx.dtype == torch.int32 and gate.dtype == torch.float32 and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1))


def test_probabilities_are_differentiable(backend):
    logits = torch.randn(4, 6, requires_grad=True)
    _, gate, probs = mor_kernels.route(logits, 3, 1, backend=backend)
    (gate.sum() + probs[:, 0].sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
