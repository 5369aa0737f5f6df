"""MOR_SPEC 2.2 on the reference (low-rank and merged paths): a rank a routing unit did not pick contributes
exactly zero to it, NaN and inf in that rank's weights included, forward and backward."""

from __future__ import annotations

import pytest
import torch

import mor_kernels

S, E = 2, 6
# routed slots 3 and 0 are picked by sample 1 only; sample 0 picks one routed rank, the others two, so
# sample 0's rank list is padded (with rank 0: routed slot 0 itself when S = 0)
IDX = torch.tensor([[2, -1, -1], [3, 0, -1], [-1, 5, 1]], dtype=torch.int32)
SLOTS = (3, 0)


def _inputs(conv: bool, gen: torch.Generator):
    b, c_in, c_out = IDX.shape[0], 5, 7
    if conv:
        x, w = torch.randn(b, c_in, 4, 6, generator=gen), torch.randn(c_out, c_in, 3, 3, generator=gen)
        a = torch.randn(S + E, c_in, 3, 3, generator=gen)
    else:
        x, w = torch.randn(b, 4, c_in, generator=gen), torch.randn(c_out, c_in, generator=gen)
        a = torch.randn(S + E, c_in, generator=gen)
    bias, lb = torch.randn(c_out, generator=gen), torch.randn(c_out, S + E, generator=gen)
    gate = torch.rand(IDX.shape, generator=gen) + 0.1
    return x.double(), w.double(), bias.double(), a.double(), lb.double(), (gate / gate.sum(-1, keepdim=True)).double()


def _run(conv, x, w, bias, a, b, gate, num_shared, merge="never"):
    args = (x, w, bias, a, b, IDX, gate, num_shared, 0.5)
    if conv:
        return mor_kernels.mor_conv2d(*args, 1, 1, backend="reference", merge=merge)
    return mor_kernels.mor_linear(*args, backend="reference", merge=merge)


def _poison(a, b, value, num_shared):
    """Non-finite values in the ranks of SLOTS (picked by sample 1 only)."""
    a, b = a.clone(), b.clone()
    for slot in SLOTS:
        a[num_shared + slot].view(-1)[1] = value
        b[2, num_shared + slot] = value
    return a, b


@pytest.mark.parametrize("num_shared", [S, 0])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("merge", ["never", "always"])
@pytest.mark.parametrize("conv", [False, True])
def test_unpicked_poisoned_rank_reaches_only_the_sample_that_picked_it(conv, merge, value, num_shared):
    x, w, bias, a, b, gate = _inputs(conv, torch.Generator().manual_seed(0))
    pa, pb = _poison(a, b, value, num_shared)
    with torch.no_grad():
        clean = _run(conv, x, w, bias, a, b, gate, num_shared, merge)
        got = _run(conv, x, w, bias, pa, pb, gate, num_shared, merge)
    assert not torch.isfinite(got[1]).all()  # sample 1 picked the rank: it sees it
    for s in (0, 2):
        assert torch.isfinite(got[s]).all()
        torch.testing.assert_close(got[s], clean[s], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_shared", [S, 0])
@pytest.mark.parametrize("conv", [False, True])
def test_gradients_of_other_samples_and_ranks_stay_clean(conv, num_shared):
    """Backward: the x and gate gradients of the samples that did not pick the poisoned ranks, and every
    other rank's lora_a/lora_b gradients, are what they are without the poison (the poisoned ranks' own
    gradients may be anything). With S = 0 sample 0's padded slot points at a poisoned rank."""
    x, w, bias, a, b, gate = _inputs(conv, torch.Generator().manual_seed(1))
    pa, pb = _poison(a, b, float("nan"), num_shared)

    def grads(a, b):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b, gate)]
        y = _run(conv, leaves[0], w, bias, leaves[1], leaves[2], leaves[3], num_shared)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
        dy[1] = 0  # sample 1 (which picked the poisoned ranks) has no loss
        return torch.autograd.grad(y, leaves, dy)

    (cx, ca, cb, cgate), (dx, da, db, dgate) = grads(a, b), grads(pa, pb)
    for got, want in ((dx, cx), (dgate, cgate)):
        assert torch.isfinite(got[[0, 2]]).all()
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-12, atol=1e-12)
    others = [r for r in range(S + E) if r - num_shared not in SLOTS]
    torch.testing.assert_close(da[others], ca[others], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db[:, others], cb[:, others], rtol=1e-12, atol=1e-12)


def test_token_routing_keeps_a_poisoned_rank_to_the_tokens_that_picked_it():
    gen = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(1, 3, 5, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen)
    a, b = torch.randn(S + E, 5, generator=gen), torch.randn(4, S + E, generator=gen)
    idx = torch.tensor([[[0, 1], [3, -1], [2, 5]]], dtype=torch.int32)  # token 1 alone picks rank S + 3
    gate = torch.rand(1, 3, 2, generator=gen)
    pa, pb = a.clone(), b.clone()
    pa[S + 3, 0], pb[1, S + 3] = float("inf"), float("nan")
    clean = mor_kernels.mor_linear(x, w, bias, a, b, idx, gate, S, 1.0, backend="reference")
    leaves = [t.clone().requires_grad_(True) for t in (x, pa, pb, gate)]
    got = mor_kernels.mor_linear(leaves[0], w, bias, leaves[1], leaves[2], idx, leaves[3], S, 1.0, backend="reference")
    assert not torch.isfinite(got[0, 1]).all()
    torch.testing.assert_close(got[0, [0, 2]], clean[0, [0, 2]])
    dy = torch.ones_like(got)
    dy[0, 1] = 0
    dx, _, _, dgate = torch.autograd.grad(got, leaves, dy)
    assert torch.isfinite(dx[0, [0, 2]]).all() and torch.isfinite(dgate[0, [0, 2]]).all()
