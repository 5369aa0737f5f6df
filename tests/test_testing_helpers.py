"""The MOR_SPEC section 7 tolerance helper that every kernel test relies on must itself fail when it should."""

import pytest
import torch

from mor_kernels.testing import TOLERANCES, assert_parity, parity, poison_allocations, random_case


def test_table_matches_the_spec():
    assert TOLERANCES[torch.float32] == (1e-4, 1e-4)
    assert TOLERANCES[torch.float16] == (2e-3, 2e-3)
    assert TOLERANCES[torch.bfloat16] == (1.6e-2, 1.6e-2)


def test_passes_within_and_fails_outside_the_table():
    ref = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert_parity(ref.float(), ref)
    bumped = ref.clone()
    bumped[17] += 1e-4 + 1e-4 * abs(ref[17]) + 1e-6
    with pytest.raises(AssertionError, match=r"exceeds atol=0.0001.*at \(17,\)"):
        assert_parity(bumped.float(), ref, dtype=torch.float32)


def test_fails_when_twice_the_reference_low_precision_error_is_exceeded():
    ref = torch.linspace(-1, 1, 64, dtype=torch.float64)
    lowp = ref.half()  # rounding only: error <= half an ulp
    worse = (ref + 1.5e-3).half()  # inside the float16 table (2e-3 + ...) but far worse than rounding
    assert_parity(lowp, ref, lowp=lowp)
    with pytest.raises(AssertionError, match="more than twice the reference path"):
        assert_parity(worse, ref, lowp=lowp)


def test_rounding_floor_of_the_2x_rule_follows_the_sum_of_magnitudes():
    """A float32 dot product that cancels: the float32 reference may be exactly rounded by luck, so the
    floor is one rounding at the scale of sum |terms| (``cond``), and still well inside the table."""
    gen = torch.Generator().manual_seed(13)  # a draw where the old floor (one ulp of |ref|) was too tight
    a, b = (
        torch.randn(4, 200, generator=gen, dtype=torch.float64),
        torch.randn(200, generator=gen, dtype=torch.float64),
    )
    ref = a @ b
    cond = a.abs() @ b.abs()  # the same computation on |inputs|
    exact = ref.float()  # an exactly rounded "reference": error <= half an ulp of ref
    reordered = a.float().flip(1) @ b.float().flip(0)  # another summation order, as a kernel would
    assert not parity(reordered, ref, dtype=torch.float32, lowp=exact).ok  # floor at |ref|'s scale: too tight
    assert_parity(reordered, ref, dtype=torch.float32, lowp=exact, cond=cond)
    eps = torch.finfo(torch.float32).eps
    worse = ref + 4 * eps * cond.max()  # four roundings at that scale: inside the table, yet fails the rule
    assert (worse - ref).abs().max() < 1e-4 + 1e-4 * ref.abs().min()
    with pytest.raises(AssertionError, match="more than twice the reference path"):
        assert_parity(worse.float(), ref, dtype=torch.float32, lowp=exact, cond=cond)


def test_magnitudes_case_is_the_absolute_oracle():
    c = random_case(seed=2)
    m = c.magnitudes()
    assert m.x.dtype == torch.float64 and m.x.requires_grad and torch.equal(m.x.detach(), c.x.double().abs())
    assert (m.lora_b >= 0).all() and m.scaling == abs(c.scaling) and torch.equal(m.idx, c.idx)


def test_non_finite_and_shape_mismatch_fail():
    ref = torch.ones(4, dtype=torch.float64)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_parity(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_parity(torch.ones(5), ref)


def test_poison_allocations_fills_and_restores():
    with poison_allocations():
        assert torch.isnan(torch.empty(3)).all()
        assert (torch.empty(2, dtype=torch.int32) == -7).all()
        assert torch.isnan(torch.empty_like(torch.zeros(2))).all()
    assert torch.empty is not None and not isinstance(torch.empty, type(lambda: 0))


def test_random_case_is_random_and_reproducible():
    a, b = random_case(seed=1), random_case(seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.idx, b.idx)
    assert (a.x != 0).all() and (a.lora_b != 0).all()
    zero = random_case(routing="token", num_zero=3, top_k=2, zero_only_unit=True)
    assert (zero.idx[0, 0] == -1).all()
