"""Per-sample merged inference (mor_kernels.reference.merged) against the low-rank path and the naive loops,
MOR_SPEC section 7; and when the public ops take it (mor_kernels.merge_decision)."""

from __future__ import annotations

import pytest
import torch
from naive import naive_conv, naive_lora

import mor_kernels
from mor_kernels import dispatch
from mor_kernels.testing import TOLERANCES, assert_parity, random_case

CASES = [  # (batch, num_shared, num_routed, num_zero, top_k): odd corners of MOR_SPEC 7
    (1, 2, 6, 2, 3),
    (3, 2, 6, 2, 3),  # samples route differently: one merged weight each (bmm / grouped conv)
    (2, 0, 4, 2, 6),  # S = 0, k = E + Z
    (2, 3, 5, 3, 7),  # zero slots must be picked, padded rank lists
]


def _args(case, conv):
    a = (case.x, case.weight, case.bias, case.lora_a, case.lora_b, case.idx, case.gate, case.num_shared, case.scaling)
    return a + ((1, 1, 1) if conv else ())


def _op(conv):
    return mor_kernels.mor_conv2d if conv else mor_kernels.mor_linear


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("shape", CASES)
def test_merged_matches_the_oracle_within_mor_spec_7(shape, conv):
    b, s, e, z, k = shape
    kw = dict(kernel_size=3, d_in=6, d_out=9) if conv else {}
    case = random_case(batch=b, num_shared=s, num_routed=e, num_zero=z, top_k=k, zero_only_unit=True, seed=sum(shape),
                       **kw)  # fmt: skip
    op = _op(conv)
    with torch.no_grad():
        merged = op(*_args(case, conv), merge="always")
        lowrank = op(*_args(case, conv), merge="never")
        oracle = op(*_args(case.to(torch.float64), conv), merge="never")
    assert merged.dtype == case.x.dtype
    assert_parity(merged, oracle, name="merged")
    assert_parity(lowrank, oracle, name="low-rank")
    naive = naive_conv if conv else naive_lora
    c64 = case.to(torch.float64)
    if conv:
        want = naive(*_args(c64, False), 1, 1, 1)
    else:
        want = naive(c64.x, c64.lora_a, c64.lora_b, c64.idx, c64.gate, c64.num_shared, c64.scaling)
        want = want + torch.nn.functional.linear(c64.x, c64.weight, c64.bias)
    with torch.no_grad():
        got64 = op(*_args(c64, conv), merge="always")
    torch.testing.assert_close(got64, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv", [False, True])
def test_identical_routing_rows_share_one_merged_weight(conv, monkeypatch):
    from mor_kernels.reference import factors

    kw = dict(kernel_size=3, d_in=6, d_out=9) if conv else {}
    case = random_case(batch=3, seed=5, **kw)
    case.idx, case.gate = case.idx[:1].expand(3, -1).clone(), case.gate[:1].expand(3, -1).clone()
    counts = []
    real = factors.merge_weights
    monkeypatch.setattr(factors, "merge_weights", lambda w, f: counts.append(f.count) or real(w, f))
    from mor_kernels.reference import merged as merged_mod

    monkeypatch.setattr(merged_mod, "merge_weights", factors.merge_weights)
    with torch.no_grad():
        got = _op(conv)(*_args(case, conv), merge="always", backend="reference")  # this module's merged path
        want = _op(conv)(*_args(case.to(torch.float64), conv), merge="never")
    assert counts == [1]
    assert_parity(got, want)


def test_a_gradient_never_takes_the_merged_path():
    case = random_case(seed=6)
    case.x.requires_grad_(True)
    plan = mor_kernels.merge_decision("mor_linear", case.x, case.weight, case.lora_a, case.idx, merge="always")
    assert not plan.merge and "gradient" in plan.why
    y = mor_kernels.mor_linear(*_args(case, False), merge="always")
    y.sum().backward()
    assert case.x.grad is not None and torch.isfinite(case.x.grad).all()
    with torch.no_grad():
        assert mor_kernels.merge_decision(
            "mor_linear", case.x, case.weight, case.lora_a, case.idx, merge="always"
        ).merge


def test_merge_decision_follows_the_measured_cost_model():
    def plan(tokens, c_in, c_out, kernel=(), **kw):
        return dispatch.merge_plan("cpu", tokens, c_in, c_out, kernel=kernel, **kw)

    lin = dispatch.MERGE_CROSSOVER[("cpu", "linear")]
    # rho = T (C_in + C_out) / (C_in kh kw C_out): 320 x 320 Linear, rho = T / 160
    assert plan(int(lin * 160) + 16, 320, 320).merge and not plan(int(lin * 160) - 16, 320, 320).merge
    conv = dispatch.MERGE_CROSSOVER[("cpu", "conv")]
    tokens = int(conv * 9 * 320 / 2)  # 3x3 conv, 320 -> 320: rho = 2 T / (9 * 320)
    assert plan(tokens + 64, 320, 320, (3, 3)).merge and not plan(tokens - 64, 320, 320, (3, 3)).merge
    assert "rho" in plan(4096, 320, 320).why and "(linear)" in plan(4096, 320, 320).why
    assert not plan(4096, 320, 320, backend="reference").merge  # an explicit backend runs its own kernels
    assert plan(4096, 320, 320, backend="reference", mode="always").merge
    assert not plan(4096, 320, 320, mode="never").merge
    assert not plan(4096, 320, 320, token_routing=True, mode="always").merge
    assert not plan(4096, 320, 320, needs_grad=True, mode="always").merge
    gpu = dispatch.merge_plan("cuda", 4096, 320, 320)
    assert not gpu.merge and "no measured merge crossover" in gpu.why
    with pytest.raises(ValueError, match="merge must be one of"):
        plan(16, 8, 8, mode="sometimes")


def test_the_public_ops_merge_per_the_cost_model_and_say_so(monkeypatch):
    """backend='auto' merges when rho is above the measured crossover: through this module when 'auto' runs the
    reference, inside the C++ op (given the crossover as merge_above) when it runs the BLAS path."""
    case = random_case(batch=1, tokens=64, d_in=8, d_out=8, seed=7)  # rho = 64 * 16 / 64 = 16
    blas = dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32).backend == "blas"
    with torch.no_grad():
        plan = mor_kernels.merge_decision("mor_linear", case.x, case.weight, case.lora_a, case.idx)
        assert plan.merge
        from mor_kernels.ops import cpu_blas
        from mor_kernels.reference import merged as merged_mod

        calls, limits = [], []
        real = merged_mod.mor_linear_merged
        monkeypatch.setattr(merged_mod, "mor_linear_merged", lambda *a, **k: calls.append(1) or real(*a, **k))
        real_op = cpu_blas.linear_op()
        lean_ops = [lambda *a: limits.append(a[9]) or real_op(*a), cpu_blas.conv2d_op()]
        monkeypatch.setattr(mor_kernels.functional, "_BLAS_OPS", lean_ops)
        y = mor_kernels.mor_linear(*_args(case, False), check_indices=False)
        if blas:  # merges when rho = 16 > merge_above
            assert calls == [] and limits == [dispatch.MERGE_CROSSOVER[("cpu", "linear")]] and 16 > limits[0]
        else:
            assert calls == [1] and limits == []
        mor_kernels.mor_linear(*_args(case, False), backend="reference")
        assert calls == ([] if blas else [1])  # an explicit backend: its own low-rank path
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y, mor_kernels.mor_linear(*_args(case, False), merge="never"), atol=atol, rtol=rtol)
