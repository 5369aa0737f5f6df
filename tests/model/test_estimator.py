"""DegradationEstimator on a tiny random open_clip model built from a config dict (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mor_tiny import CLIP_CONFIG

from mor_model import DEFAULT_PROMPT_PAIRS, DegradationEstimator

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is part of the 'model' extra")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the estimator tried to download something")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)


@pytest.fixture(scope="module")
def estimator():
    torch.manual_seed(0)
    return DegradationEstimator.from_config(CLIP_CONFIG)


def direct_scores(est: DegradationEstimator, images: torch.Tensor) -> torch.Tensor:
    """MOR_SPEC section 3 written out in float64 from the CLIP embeddings."""
    with torch.no_grad():
        img = F.normalize(est.clip.encode_image(est.preprocess(images)).double(), dim=-1)
        prompts = [p for pair in DEFAULT_PROMPT_PAIRS for p in pair]
        txt = F.normalize(est.clip.encode_text(est.tokenizer(prompts)).double(), dim=-1)
        tau = est.clip.logit_scale.double().exp()
    cos = img @ txt.T  # (B, 14)
    c_p, c_n = cos[:, 0::2], cos[:, 1::2]
    return torch.exp(tau * c_n) / (torch.exp(tau * c_p) + torch.exp(tau * c_n))


def test_scores_shape_range_and_formula(estimator):
    images = torch.rand(3, 3, 40, 56)
    scores = estimator(images)
    assert scores.shape == (3, 7) and scores.dtype == torch.float32
    assert (scores > 0).all() and (scores < 1).all()
    torch.testing.assert_close(scores.double(), direct_scores(estimator, images), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(estimator.severity(scores), scores.mean(-1))
    assert estimator.tau.item() == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init logit scale


def test_batch_and_single_agree_at_any_size(estimator):
    torch.manual_seed(1)
    images = torch.rand(4, 3, 33, 21)
    batch = estimator(images)
    single = torch.cat([estimator(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=1e-6)
    for h, w in [(32, 32), (17, 90), (128, 64)]:
        assert estimator(torch.rand(2, 3, h, w)).shape == (2, 7)


def test_preprocess_resizes_and_normalises(estimator):
    x = torch.full((1, 3, 50, 70), 0.5)
    pixels = estimator.preprocess(x)
    assert pixels.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(pixels[0, :, 5, 5], expected)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        estimator.preprocess(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float"):
        estimator.preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_text_embeddings_are_cached(monkeypatch):
    est = DegradationEstimator.from_config(CLIP_CONFIG)
    calls = []
    original = est.clip.encode_text
    monkeypatch.setattr(est.clip, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    est(torch.rand(1, 3, 32, 32))
    est(torch.rand(2, 3, 32, 32))
    assert len(calls) == 1
    assert est.text_embeddings().shape == (7, 2, 16)


def test_save_local_and_from_local_round_trip(tmp_path, estimator):
    images = torch.rand(2, 3, 32, 32)
    estimator.save_local(tmp_path / "clip")
    loaded = DegradationEstimator.from_local(tmp_path / "clip")
    assert torch.equal(loaded(images), estimator(images))
    again = DegradationEstimator.from_config(CLIP_CONFIG, checkpoint=tmp_path / "clip" / "open_clip_model.safetensors")
    assert torch.equal(again(images), estimator(images))


def test_custom_prompts_and_errors(tmp_path):
    est = DegradationEstimator.from_config(CLIP_CONFIG, prompt_pairs=[("a sharp photo", "a blurry photo")])
    assert est(torch.rand(2, 3, 32, 32)).shape == (2, 1)
    with pytest.raises(ValueError, match="prompt_pairs"):
        DegradationEstimator.from_config(CLIP_CONFIG, prompt_pairs=[("only one",)])
    with pytest.raises(FileNotFoundError):
        DegradationEstimator.from_local(tmp_path)
    with pytest.raises(FileNotFoundError):
        DegradationEstimator.from_config(CLIP_CONFIG, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="model_cfg"):
        DegradationEstimator.from_config({"embed_dim": 8})


def test_float32_under_autocast_and_cache_not_spoiled():
    """Scores are float32 maths whatever autocast region the caller is in, and the text cache filled
    inside one is the float32 one."""
    est = DegradationEstimator.from_config(CLIP_CONFIG)
    images = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = est(images)
    assert inside.dtype == torch.float32
    assert torch.equal(est(images), inside)
    fresh = DegradationEstimator.from_config(CLIP_CONFIG)
    fresh.load_state_dict(est.state_dict())
    assert torch.equal(fresh(images), inside)


def test_text_cache_follows_new_weights_and_prompts():
    torch.manual_seed(3)
    est, other = DegradationEstimator.from_config(CLIP_CONFIG), DegradationEstimator.from_config(CLIP_CONFIG)
    images = torch.rand(2, 3, 32, 32)
    est(images)  # fills the cache with est's own text embeddings
    est.load_state_dict(other.state_dict())
    assert torch.equal(est(images), other(images))
    est.clip.load_state_dict(DegradationEstimator.from_config(CLIP_CONFIG).clip.state_dict())
    assert not torch.equal(est(images), other(images))
    est.prompt_pairs = [("a sharp photo", "a blurry photo")]
    assert est(images).shape == (2, 1)


def test_normalisation_constants_survive_half():
    est = DegradationEstimator.from_config(CLIP_CONFIG).half()
    assert est.mean == tuple(float(v) for v in open_clip.OPENAI_DATASET_MEAN)


def test_default_prompt_pairs_are_the_spec_ones():
    """MOR_SPEC section 3, written out: good/bad quality, sharp/blurry, clean/noisy, high/low resolution,
    crisp/jagged edges, detailed/smooth textureless, clean/compression artifacts."""
    assert DEFAULT_PROMPT_PAIRS == (
        ("a good quality photo", "a bad quality photo"),
        ("a sharp photo", "a blurry photo"),
        ("a clean photo", "a noisy photo"),
        ("a high-resolution photo", "a low-resolution photo"),
        ("a photo with crisp edges", "a photo with jagged edges"),
        ("a detailed photo", "a smooth, textureless photo"),
        ("a clean photo", "a photo with compression artifacts"),
    )


def test_images_outside_unit_range_warn(estimator):
    with pytest.warns(UserWarning, match=r"expects images in \[0, 1\], got values in \[-1"):
        estimator(torch.rand(1, 3, 32, 32) * 2 - 1)
