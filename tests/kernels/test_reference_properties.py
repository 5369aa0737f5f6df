"""Property-based checks (hypothesis) of the reference ops over shapes, S, E, Z, k and dtypes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import naive_lora, naive_route

import mor_kernels
from mor_kernels.testing import assert_parity, random_case


@st.composite
def mor_settings(draw):
    num_shared = draw(st.integers(0, 3))
    num_routed = draw(st.integers(0 if num_shared else 1, 5))
    num_zero = draw(st.integers(0 if num_routed else 1, 3))
    top_k = draw(st.integers(1, num_routed + num_zero))
    return dict(
        batch=draw(st.integers(1, 3)),
        tokens=draw(st.integers(1, 6)),
        d_in=draw(st.integers(1, 9)),
        d_out=draw(st.integers(1, 7)),
        num_shared=num_shared,
        num_routed=num_routed,
        num_zero=num_zero,
        top_k=top_k,
        routing=draw(st.sampled_from(["sample", "token"])),
        zero_only_unit=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(params=mor_settings(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_reference_matches_naive_in_every_dtype(params, dtype):
    case = random_case(**params)
    low = case.to(dtype)
    args = (low.x, low.lora_a, low.lora_b, low.idx, low.gate, low.num_shared, low.scaling)
    out = mor_kernels.mor_lora(*args, backend="reference")
    assert out.dtype == dtype and out.shape == (params["batch"], params["tokens"], params["d_out"])
    exact = low.to(torch.float64)  # the same (rounded) inputs, exact arithmetic
    ref = naive_lora(
        exact.x, exact.lora_a, exact.lora_b, exact.idx, exact.gate.double(), exact.num_shared, exact.scaling
    )
    assert_parity(out, ref, dtype=dtype)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    num_slots=st.integers(1, 10),
    data=st.data(),
    renormalize=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_route_properties(rows, num_slots, data, renormalize, dtype):
    num_zero = data.draw(st.integers(0, num_slots - 1))
    top_k = data.draw(st.integers(1, num_slots))
    # few distinct values, so ties are common
    logits = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=num_slots, max_size=num_slots),
                min_size=rows,
                max_size=rows,
            )
        )
    ).to(dtype)
    idx, gate, probs = mor_kernels.route(logits, top_k, num_zero, renormalize)
    want_idx, want_gate = naive_route(logits, top_k, num_zero, renormalize)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(gate.double(), want_gate, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(rows))
    real = idx[idx >= 0]
    assert ((idx == -1) | ((idx >= 0) & (idx < num_slots - num_zero))).all()
    for row in idx:  # a real slot is never picked twice
        picked = row[row >= 0].tolist()
        assert len(picked) == len(set(picked))
    assert real.numel() <= top_k * rows
