"""The demo's engine without Gradio or a browser: one upscale and what the page shows of it, the checks
before decoding, the heatmap over runs, the offline examples."""

import pytest
import torch

from mor_kernels import dispatch

pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")

from mor_model.demo.engine import DemoEngine, DemoError, save_heatmap, score_labels  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    return DemoEngine(tiny_model_dir, work_dir=tmp_path_factory.mktemp("work"), device="cpu", max_pixels=64 * 64)


def photo(path, size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_upscale_gives_what_the_page_shows(engine, tmp_path):
    calls = []
    result = engine.upscale(photo(tmp_path / "a.png", (24, 16)), tile=4, progress=lambda *a: calls.append(a))
    assert result.input_size == (24, 16) and result.output_size == (96, 64)
    with Image.open(result.sr) as sr, Image.open(result.bicubic) as bic:
        assert sr.size == bic.size == (96, 64)
    assert list(result.scores) == score_labels(engine.pipeline().estimator.prompt_pairs) and len(result.scores) == 7
    assert all(0 < v < 1 for v in result.scores.values())
    assert len(result.layers) == len(result.active) == len(result.max_ranks) > 0
    assert any(n.startswith("unet.") for n in result.layers) and any(n.startswith("vae.") for n in result.layers)
    # tiny model: S = 2 shared ranks, top-3 of 4 routed + 2 zero slots -> 2..5 active ranks per UNet layer
    assert all(2 <= a <= m for a, m in zip(result.active, result.max_ranks, strict=True))
    assert set(result.stage_seconds) == {"degradation CLIP", "VAE encoder", "UNet", "VAE decoder", "total"}
    assert all(v > 0 for v in result.stage_seconds.values())
    # the tiny model on CPU runs what auto picks there (the BLAS path when the extension is built, else the reference)
    want = dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32).backend
    assert f"mor_linear on cpu (torch.float32): backend {want!r}" in result.backend
    assert calls and {c[0] for c in calls} >= {"unet"}, calls  # a tiled run reports tile by tile


def test_problems_are_messages(engine, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DemoError, match="unreadable image broken.png"):
        engine.upscale(tmp_path / "broken.png")
    with pytest.raises(DemoError, match=r"65x64 = 4160 pixels; this page takes at most 4096"):
        engine.upscale(photo(tmp_path / "big.png", (65, 64)))
    with pytest.raises(DemoError, match="no image"):
        engine.upscale(None)
    with pytest.raises(DemoError, match="tile"):  # a bad option is a message too
        engine.upscale(photo(tmp_path / "b.png", (8, 8)), tile=3)
    assert engine.upscale(photo(tmp_path / "c.png", (8, 8))).output_size == (32, 32)  # and it still works


def test_heatmap_has_a_column_per_run(engine, tmp_path, monkeypatch):
    import mor_model.stats as stats

    a = engine.upscale(photo(tmp_path / "a.png", (8, 8), seed=1))
    b = engine.upscale(photo(tmp_path / "b.png", (12, 8), seed=2))
    seen = {}
    real = stats.save_routing_heatmap
    monkeypatch.setattr(
        stats, "save_routing_heatmap", lambda s, p, **k: seen.setdefault("stats", s) and real(s, p, **k)
    )
    path = save_heatmap([("a", a), ("b", b)], tmp_path / "heat.png")
    assert seen["stats"].active_ranks.shape == (len(a.layers), 2)
    assert seen["stats"].active_ranks[:, 1].tolist() == b.active
    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_examples_work_offline_and_grow_worse(tmp_path):
    pytest.importorskip("skimage", reason="scikit-image (the photos) is not installed")
    import numpy as np
    from skimage import data

    from mor_model.demo.examples import PHOTOS, make_examples

    examples = make_examples(tmp_path)
    assert len(examples) == 9
    top, left = PHOTOS["astronaut"]
    hr = np.asarray(data.astronaut())[top : top + 256, left : left + 256].astype(np.float64)
    errors = []
    for severity in ("light", "medium", "heavy"):
        with Image.open(examples[f"astronaut, {severity} degradation"]) as img:
            assert img.size == (64, 64)
            up = np.asarray(img.resize((256, 256), Image.BICUBIC)).astype(np.float64)
        errors.append(float(np.mean((up - hr) ** 2)))
    assert errors[0] < errors[2], errors  # heavy is further from the clean photo than light
    assert make_examples(tmp_path / "again")["coffee, heavy degradation"].read_bytes() == (
        examples["coffee, heavy degradation"].read_bytes()
    )  # seeded: the same examples every time


def test_out_of_memory_is_a_message_and_the_next_run_reloads(engine, tmp_path, monkeypatch):
    import torch

    pipe = engine.pipeline()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipe, "degradation_scores", oom)  # the first thing the job runs on the device
    with pytest.raises(DemoError, match="out of memory on a.png"):
        engine.upscale(photo(tmp_path / "a.png", (8, 8)))
    assert engine.pipeline() is not pipe  # the model is loaded afresh after running out of memory
    assert engine.upscale(photo(tmp_path / "a.png", (8, 8))).output_size == (32, 32)


def test_a_failed_load_then_a_good_one(tiny_model_dir, tmp_path, monkeypatch):
    """A model that fails to load (here: bf16 made to fail) is a message; the next run with the dtype that loaded
    before loads it again instead of returning the dropped pipeline (None)."""
    from mor_model.sr.pipeline import MoRSRPipeline

    engine = DemoEngine(tiny_model_dir, work_dir=tmp_path / "work", device="cpu", max_pixels=64 * 64)
    assert engine.pipeline("fp32") is not None
    real = MoRSRPipeline.from_pretrained

    def load(*args, dtype="fp32", **kwargs):
        if dtype == "bf16":
            raise OSError("cannot read the bf16 weights")
        return real(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(MoRSRPipeline, "from_pretrained", load)
    with pytest.raises(DemoError, match="OSError: cannot read the bf16 weights"):
        engine.upscale(photo(tmp_path / "a.png", (8, 8)), dtype="bf16")
    assert isinstance(engine.pipeline("fp32"), MoRSRPipeline)
    assert engine.upscale(photo(tmp_path / "a.png", (8, 8)), dtype="fp32").output_size == (32, 32)


def test_the_size_limit_message_says_what_upscale_takes(engine, tmp_path):
    from PIL import Image as PILImage

    with pytest.raises(DemoError) as e:
        engine.upscale(photo(tmp_path / "big.png", (65, 64)))
    assert "mor-sr demo --max-pixels raises it" in str(e.value)
    assert f"mor-sr upscale takes up to Pillow's limit, {PILImage.MAX_IMAGE_PIXELS} pixels" in str(e.value)
    assert "no such limit" not in str(e.value)
