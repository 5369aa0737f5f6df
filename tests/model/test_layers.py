"""MoRLinear / MoRConv2d / MoRRouter against a direct PyTorch computation of MOR_SPEC section 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mor_tiny import small_config
from torch import nn

import mor_model
from mor_model import MoRConv2d, MoRLinear, degradation, set_degradation


def dense_gate(logits: torch.Tensor, cfg) -> torch.Tensor:
    """``(U, R)`` dense gate of MOR_SPEC 2.1, computed independently of mor_kernels."""
    probs = torch.softmax(logits.double(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, : cfg.top_k]
    w = probs.gather(-1, order)
    w = w / w.sum(-1, keepdim=True)
    g = torch.zeros(logits.shape[0], cfg.num_ranks, dtype=torch.float64)
    g[:, : cfg.num_shared] = 1
    for u in range(logits.shape[0]):
        for j, slot in enumerate(order[u].tolist()):
            if slot < cfg.num_routed:
                g[u, cfg.num_shared + slot] += w[u, j]
    return g


def randomize(layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_init_like_lora_and_identity_at_init():
    torch.manual_seed(0)
    base = nn.Linear(41, 13)
    layer = MoRLinear(base, small_config())
    assert layer.base_layer is base
    assert torch.count_nonzero(layer.lora_b) == 0
    bound = 1 / math.sqrt(41)  # kaiming_uniform(a=sqrt(5)) bound, as nn.Linear / PEFT
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.5 * bound
    x = torch.randn(3, 5, 41)
    with degradation(layer, torch.rand(3, 7)):
        assert torch.equal(layer(x), base(x))
        x2 = torch.randn(3, 41)  # (B, d_in) works too
        assert torch.equal(layer(x2), base(x2))


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2)])
def test_conv_identity_at_init(kernel, stride, padding, dilation):
    torch.manual_seed(1)
    base = nn.Conv2d(5, 6, kernel, stride=stride, padding=padding, dilation=dilation)
    layer = MoRConv2d(base, small_config())
    x = torch.randn(2, 5, 9, 7)
    with degradation(layer, torch.rand(2, 7)):
        assert torch.equal(layer(x), base(x))


def test_linear_matches_direct_formula_sample_routing():
    torch.manual_seed(2)
    cfg = small_config(alpha=10.0)
    layer = MoRLinear(nn.Linear(11, 7), cfg)
    randomize(layer)
    x, s = torch.randn(3, 4, 11), torch.rand(3, 7)
    with degradation(layer, s):
        y = layer(x)
    r = layer.router.degradation
    g = dense_gate(s.double() @ r.weight.double().T + r.bias.double(), cfg)  # (B, R)
    a, b = layer.lora_a.double(), layer.lora_b.double()
    ref = layer.base_layer(x).double() + cfg.scaling * ((x.double() @ a.T) * g[:, None]) @ b.T
    assert cfg.scaling == pytest.approx(10.0 / (2 + 3))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [(3, 2, 1, 1), ((3, 1), (1, 2), (1, 0), 1), ((1, 3), 1, (0, 2), (1, 2)), (2, 1, 0, 1)],
)
def test_conv_matches_direct_formula(kernel, stride, padding, dilation):
    torch.manual_seed(3)
    cfg = small_config()
    base = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    layer = MoRConv2d(base, cfg)
    randomize(layer)
    x, s = torch.randn(2, 3, 8, 6), torch.rand(2, 7)
    with degradation(layer, s):
        y = layer(x)
    r = layer.router.degradation
    g = dense_gate(s.double() @ r.weight.double().T + r.bias.double(), cfg)
    h = F.conv2d(x.double(), layer.lora_a.double(), None, stride, padding, dilation) * g[:, :, None, None]
    ref = base(x).double() + F.conv2d(h, layer.lora_b.double()[:, :, None, None])
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router_input", ["token", "token+degradation"])
def test_token_routing_linear(router_input):
    torch.manual_seed(4)
    cfg = small_config(routing="token", router_input=router_input)
    layer = MoRLinear(nn.Linear(6, 5), cfg)
    randomize(layer)
    x, s = torch.randn(2, 3, 6), torch.rand(2, 7)
    with degradation(layer, s):
        y = layer(x)
    logits = x.double() @ layer.router.token.weight.double().T + layer.router.token.bias.double()
    if router_input == "token+degradation":
        r = layer.router.degradation
        logits = logits + (s.double() @ r.weight.double().T + r.bias.double())[:, None]
    g = dense_gate(logits.reshape(-1, cfg.num_slots), cfg).reshape(2, 3, -1)
    ref = layer.base_layer(x).double() + ((x.double() @ layer.lora_a.double().T) * g) @ layer.lora_b.double().T
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert layer.router.last_probs.shape == (6, cfg.num_slots)  # units = tokens
    assert layer.router.last_idx.shape == (6, cfg.top_k)


def test_sample_routing_on_pooled_tokens_needs_no_scores():
    layer = MoRConv2d(nn.Conv2d(3, 4, 3, padding=1), small_config(router_input="token"))
    y = layer(torch.randn(2, 3, 5, 5))  # no set_degradation needed
    assert y.shape == (2, 4, 5, 5)
    assert layer.router.last_probs.shape == (2, 6)
    assert torch.equal(layer.router.last_severity, torch.ones(2))  # no scores: standard loss


def test_conv_token_routing_is_refused():
    with pytest.raises(ValueError, match="routing='token' is not supported"):
        MoRConv2d(nn.Conv2d(3, 4, 3), small_config(routing="token", router_input="token"))


def test_different_degradations_select_different_slots():
    cfg = small_config(num_routed=6, num_zero=2, top_k=2, num_degradation_dims=3)
    layer = MoRLinear(nn.Linear(4, 4), cfg)
    with torch.no_grad():  # slot j listens to degradation dim j % 3
        w = torch.zeros(8, 3)
        for j in range(6):
            w[j, j % 3] = 5.0 + j
        layer.router.degradation.weight.copy_(w)
        layer.router.degradation.bias.zero_()
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with degradation(layer, s):
        layer(torch.randn(3, 2, 4))
    idx = layer.router.last_idx
    assert idx.tolist() == [[3, 0], [4, 1], [5, 2]]


def test_zero_slots_compute_only_shared_ranks():
    torch.manual_seed(5)
    cfg = small_config(num_zero=3, top_k=3)
    layer = MoRLinear(nn.Linear(6, 5), cfg)
    randomize(layer)
    with torch.no_grad():  # sample 0: zero slots win by far; sample 1: routed slots win
        layer.router.degradation.weight.zero_()
        layer.router.degradation.weight[4:, 0] = 50.0
        layer.router.degradation.weight[:4, 1] = 50.0
        layer.router.degradation.bias.zero_()
    x = torch.randn(2, 3, 6)
    s = torch.zeros(2, 7)
    s[0, 0] = s[1, 1] = 1.0
    with degradation(layer, s):
        y = layer(x)
    assert (layer.router.last_idx[0] == -1).all()
    assert (layer.router.last_idx[1] >= 0).all()
    S = cfg.num_shared
    shared_only = layer.base_layer(x[0]) + (x[0] @ layer.lora_a[:S].T) @ layer.lora_b[:, :S].T
    torch.testing.assert_close(y[0], shared_only, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[1], layer.base_layer(x[1]) + (x[1] @ layer.lora_a[:S].T) @ layer.lora_b[:, :S].T)


def test_missing_and_mismatched_scores_are_clear_errors():
    layer = MoRLinear(nn.Linear(4, 4), small_config())
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="set_degradation"):
        layer(x)
    set_degradation(layer, torch.rand(3, 7))
    with pytest.raises(ValueError, match="batch size 3.*batch size 2"):
        layer(x)
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        set_degradation(layer, torch.rand(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        set_degradation(layer, torch.ones(2, 7, dtype=torch.long))
    set_degradation(layer, torch.rand(2, 7))
    layer(x)
    set_degradation(layer, None)
    with pytest.raises(RuntimeError, match="set_degradation"):
        layer(x)


def test_model_level_scores_are_checked_once_before_any_router_changes():
    """set_degradation checks scores and severity once for the whole model (then sets every router directly): a bad
    call names the argument and leaves every router as it was; the routers get the detached float32 severity."""
    cfg = small_config()
    model = nn.Sequential(MoRLinear(nn.Linear(4, 4), cfg), MoRLinear(nn.Linear(4, 4), cfg))
    good = torch.rand(2, 7)
    set_degradation(model, good)
    bad_calls = [
        ((torch.rand(2, 5),), ValueError, r"\(B, 7\)"),
        ((torch.rand(2, 7), torch.rand(3)), ValueError, r"severity must be a tensor of shape \(2,\)"),
        ((torch.rand(2, 7), [0.1, 0.2]), ValueError, "severity must be a tensor"),
        (([[0.0] * 7],), TypeError, "scores must be a torch.Tensor"),
    ]
    for args, error, message in bad_calls:
        with pytest.raises(error, match=message):
            set_degradation(model, *args)
        assert all(layer.router._scores is good for layer in model)
    mixed = nn.Sequential(MoRLinear(nn.Linear(4, 4), cfg),
                          MoRLinear(nn.Linear(4, 4), small_config(num_degradation_dims=5)))  # fmt: skip
    with pytest.raises(ValueError, match=r"different num_degradation_dims \[5, 7\]"):
        set_degradation(mixed, torch.rand(2, 7))
    assert all(layer.router._scores is None for layer in mixed)
    severity = torch.tensor([0.25, 0.5], dtype=torch.float64, requires_grad=True)
    set_degradation(model, good, severity)
    for layer in model:
        assert layer.router._scores is good and layer.router._severity.dtype == torch.float32
        assert not layer.router._severity.requires_grad and layer.router._severity.tolist() == [0.25, 0.5]
        assert layer._image_state is model[0]._image_state is not None  # one shared per-image state


def test_context_manager_restores_previous_scores_and_severity():
    layer = MoRLinear(nn.Linear(4, 4), small_config())
    s1, s2 = torch.rand(2, 7), torch.rand(2, 7)
    set_degradation(layer, s1)
    with degradation(layer, s2, severity=torch.tensor([0.25, 0.5])):
        layer(torch.randn(2, 4))
        assert torch.equal(layer.router.last_severity, torch.tensor([0.25, 0.5]))
    layer(torch.randn(2, 4))
    assert torch.allclose(layer.router.last_severity, s1.mean(-1))


def test_base_state_dict_keys_load_into_wrapped_layer():
    base = nn.Linear(4, 3)
    layer = MoRLinear(nn.Linear(4, 3), small_config())
    result = layer.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(layer.adapter_parameters())
    assert torch.equal(layer.base_layer.weight, base.weight) and torch.equal(layer.base_layer.bias, base.bias)
    layer.load_state_dict(layer.state_dict())  # its own keys still load strictly


def test_base_state_dict_has_the_original_keys():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    mor_model.inject_mor(model, small_config(target_modules=("0",)))
    exported = mor_model.base_state_dict(model)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_autocast_runs_in_the_autocast_dtype_like_the_base_layer():
    torch.manual_seed(6)
    lin, conv = nn.Linear(8, 6), nn.Conv2d(3, 4, 3, padding=1)
    layers = MoRLinear(lin, small_config()), MoRConv2d(conv, small_config())
    inputs = torch.randn(2, 5, 8), torch.randn(2, 3, 6, 6)
    for layer, base, x in zip(layers, (lin, conv), inputs, strict=True):
        set_degradation(layer, torch.rand(2, 7))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, ref = layer(x), base(x)
            y.float().sum().backward()
        assert y.dtype == ref.dtype == torch.bfloat16
        assert torch.equal(y, ref)  # lora_b = 0 at init
        assert layer.lora_b.grad.dtype == torch.float32 and layer.lora_b.grad.abs().sum() > 0


def test_gradients_reach_adapters_and_router_not_base():
    layer = MoRLinear(nn.Linear(4, 3), small_config())
    layer.base_layer.requires_grad_(False)
    randomize(layer)
    with degradation(layer, torch.rand(2, 7)):
        layer(torch.randn(2, 5, 4)).square().sum().backward()
    for name, p in layer.adapter_parameters().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.base_layer.weight.grad is None


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Linear"):
        MoRLinear(nn.Conv2d(3, 3, 1), small_config())
    with pytest.raises(ValueError, match="groups"):
        MoRConv2d(nn.Conv2d(4, 4, 3, groups=2), small_config())
    with pytest.raises(TypeError, match="MoRConfig"):
        MoRLinear(nn.Linear(3, 3), {"num_shared": 2})
    layer = MoRConv2d(nn.Conv2d(3, 3, 1), small_config())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        layer(torch.randn(3, 4, 4))
    assert mor_model.mor_layers(layer) == {"": layer}


def test_routing_is_the_same_under_autocast():
    """Router logits stay float32 inside torch.autocast, so mixed precision picks the same slots."""
    torch.manual_seed(0)
    layer = MoRLinear(nn.Linear(16, 16), small_config(num_shared=2, num_routed=32, num_zero=4, top_k=8))
    for p in layer.router.parameters():
        nn.init.normal_(p, std=3.0)
    scores = torch.rand(512, 7)
    x = torch.randn(512, 3, 16)
    with degradation(layer, scores), torch.no_grad():
        layer(x)
        plain = layer.router.last_idx.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    assert torch.equal(layer.router.last_idx, plain)


def test_adapters_are_float32_on_a_half_precision_base():
    layer = MoRLinear(nn.Linear(8, 8).half(), small_config())
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.float16
    set_degradation(layer, torch.rand(2, 7))
    x = torch.randn(2, 3, 8, dtype=torch.float16)
    assert layer(x).dtype == torch.float16


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_string_padding(padding):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=padding, dilation=2)
    layer = MoRConv2d(base, small_config())
    randomize(layer)
    x = torch.randn(2, 3, 9, 9)
    with degradation(layer, torch.rand(2, 7)), torch.no_grad():
        y = layer(x)
    assert y.shape == base(x).shape
    assert mor_model.layers.conv_unsupported_reason(nn.Conv2d(3, 4, 2, padding="same")) is not None  # uneven


def test_token_router_checks_the_batch_of_the_scores():
    cfg = small_config(routing="token", router_input="token")
    layer = MoRLinear(nn.Linear(8, 8), cfg)
    layer.router.set_degradation(torch.rand(3, 7))  # severity for 3 samples, input has 2
    with pytest.raises(ValueError, match="batch size 3 but the layer input has batch size 2"):
        layer(torch.randn(2, 4, 8))


@pytest.mark.parametrize("router_input", ["token", "token+degradation"])
def test_sample_routing_pools_the_mean_token_linear(router_input):
    """Sample routing with a token router: the logits come from the mean of each sample's tokens (checked
    against a hand-computed router output, so pooling the first or last token, or the sum, would fail)."""
    torch.manual_seed(11)
    cfg = small_config(router_input=router_input)
    layer = MoRLinear(nn.Linear(6, 5), cfg)
    randomize(layer, seed=5)
    x, s = torch.randn(3, 4, 6) * 2, torch.rand(3, 7)
    with degradation(layer, s):
        y = layer(x)
    t = layer.router.token
    logits = x.double().mean(dim=1) @ t.weight.double().T + t.bias.double()  # (B, E + Z)
    if router_input == "token+degradation":
        r = layer.router.degradation
        logits = logits + s.double() @ r.weight.double().T + r.bias.double()
    torch.testing.assert_close(layer.router.last_probs.double(), torch.softmax(logits, -1), atol=1e-6, rtol=1e-6)
    g = dense_gate(logits, cfg)  # (B, R)
    ref = layer.base_layer(x).double() + ((x.double() @ layer.lora_a.double().T) * g[:, None]) @ layer.lora_b.double().T
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    # the check can fail: the first token alone gives other probabilities here
    first = x.double()[:, 0] @ t.weight.double().T + t.bias.double()
    if router_input == "token+degradation":
        first = first + s.double() @ layer.router.degradation.weight.double().T + layer.router.degradation.bias.double()
    assert not torch.allclose(torch.softmax(first, -1), layer.router.last_probs.double(), atol=1e-3)


@pytest.mark.parametrize("router_input", ["token", "token+degradation"])
def test_sample_routing_pools_the_mean_pixel_conv(router_input):
    """The same for a conv: the token router reads the mean over H x W of each channel."""
    torch.manual_seed(12)
    cfg = small_config(router_input=router_input)
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = MoRConv2d(base, cfg)
    randomize(layer, seed=6)
    x, s = torch.randn(2, 3, 5, 7) * 2, torch.rand(2, 7)
    with degradation(layer, s):
        y = layer(x)
    t = layer.router.token
    logits = x.double().mean(dim=(2, 3)) @ t.weight.double().T + t.bias.double()
    if router_input == "token+degradation":
        r = layer.router.degradation
        logits = logits + s.double() @ r.weight.double().T + r.bias.double()
    torch.testing.assert_close(layer.router.last_probs.double(), torch.softmax(logits, -1), atol=1e-6, rtol=1e-6)
    g = dense_gate(logits, cfg)
    h = F.conv2d(x.double(), layer.lora_a.double(), None, 1, 1) * g[:, :, None, None]
    ref = base(x).double() + F.conv2d(h, layer.lora_b.double()[:, :, None, None])
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
