"""mor_model.testing.tiny_model: writes a complete tiny model directory offline, quickly, reproducibly."""

import json
import time

import pytest
import torch

pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
pytest.importorskip("open_clip", reason="the [model] extra (open_clip_torch) is not installed")

from mor_model.adapter_io import read_adapter_config  # noqa: E402
from mor_model.sr.loading import ADAPTER_DIR, CLIP_DIR, VAE_ADAPTER_DIR  # noqa: E402
from mor_model.testing import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    out = tiny_model(path)
    return out, time.perf_counter() - start


def test_layout_and_speed(tiny):
    path, seconds = tiny
    assert seconds < 60, f"tiny_model took {seconds:.1f} s"
    for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", ADAPTER_DIR, VAE_ADAPTER_DIR, CLIP_DIR):
        assert (path / d).is_dir(), d
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "MoRSRPipeline"
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon" and sched["beta_schedule"] == "scaled_linear"


def test_components_load(tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from mor_model.estimator import DegradationEstimator

    path, _ = tiny
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    vae = AutoencoderKL.from_pretrained(path / "vae")
    text = CLIPTextModel.from_pretrained(path / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert vae.config.latent_channels == unet.config.in_channels == 4
    # every text tokenizes without the unknown token (the byte alphabet is in the vocabulary)
    ids = tok(["A photo of Ünïcode & digits 123!"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tok.bos_token_id
    words = ids[0][(ids[0] != tok.pad_token_id) & (ids[0] != tok.bos_token_id)]
    assert len(words) > 5
    assert tok.decode(ids[0], skip_special_tokens=True).replace(" ", "") == "aphotoofünïcode&digits123!"
    with torch.no_grad():
        hidden = text(ids)[0]
    assert hidden.shape == (1, 77, 32) and torch.isfinite(hidden).all()
    est = DegradationEstimator.from_local(path / CLIP_DIR)
    scores = est(torch.rand(2, 3, 20, 24))
    assert scores.shape == (2, 7) and ((scores > 0) & (scores < 1)).all()


def test_adapter_is_not_a_noop(tiny):
    from safetensors.torch import load_file

    path, _ = tiny
    config, meta = read_adapter_config(path / ADAPTER_DIR)
    assert config.num_degradation_dims == 7
    assert any("conv" in name for name in meta["targets"]) and any("to_q" in name for name in meta["targets"])
    tensors = load_file(str(path / ADAPTER_DIR / "mor_adapter.safetensors"))
    lora_b = [t for k, t in tensors.items() if k.endswith("lora_b")]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
    _, vae_meta = read_adapter_config(path / VAE_ADAPTER_DIR)
    assert "quant_conv" in vae_meta["targets"]
    assert all(n.startswith("encoder.") or n == "quant_conv" for n in vae_meta["targets"])


def test_reproducible(tiny, tmp_path):
    path, _ = tiny
    again = tiny_model(tmp_path / "again", vae_adapter=False)
    from safetensors.torch import load_file

    def tensors(p):
        return load_file(str(p / ADAPTER_DIR / "mor_adapter.safetensors"))

    first, second = tensors(path), tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not (again / VAE_ADAPTER_DIR).exists()
    other = tensors(tiny_model(tmp_path / "other", seed=1, vae_adapter=False))
    assert not all(torch.equal(first[k], other[k]) for k in first)
