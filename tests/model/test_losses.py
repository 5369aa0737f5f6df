"""Degradation-aware balance loss (MOR_SPEC section 4)."""

from __future__ import annotations

import pytest
import torch
from mor_tiny import small_config
from torch import nn

from mor_model import MoRLinear, balance_loss, degradation, degradation_aware_balance_loss


def test_hand_computed_example():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])
    sev = torch.tensor([0.2, 0.8])
    # top-1: unit 0 -> slot 0, unit 1 -> slot 2 (zero slot); f = [1/2, 0, 1/2]
    # P = 0.01 * [0.3, 0.3, mean(0.2*0.2, 0.8*0.6) = 0.26]; L = 3 * (0.5*0.003 + 0.5*0.0026) = 0.0084
    loss = degradation_aware_balance_loss(probs, sev, num_real=2, top_k=1, alpha=0.01)
    assert loss.item() == pytest.approx(0.0084, rel=1e-6)
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_ties_go_to_the_lower_slot():
    probs = torch.tensor([[0.4, 0.4, 0.2]])
    # k=1 picks slot 0 (f = [1, 0, 0]) -> L = 3 * 1 * 1.0 * 0.4
    assert degradation_aware_balance_loss(probs, torch.ones(1), 2, 1, alpha=1.0).item() == pytest.approx(1.2)


def switch_loss(probs: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """The standard Switch/DeepSeek balance loss, written directly."""
    units, n = probs.shape
    chosen = torch.topk(probs, top_k, dim=-1).indices  # no ties in random data
    f = torch.bincount(chosen.flatten(), minlength=n).float() / (units * top_k)
    return n * (f * alpha * probs.mean(0)).sum()


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_severity_one_is_the_switch_loss(top_k):
    torch.manual_seed(top_k)
    probs = torch.softmax(torch.randn(17, 6), dim=-1)
    ours = degradation_aware_balance_loss(probs, torch.ones(17), num_real=4, top_k=top_k, alpha=0.01)
    torch.testing.assert_close(ours, switch_loss(probs, top_k, 0.01))


def test_gradient_w_r_t_probs_does_not_differentiate_f():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 6), dim=-1).requires_grad_(True)
    sev = torch.rand(5)
    loss = degradation_aware_balance_loss(probs, sev, num_real=4, top_k=2, alpha=0.5)
    loss.backward()
    chosen = torch.topk(probs.detach(), 2).indices
    f = torch.bincount(chosen.flatten(), minlength=6).float() / 10
    expected = 6 * 0.5 * f[None, :].expand(5, 6) / 5
    expected = torch.cat([expected[:, :4], expected[:, 4:] * sev[:, None]], dim=1)
    torch.testing.assert_close(probs.grad, expected)


def test_balance_loss_of_a_module_reaches_the_router():
    torch.manual_seed(1)
    model = nn.Sequential(MoRLinear(nn.Linear(4, 4), small_config()), MoRLinear(nn.Linear(4, 4), small_config()))
    s = torch.rand(3, 7)
    with degradation(model, s):
        model(torch.randn(3, 2, 4))
    loss = balance_loss(model)
    per_layer = [degradation_aware_balance_loss(m.router.last_probs, s.mean(-1), 4, 3, alpha=0.01) for m in model]
    torch.testing.assert_close(loss, torch.stack(per_layer).mean())
    loss.backward()
    for m in model:
        assert m.router.degradation.weight.grad.abs().sum() > 0


def test_token_routing_units_are_tokens_with_their_sample_severity():
    torch.manual_seed(2)
    layer = MoRLinear(nn.Linear(4, 4), small_config(routing="token", router_input="token+degradation"))
    s = torch.rand(2, 7)
    with degradation(layer, s):
        layer(torch.randn(2, 5, 4))
    sev = s.mean(-1).repeat_interleave(5)
    expected = degradation_aware_balance_loss(layer.router.last_probs, sev, 4, 3, alpha=0.01)
    torch.testing.assert_close(balance_loss(layer), expected)
    assert layer.router.last_probs.shape == (10, 6)


def test_errors():
    with pytest.raises(RuntimeError, match="forward"):
        balance_loss(MoRLinear(nn.Linear(4, 4), small_config()))
    with pytest.raises(ValueError, match="severity"):
        degradation_aware_balance_loss(torch.rand(3, 4), torch.rand(2), 2, 1)
    with pytest.raises(ValueError, match="top_k"):
        degradation_aware_balance_loss(torch.rand(3, 4), torch.rand(3), 2, 5)
    with pytest.raises(ValueError, match="probs"):
        degradation_aware_balance_loss(torch.rand(4), torch.rand(4), 2, 1)


def test_balance_loss_uses_only_the_layers_of_the_last_forward():
    """An injected model forgets the previous forward's routing when a new forward starts, so a layer
    the new forward skipped is left out (not reused with a freed graph)."""
    from torch import nn

    from mor_model import inject_mor, set_degradation
    from mor_model.losses import layer_balance_loss

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, both=True):
            return self.to_k(self.to_q(x)) if both else self.to_q(x)

    model = TwoPaths()
    inject_mor(model, small_config(target_modules=("to_q", "to_k")))
    set_degradation(model, torch.rand(2, 7))
    x = torch.randn(2, 3, 4)
    model(x).sum().backward()
    balance_loss(model)  # both layers ran
    out = model(x, both=False)
    assert model.to_k.router.last_probs is None
    loss = balance_loss(model)
    (out.sum() + loss).backward()  # no "backward through the graph a second time"
    assert torch.equal(loss, layer_balance_loss(model.to_q, None))
