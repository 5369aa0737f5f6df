"""Routing statistics and the heatmap writer."""

from __future__ import annotations

import pytest
import torch
from mor_tiny import small_config
from torch import nn

from mor_model import MoRLinear, degradation, routing_stats, save_routing_heatmap


def model_with_forced_routing():
    cfg = small_config(num_zero=3, top_k=3)
    model = nn.Sequential(MoRLinear(nn.Linear(4, 4), cfg), MoRLinear(nn.Linear(4, 4), cfg))
    with torch.no_grad():  # layer 0: sample 0 picks only zero slots, sample 1 only routed slots
        r = model[0].router.degradation
        r.weight.zero_()
        r.bias.zero_()
        r.weight[4:, 0] = 50.0
        r.weight[:4, 1] = 50.0
    s = torch.zeros(2, 7)
    s[0, 0] = s[1, 1] = 1.0
    with degradation(model, s):
        model(torch.randn(2, 3, 4))
    return model, cfg


def test_active_ranks_and_slots():
    model, cfg = model_with_forced_routing()
    stats = routing_stats(model)
    assert stats.layers == ["0", "1"]
    assert stats.active_ranks.shape == (2, 2)
    assert stats.active_ranks[0].tolist() == [cfg.num_shared, cfg.num_shared + cfg.top_k]
    assert sorted(stats.slots["0"][0].tolist()) == [4, 5, 6]  # the three zero slots
    assert (stats.slots["0"][1] < 4).all()
    idx = model[1].router.last_idx
    assert stats.active_ranks[1].tolist() == (cfg.num_shared + (idx >= 0).sum(-1)).float().tolist()
    assert stats.to_dict()["max_ranks"] == {"0": 5, "1": 5}


def test_a_picked_slot_whose_gate_underflowed_counts_as_a_zero_slot():
    """A routed slot picked with probability exactly 0 (a logit gap past float32's exp range) gets gate 0, which
    every backend runs as a zero slot (MOR_SPEC 2.2): the statistics do not count its rank as active."""
    cfg = small_config(num_zero=1, top_k=3)  # E = 4 routed slots + 1 zero slot, top 3
    layer = MoRLinear(nn.Linear(4, 4), cfg)
    with torch.no_grad():  # slot 0 dominates by 200 (others' probabilities underflow to 0), slot 1 by 200 - 1
        r = layer.router.degradation
        r.weight.zero_()
        r.bias.copy_(torch.tensor([200.0, 199.0, 0.0, 0.0, 0.0]))
    with degradation(layer, torch.zeros(1, 7)):
        layer(torch.randn(1, 2, 4))
    idx = layer.router.last_idx[0].tolist()
    probs = layer.router.last_probs[0]
    assert idx[:2] == [0, 1] and idx[2] in (2, 3) and float(probs[idx[2]].detach()) == 0.0  # a real slot with gate 0
    assert routing_stats(layer).active_ranks[0].tolist() == [cfg.num_shared + 2]


def test_token_routing_averages_over_tokens():
    layer = MoRLinear(nn.Linear(4, 4), small_config(routing="token", router_input="token"))
    layer(torch.randn(2, 5, 4))
    stats = routing_stats(layer)
    assert stats.slots[""].shape == (2, 5, 3)
    real = (layer.router.last_idx >= 0).reshape(2, 5, 3).sum(-1).float().mean(-1)
    torch.testing.assert_close(stats.active_ranks[0], 2 + real)


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is part of the 'model' extra")
    model, _ = model_with_forced_routing()
    out = save_routing_heatmap(routing_stats(model), tmp_path / "routing.png", title="test")
    data = (tmp_path / "routing.png").read_bytes()
    assert out.endswith("routing.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_no_forward_is_an_error():
    with pytest.raises(RuntimeError, match="forward"):
        routing_stats(MoRLinear(nn.Linear(4, 4), small_config()))
