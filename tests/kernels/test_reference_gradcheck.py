"""torch.autograd.gradcheck of the reference ops in float64 on small shapes."""

import pytest
import torch

from mor_kernels import reference
from mor_kernels.testing import random_case


def _leaves(case, names):
    case = case.to(torch.float64, requires_grad=True)
    case.gate = case.gate.detach().double().requires_grad_()
    return case, [getattr(case, n) for n in names]


@pytest.mark.parametrize("routing", ["sample", "token"])
def test_gradcheck_mor_lora(routing):
    case, leaves = _leaves(
        random_case(batch=2, tokens=3, d_in=4, d_out=3, num_routed=3, routing=routing),
        ["x", "lora_a", "lora_b", "gate"],
    )
    fn = lambda x, a, b, g: reference.mor_lora(x, a, b, case.idx, g, case.num_shared, case.scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_gradcheck_mor_linear():
    case, leaves = _leaves(
        random_case(batch=2, tokens=3, d_in=4, d_out=3, num_routed=3),
        ["x", "weight", "bias", "lora_a", "lora_b", "gate"],
    )
    fn = lambda x, w, bias, a, b, g: reference.mor_linear(x, w, bias, a, b, case.idx, g, case.num_shared, case.scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_gradcheck_mor_conv2d():
    case, leaves = _leaves(
        random_case(batch=2, d_in=2, d_out=3, num_routed=3, kernel_size=3, height=4, width=5),
        ["x", "weight", "bias", "lora_a", "lora_b", "gate"],
    )

    def fn(x, w, bias, a, b, g):
        return reference.mor_conv2d(x, w, bias, a, b, case.idx, g, case.num_shared, case.scaling, 2, 1, 1)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_gradient_matches_float64_formula(renormalize):
    """gate/probs are float32 by contract, too coarse for finite differences: compare the autograd
    gradient with that of the spec's formula written out in float64 on the same selections."""
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    idx, gate, probs = reference.route(logits, 3, 2, renormalize)
    p64 = torch.softmax(logits, -1)
    chosen = torch.sort(p64.detach(), dim=-1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(torch.where(chosen < 5, chosen, -1).int(), idx)
    g64 = p64.gather(-1, chosen)
    if renormalize:
        g64 = g64 / g64.sum(-1, keepdim=True)
    upstream = torch.randn_like(g64)
    (grad,) = torch.autograd.grad((gate.double() * upstream).sum() + probs.double()[:, 1].sum(), logits)
    (want,) = torch.autograd.grad((g64 * upstream).sum() + p64[:, 1].sum(), logits)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
