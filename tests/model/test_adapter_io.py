"""save_adapter / load_adapter round trips and mismatch messages (tiny UNet, reference backend)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mor_tiny import randomize_adapters, small_config, tiny_unet, unet_inputs
from torch import nn

from mor_model import MoRLinear, inject_mor, load_adapter, mor_layers, save_adapter, set_degradation


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny UNet with trained-looking adapters, its output, and the adapter directory."""
    base = tiny_unet()
    model = copy.deepcopy(base)
    inject_mor(model, small_config())
    randomize_adapters(model)
    x, t, enc = unet_inputs()
    scores = torch.rand(2, 7, generator=torch.Generator().manual_seed(9))
    set_degradation(model, scores)
    with torch.no_grad():
        y = model(x, t, enc).sample
    path = save_adapter(model, tmp_path_factory.mktemp("adapter") / "mor")
    return base, scores, y, path


def test_round_trip_is_bitwise(saved):
    base, scores, y, path = saved
    fresh = copy.deepcopy(base)
    report = load_adapter(fresh, path)  # injects with the saved config
    assert report is not None and len(report.replaced) == len(mor_layers(fresh)) == 73
    set_degradation(fresh, scores)
    x, t, enc = unet_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, enc).sample, y)
    meta = json.loads((path / "mor_adapter.json").read_text())
    assert meta["version"] == 1 and meta["config"]["top_k"] == 3 and len(meta["targets"]) == 73
    # loading into an already injected model (other backend allowed) also reproduces it
    other = copy.deepcopy(base)
    inject_mor(other, small_config(backend="auto"))
    assert load_adapter(other, path) is None
    for name, layer in mor_layers(other).items():
        for pname, p in layer.adapter_parameters().items():
            assert torch.equal(p, mor_layers(fresh)[name].adapter_parameters()[pname])


def test_mismatched_config_is_a_clear_error(saved):
    base, _, _, path = saved
    model = copy.deepcopy(base)
    inject_mor(model, small_config(top_k=2))
    with pytest.raises(ValueError, match=r"config differs \(top_k: model 2 vs file 3\)"):
        load_adapter(model, path)


def test_mismatched_targets_are_listed(saved):
    base, _, _, path = saved
    model = copy.deepcopy(base)
    inject_mor(model, small_config(target_modules=("to_q", "to_k")))
    with pytest.raises(ValueError, match="target layers of the file are not MoR layers of the model"):
        load_adapter(model, path)


def test_failed_auto_injection_leaves_the_model_unchanged(tmp_path):
    layer_model = nn.Sequential()
    layer_model.add_module("to_q", MoRLinear(nn.Linear(4, 4), small_config()))
    save_adapter(layer_model, tmp_path / "a")
    target = nn.Sequential()
    target.add_module("to_q", nn.Linear(4, 5))  # wrong shape
    with pytest.raises(ValueError, match="base_weight_shape"):
        load_adapter(target, tmp_path / "a")
    assert type(target.to_q) is nn.Linear


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to save"):
        save_adapter(nn.Linear(3, 3), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a MoR adapter directory"):
        load_adapter(nn.Linear(3, 3), tmp_path)


def _rewrite_weights(src, dst, tensors):
    """An adapter directory ``dst`` with the JSON of ``src`` and these tensors (its checksum updated)."""
    import hashlib

    from safetensors.torch import save_file

    dst.mkdir(exist_ok=True)
    save_file(tensors, str(dst / "mor_adapter.safetensors"))
    meta = json.loads((src / "mor_adapter.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((dst / "mor_adapter.safetensors").read_bytes()).hexdigest()
    (dst / "mor_adapter.json").write_text(json.dumps(meta))
    return dst


def test_extra_tensors_are_listed_and_casts_are_announced(saved, tmp_path):
    from safetensors.torch import load_file

    base, scores, y, path = saved
    tensors = load_file(str(path / "mor_adapter.safetensors"))
    copied = _rewrite_weights(path, tmp_path / "copy", {**tensors, "bogus.lora_a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"'bogus.lora_a' belongs to no target of the JSON"):
        load_adapter(copy.deepcopy(base), copied)
    _rewrite_weights(path, copied, {k: v.half() if k.endswith("lora_b") else v for k, v in tensors.items()})
    with pytest.warns(UserWarning, match="cast to the model's parameter dtype"):
        load_adapter(copy.deepcopy(base), copied)


def test_backend_override_reaches_existing_layers(saved):
    base, _, _, path = saved
    model = copy.deepcopy(base)
    inject_mor(model, small_config(backend="auto"))
    load_adapter(model, path, backend="reference")
    layers = mor_layers(model).values()
    assert all(layer.config.backend == "reference" and layer.router.backend == "reference" for layer in layers)
