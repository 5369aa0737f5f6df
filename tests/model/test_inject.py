"""inject_mor / remove_mor on tiny diffusers models built from config dicts (backend "reference")."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mor_tiny import randomize_adapters, small_config, tiny_unet, tiny_vae, unet_inputs
from torch import nn

import mor_model
from mor_model import MoRConfig, MoRLayer, inject_mor, mor_layers, remove_mor, set_degradation, trainable_parameters

ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def expected_targets(model: nn.Module) -> set[str]:
    """OSEDiff's rule written independently: attention/FF linears by suffix, every Conv2d named *conv*."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in ATTN_FF):
            out.add(name)
        elif isinstance(m, nn.Conv2d) and "conv" in name:
            out.add(name)
    return out


def test_config_defaults_and_validation():
    cfg = MoRConfig()
    assert (cfg.num_shared, cfg.num_routed, cfg.num_zero, cfg.top_k) == (8, 32, 4, 8)
    assert cfg.scaling == 1.0 and cfg.routing == "sample" and cfg.router_input == "degradation"
    assert cfg.balance_alpha == 0.01 and cfg.num_degradation_dims == 7 and cfg.backend == "auto"
    assert MoRConfig(alpha=20).scaling == pytest.approx(20 / 16)
    assert MoRConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="top_k"):
        MoRConfig(top_k=37)
    with pytest.raises(TypeError, match="num_shared"):
        MoRConfig(num_shared=2.5)
    with pytest.raises(ValueError, match="routing"):
        MoRConfig(routing="pixel")
    with pytest.raises(ValueError, match="per-token router input"):
        MoRConfig(routing="token")
    with pytest.raises(ValueError, match="backend"):
        MoRConfig(backend="gpu")
    with pytest.raises(TypeError, match="target_modules"):
        MoRConfig(target_modules="to_q")
    with pytest.raises(ValueError, match="bad regular expression"):
        MoRConfig(target_modules=("re:conv(",))
    with pytest.raises(ValueError, match="unknown MoRConfig fields"):
        MoRConfig.from_dict({"rank": 4})


def test_unet_injection_count_identity_and_removal():
    unet = tiny_unet()
    x, t, enc = unet_inputs()
    with torch.no_grad():
        y0 = unet(x, t, enc).sample
    originals = {n: m for n, m in unet.named_modules()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    report = inject_mor(unet, small_config())
    expected = expected_targets(copy.deepcopy(tiny_unet()))
    assert set(report.replaced) == expected and len(report.replaced) == len(expected) == 73
    assert {"conv_in", "conv_out", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"} <= expected
    assert set(mor_layers(unet)) == expected
    assert "conv_norm_out" in report.skipped and "GroupNorm" in report.skipped["conv_norm_out"]

    # identity at init: every MoR layer reproduces its base layer bitwise ...
    mismatches = []

    def check(layer, inputs, output):
        if not torch.equal(output, layer.base_layer(inputs[0])):
            mismatches.append(layer)

    handles = [m.register_forward_hook(check) for m in mor_layers(unet).values()]
    set_degradation(unet, torch.rand(2, 7))
    with torch.no_grad():
        y1 = unet(x, t, enc).sample
    for h in handles:
        h.remove()
    assert not mismatches
    # ... and the model output equals the base output (only float rounding of downstream ops on
    # differently-strided activations may differ).
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)

    removed = remove_mor(unet)
    assert set(removed) == expected and not mor_layers(unet)
    assert all(unet.get_submodule(n) is originals[n] for n in expected)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(unet(x, t, enc).sample, y0)


def test_training_step_changes_only_adapters_and_routers():
    unet = tiny_unet()
    inject_mor(unet, small_config())
    params = trainable_parameters(unet)
    assert params and all(".lora_" in n or ".router." in n for n in params)
    assert all(p.requires_grad for p in params.values())
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, enc = unet_inputs()
    # everything left trainable is an adapter or router parameter (inject_mor freezes the rest, as PEFT)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params.values()}
    opt = torch.optim.SGD(trainable, lr=0.1)
    set_degradation(unet, torch.rand(2, 7))
    loss = unet(x, t, enc).sample.square().mean() + mor_model.balance_loss(unet)
    loss.backward()
    opt.step()
    after = unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the step changed nothing"
    assert all(".lora_" in k or ".router." in k for k in changed), sorted(changed)[:5]
    assert any(k.endswith("lora_b") for k in changed) and any(".router.degradation" in k for k in changed)
    assert all(p.grad is None for n, p in unet.named_parameters() if ".base_layer." in n)  # frozen by inject
    remove_mor(unet)  # unfreezes what inject froze
    assert all(p.requires_grad for p in unet.parameters())


def test_freeze_base_false_freezes_only_the_wrapped_layers():
    unet = tiny_unet()
    inject_mor(unet, small_config(), freeze_base=False)
    assert unet.conv_norm_out.weight.requires_grad  # not a target: untouched
    assert not unet.conv_in.base_layer.weight.requires_grad


def test_vae_encoder_injection_and_removal():
    vae = tiny_vae()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z0 = vae.encode(img).latent_dist.mean
    convs = {n for n, m in vae.encoder.named_modules() if isinstance(m, nn.Conv2d)}
    report = inject_mor(vae.encoder, small_config(target_modules=("re:conv", "to_q", "to_k", "to_v", "to_out.0")))
    assert set(report.replaced) == convs | {f"mid_block.attentions.0.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    set_degradation(vae.encoder, torch.rand(2, 7))
    with torch.no_grad():
        z1 = vae.encode(img).latent_dist.mean
    torch.testing.assert_close(z1, z0, atol=1e-5, rtol=1e-5)
    remove_mor(vae.encoder)
    with torch.no_grad():
        assert torch.equal(vae.encode(img).latent_dist.mean, z0)


class FakePeftLinear(nn.Module):
    """PEFT's LoraLayer layout: ``base_layer`` plus its own low-rank path."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = FakePeftLinear(nn.Linear(4, 4))
        self.to_k = nn.Linear(4, 4)
        self.conv_dw = nn.Conv2d(4, 4, 3, groups=4)
        self.conv_reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)


def test_peft_wrapped_layers_and_unsupported_convs():
    torch.manual_seed(0)
    block = Block()
    peft = block.to_q
    x = torch.randn(2, 3, 4)
    y0 = peft(x)
    report = inject_mor(block, small_config(target_modules=("to_q", "to_k", "re:conv")))
    assert sorted(report.replaced) == ["conv1", "to_k", "to_q.base_layer"]
    assert block.to_q is peft and isinstance(peft.base_layer, MoRLayer)  # PEFT's wrapper is kept
    assert "groups=4" in report.skipped["conv_dw"] and "reflect" in report.skipped["conv_reflect"]
    set_degradation(block, torch.rand(2, 7))
    assert torch.equal(peft(x), y0)
    again = inject_mor(block, small_config(target_modules=("to_k", "to_q")))
    assert not again.replaced and "already" in again.skipped["to_k"] and "already" in again.skipped["to_q.base_layer"]
    remove_mor(block)
    assert isinstance(peft.base_layer, nn.Linear) and not isinstance(peft.base_layer, MoRLayer)


def test_real_peft_adapters_keep_their_own_lora_layers():
    """diffusers' ``add_adapter`` (PEFT) wraps convs and linears; with the default targets (``re:conv``
    matches PEFT's ``conv1.lora_A.default`` too) only the wrapped base layers get MoR adapters."""
    peft = pytest.importorskip("peft", reason="peft is part of the 'dev' extra")
    unet = tiny_unet()
    x, t, enc = unet_inputs()
    unet.add_adapter(
        peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "conv1", "conv_in"], init_lora_weights="gaussian")
    )
    with torch.no_grad():
        y0 = unet(x, t, enc).sample
    peft_names = {n for n, m in unet.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)}
    report = inject_mor(unet, small_config())
    assert len(report.replaced) == 73 and not [n for n in report.replaced if ".lora_" in n]
    assert {f"{n}.base_layer" for n in peft_names} <= set(report.replaced)
    assert not [n for n in report.skipped if ".lora_" in n]
    set_degradation(unet, torch.rand(2, 7))
    with torch.no_grad():  # MoR starts as the identity around PEFT's base layers: PEFT's output is kept
        torch.testing.assert_close(unet(x, t, enc).sample, y0, atol=1e-5, rtol=1e-5)


def test_no_match_and_bad_arguments():
    with pytest.raises(ValueError, match="no module name matches"):
        inject_mor(nn.Sequential(nn.Linear(3, 3)), small_config(target_modules=("to_q",)))
    with pytest.raises(TypeError, match="MoRConfig"):
        inject_mor(nn.Linear(3, 3), {"top_k": 2})
    with pytest.raises(ValueError, match="no MoR layers"):
        set_degradation(nn.Linear(3, 3), torch.rand(1, 7))


def test_token_routing_skips_convs_and_runs_without_scores():
    unet = tiny_unet()
    report = inject_mor(unet, small_config(routing="token", router_input="token"))
    assert all(isinstance(unet.get_submodule(n).base_layer, nn.Linear) for n in report.replaced)
    assert "token" in report.skipped["conv_in"]
    x, t, enc = unet_inputs()
    with torch.no_grad():
        assert unet(x, t, enc).sample.shape == x.shape
    loss = mor_model.balance_loss(unet)
    assert torch.isfinite(loss)


def test_base_state_dict_loads_into_injected_model():
    base = tiny_unet(seed=0)
    x, t, enc = unet_inputs()
    with torch.no_grad():
        y0 = base(x, t, enc).sample
    other = tiny_unet(seed=7)
    inject_mor(other, small_config())
    result = other.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(trainable_parameters(other))
    set_degradation(other, torch.rand(2, 7))
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, enc).sample, y0, atol=1e-5, rtol=1e-5)
    randomize_adapters(other)
    with torch.no_grad():
        assert not torch.allclose(other(x, t, enc).sample, y0, atol=1e-3)
