"""Per-image inference of MoR layers (mor_model.inference, set_merge): the same outputs as the per-call path
within MOR_SPEC 7, routing once per scores, merged weights made once per image and dropped with its scores."""

from __future__ import annotations

import pytest
import torch
from mor_tiny import randomize_adapters, small_config, tiny_unet, unet_inputs
from torch import nn

import mor_model
from mor_kernels.testing import TOLERANCES
from mor_model import degradation, inject_mor, mor_layers, set_degradation, set_merge

pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
ATOL, RTOL = TOLERANCES[torch.float32]


@pytest.fixture()
def unet():
    model = tiny_unet()
    inject_mor(model, small_config(backend="auto"))
    randomize_adapters(model)
    return model


def _forward(model, *, grad=False):
    x, t, enc = unet_inputs()
    with torch.set_grad_enabled(grad):
        return model(x, t, encoder_hidden_states=enc).sample.detach()


SCORES = torch.rand(2, 7, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_prepared_inference_matches_the_per_call_path(unet, mode):
    set_merge(unet, mode)
    set_degradation(unet, SCORES)
    want = _forward(unet, grad=True)  # a gradient is needed: every layer runs the MoR op per call
    assert all(layer.explain().startswith("per call") for layer in mor_layers(unet).values())
    want_idx = {n: layer.router.last_idx.clone() for n, layer in mor_layers(unet).items()}
    want_loss = mor_model.balance_loss(unet).item()
    got = _forward(unet)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    paths = [layer.explain() for layer in mor_layers(unet).values()]
    prefix = {"always": ("merged",), "never": ("low-rank",), "auto": ("merged", "low-rank")}[mode]
    assert all(p.startswith(prefix) for p in paths), paths
    if mode == "auto":  # the tiny model's layers have many tokens per weight: the cost model merges some
        assert any(p.startswith("merged") for p in paths) and "rho" in paths[0]
    # the routers record what they record per call: statistics and the balance loss see the same routing
    for name, layer in mor_layers(unet).items():
        assert torch.equal(layer.router.last_idx, want_idx[name]), name
    assert mor_model.balance_loss(unet).item() == pytest.approx(want_loss, rel=1e-6)


def test_a_forward_that_needs_gradients_casts_the_base_weights_once(unet, monkeypatch):
    """With per-image state set, a training forward (a gradient needed) goes straight to the per-call path:
    the base operands are cast to the autocast dtype once per layer (by the op's operands), not once more for a
    lookup of the state that a gradient rules out (an extra weight-sized copy per layer and step)."""
    from mor_model.layers import MoRLayer

    set_degradation(unet, SCORES)
    calls = []
    real = MoRLayer._base_operands
    monkeypatch.setattr(MoRLayer, "_base_operands", lambda self, x: calls.append(self) or real(self, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _forward(unet, grad=True)
    layers = list(mor_layers(unet).values())
    assert len(calls) == len(layers) and {id(c) for c in calls} == {id(layer) for layer in layers}
    assert all(layer.explain().startswith("per call") and "a gradient is needed" in layer.explain() for layer in layers)


def test_routing_once_per_scores_and_merged_weights_once_per_image(unet, monkeypatch):
    set_merge(unet, "always")
    merges, routes = [], []
    real_merge = mor_model.inference._merged_weights  # by the BLAS op or from the rank factors
    monkeypatch.setattr("mor_model.inference._merged_weights", lambda *a: merges.append(1) or real_merge(*a))
    real_route = mor_model.inference.mor_kernels.route
    monkeypatch.setattr(
        mor_model.inference.mor_kernels, "route", lambda *a, **k: routes.append(1) or real_route(*a, **k)
    )
    layers = mor_layers(unet)
    set_degradation(unet, SCORES)
    first = _forward(unet)
    assert len(merges) == len(layers) and len(routes) == 1  # every layer routed in one call
    state = next(iter(layers.values()))._image_state
    weights = {n: state._entries[id(layer)].merged for n, layer in layers.items()}
    assert torch.equal(_forward(unet), first)  # a second tile of the same image: nothing made again
    assert len(merges) == len(layers) and len(routes) == 1
    assert all(state._entries[id(layer)].merged is weights[n] for n, layer in layers.items())
    set_degradation(unet, SCORES.flip(0))  # the next image: a new state, the old merged weights dropped
    assert all(layer._image_state is not state for layer in layers.values())
    _forward(unet)
    assert len(merges) == 2 * len(layers) and len(routes) == 2
    set_degradation(unet, None)
    assert all(layer._image_state is None for layer in layers.values())


def test_weights_changed_in_place_are_prepared_again(unet):
    set_degradation(unet, SCORES)
    before = _forward(unet)
    layer = next(iter(mor_layers(unet).values()))
    with torch.no_grad():
        layer.lora_b.mul_(3)  # as load_adapter does: copy_ into the parameters
    after = _forward(unet)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _forward(unet, grad=True), atol=ATOL, rtol=RTOL)


def _routed_per_layer(layers):
    """Each router's own forward on the scores (what a forward that needs gradients records)."""
    probs, idx = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.router(SCORES)
            probs[name], idx[name] = layer.router.last_probs.clone(), layer.router.last_idx.clone()
    return probs, idx


def test_routers_share_one_gemm_and_restack_when_a_router_changes(unet):
    """The per-image routing computes every router's logits in one GEMM over the stacked router weights: the
    same picks as each router on its own and the same probabilities up to float32 rounding (one GEMM's blocking
    against another's); a router weight changed in place or replaced is seen at the next image (the stack is
    made again)."""
    layers = mor_layers(unet)
    first = next(iter(layers.values()))
    for change in (None, "in place", "replaced"):
        if change == "in place":
            with torch.no_grad():
                first.router.degradation.weight.mul_(-2)
        elif change == "replaced":
            first.router.degradation.bias = nn.Parameter(first.router.degradation.bias.detach() + 3)
        set_degradation(unet, SCORES)
        want, want_idx = _routed_per_layer(layers)
        _forward(unet)
        for name, layer in layers.items():
            torch.testing.assert_close(layer.router.last_probs, want[name], rtol=1e-6, atol=1e-7, msg=name)
            assert torch.equal(layer.router.last_idx, want_idx[name]), (change, name)
            assert torch.equal(layer.router.last_severity, SCORES.float().mean(-1)), name  # the default severity
    severity = torch.arange(1.0, SCORES.shape[0] + 1)
    set_degradation(unet, SCORES, severity)
    _forward(unet)
    assert all(torch.equal(layer.router.last_severity, severity) for layer in layers.values())


def test_half_precision_model_casts_its_float32_adapters_once_not_per_call():
    """A bfloat16 model keeps float32 adapters; on the fused path their bfloat16 copies are made once and reused
    across images until a parameter changes in place (then made again); the output matches the per-call path."""
    model = tiny_unet().to(torch.bfloat16)
    inject_mor(model, small_config(backend="auto"))
    randomize_adapters(model)
    set_merge(model, "never")
    layers = list(mor_layers(model).values())
    assert layers[0].lora_a.dtype == torch.float32
    x, t, enc = (v.to(torch.bfloat16) if v.is_floating_point() else v for v in unet_inputs())

    def forward(scores, grad=False):
        set_degradation(model, scores)
        with torch.set_grad_enabled(grad):
            return model(x, t, encoder_hidden_states=enc).sample.detach().float()

    forward(SCORES)
    assert all("low-rank (backend" in layer.explain() for layer in layers), layers[0].explain()
    copies = [layer.__dict__["_cast_adapters"][3:] for layer in layers]
    assert all(c[0].dtype == torch.bfloat16 and c[1].dtype == torch.bfloat16 for c in copies)
    forward(SCORES.flip(0))  # the next image: the same copies
    assert all(layer.__dict__["_cast_adapters"][3] is c[0] for layer, c in zip(layers, copies, strict=True))
    with torch.no_grad():
        layers[0].lora_b.mul_(2)  # as an optimizer step or load_adapter: in place
    got = forward(SCORES)
    assert layers[0].__dict__["_cast_adapters"][4] is not copies[0][1]
    assert torch.equal(layers[0].__dict__["_cast_adapters"][4], layers[0].lora_b.to(torch.bfloat16))
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(got, forward(SCORES, grad=True), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_layers_check_their_arguments_once_then_call_the_backend(backend, monkeypatch):
    """On a fused backend's path (not "blas", whose public op is already direct) the first image's calls go
    through the public ops and their checks; the next images' calls of the same sizes go to the backend
    directly, with the same results."""
    from mor_kernels import dispatch, functional

    for op in ("mor_linear", "mor_conv2d"):
        why = dispatch.unavailable_reason(backend, op, torch.device("cpu"))
        if why is not None:
            pytest.skip(f"{backend}: {why}")
    model = tiny_unet()
    inject_mor(model, small_config(backend=backend))
    randomize_adapters(model)
    set_merge(model, "never")
    set_degradation(model, SCORES)
    first = _forward(model)
    assert all(f"backend {backend!r}" in layer.explain() for layer in mor_layers(model).values())
    checks = []
    for name in ("check_mor_linear", "check_mor_conv2d"):
        real = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, _real=real, **k: checks.append(1) or _real(*a, **k))
    set_degradation(model, SCORES)  # the next image (the same scores)
    assert torch.equal(_forward(model), first)
    assert checks == []
    set_degradation(model, SCORES.flip(0))
    torch.testing.assert_close(_forward(model), _forward(model, grad=True), atol=ATOL, rtol=RTOL)


def test_degradation_context_restores_the_previous_image(unet):
    set_degradation(unet, SCORES)
    layers = list(mor_layers(unet).values())
    state = layers[0]._image_state
    outer = _forward(unet)
    with degradation(unet, SCORES.flip(0)):
        assert layers[0]._image_state is not state
        inner = _forward(unet)
    assert all(layer._image_state is state for layer in layers)
    assert torch.equal(_forward(unet), outer) and not torch.equal(inner, outer)


def test_token_routed_layers_run_per_call_and_say_why():
    layer = mor_model.MoRLinear(nn.Linear(6, 5), small_config(router_input="token+degradation", backend="auto"))
    randomize_adapters(layer)
    x = torch.randn(2, 3, 6)
    set_degradation(layer, SCORES)
    with torch.no_grad():
        y = layer(x)
    assert layer.explain().startswith("per call") and "depends on the tokens" in layer.explain()
    torch.testing.assert_close(y, layer(x).detach(), atol=ATOL, rtol=RTOL)


def test_set_merge_checks_its_arguments(unet):
    assert len(set_merge(unet, "never")) == len(mor_layers(unet))
    assert {layer.merge for layer in mor_layers(unet).values()} == {"never"}
    with pytest.raises(ValueError, match="mode must be one of"):
        set_merge(unet, "sometimes")
    with pytest.raises(ValueError, match="no MoR layers"):
        set_merge(nn.Linear(2, 2), "auto")


def test_rank_factors_only_where_used_and_plans_kept_across_images(unet, monkeypatch):
    """The fused backends gather the active ranks inside their op, so a layer they run never gathers the
    per-image rank factors; the merged and reference low-rank paths gather them once per image. A layer's
    per-size plan (merge or not, which backend) outlives the image; set_merge and dispatch.clear_cache make it
    again."""
    from mor_kernels import dispatch
    from mor_model import inference

    gathers, plans = [], []
    real_factors, real_plan = inference.rank_factors, inference._plan
    monkeypatch.setattr(inference, "rank_factors", lambda *a, **k: gathers.append(1) or real_factors(*a, **k))
    monkeypatch.setattr(inference, "_plan", lambda *a, **k: plans.append(1) or real_plan(*a, **k))
    layers = mor_layers(unet)

    def image(scores):
        gathers.clear()
        set_degradation(unet, scores)
        _forward(unet)
        _forward(unet)  # a second tile of the image
        paths = [layer.explain() for layer in layers.values()]
        factor_users = [(p.startswith("merged") and "blas_merged_weights" not in p) or "rank factors prepared" in p
                        for p in paths]  # fmt: skip
        return sum(factor_users), paths

    set_merge(unet, "never")
    users, paths = image(SCORES)
    assert len(gathers) == users
    if dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32).backend != "reference":
        assert users == 0 and all("routing prepared per image" in p for p in paths), paths
    first = len(plans)
    assert first >= len(layers)
    users, _ = image(SCORES.flip(0))  # the next image: same sizes, no new plan
    assert len(plans) == first and len(gathers) == users
    set_merge(unet, "always")
    users, paths = image(SCORES)
    assert len(plans) == 2 * first and users == len(gathers)
    assert all(p.startswith("merged") for p in paths)
    blas = dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32).backend == "blas"
    assert users == (0 if blas else len(layers))  # the BLAS op makes merged weights without the factors
    dispatch.clear_cache()
    image(SCORES)
    assert len(plans) == 3 * first
