"""mor_model.train.data: HR crops and on-the-fly LR, reproducible per (seed, sample index)."""

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
skdata = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from mor_model.train.data import SRDataset, StepBatchSampler, find_hr_images  # noqa: E402


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr")
    (root / "sub").mkdir()
    Image.fromarray(skdata.astronaut()[:200, :240]).save(root / "astronaut.png")
    Image.fromarray(skdata.chelsea()[:150, :180]).save(root / "sub" / "chelsea.jpg")
    Image.fromarray(skdata.coffee()[:40, :50]).save(root / "small.png")  # smaller than the crop: enlarged
    (root / "notes.txt.bak").write_text("not an image")
    return root


def test_pairs_have_the_right_sizes_and_range(hr_dir):
    ds = SRDataset(hr_dir, crop_size=64, scale=4, seed=0)
    assert len(ds) == 3
    for i in range(6):  # two epochs
        lq, hr = ds[i]
        assert lq.shape == (3, 16, 16) and hr.shape == (3, 64, 64)
        assert lq.dtype == hr.dtype == torch.float32
        assert 0 <= lq.min() and lq.max() <= 1 and 0 <= hr.min() and hr.max() <= 1


@pytest.mark.parametrize("degradation", ["realesrgan", "bicubic"])
def test_reproducible_per_seed_and_index(hr_dir, degradation):
    a = SRDataset(hr_dir, crop_size=32, seed=3, degradation=degradation)
    b = SRDataset(hr_dir, crop_size=32, seed=3, degradation=degradation)
    for i in (0, 1, 7):
        lq_a, hr_a = a[i]
        lq_b, hr_b = b[i]
        assert torch.equal(lq_a, lq_b) and torch.equal(hr_a, hr_b)
    # another index or another seed gives another pair
    assert not torch.equal(a[0][1], a[1][1])
    other = SRDataset(hr_dir, crop_size=32, seed=4, degradation=degradation)
    assert any(not torch.equal(a[i][0], other[i][0]) for i in range(3))
    # reading out of order gives the same pairs (no hidden state between items)
    assert torch.equal(a[7][0], SRDataset(hr_dir, crop_size=32, seed=3, degradation=degradation)[7][0])


def test_realesrgan_degrades_more_than_bicubic(hr_dir):
    """The LR of the Real-ESRGAN pipeline is further from the clean bicubic LR than the clean one is."""
    real = SRDataset(hr_dir, crop_size=64, seed=0)
    clean = SRDataset(hr_dir, crop_size=64, seed=0, degradation="bicubic")
    diffs = [float((real[i][0] - clean[i][0]).abs().mean()) for i in range(4)]
    assert torch.equal(real[0][1], clean[0][1])  # same HR crop: the degradation does not touch the crop draws
    assert max(diffs) > 0.01


def test_each_epoch_visits_every_file_once(hr_dir):
    ds = SRDataset(hr_dir, crop_size=32, seed=0, degradation="bicubic")
    for epoch in range(3):
        seen = [ds.file_for(epoch * len(ds) + i) for i in range(len(ds))]
        assert sorted(seen) == sorted(ds.files)


def test_list_file_and_errors(hr_dir, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text(f"# HR images\n{hr_dir / 'astronaut.png'}\n\n{hr_dir / 'sub' / 'chelsea.jpg'}\n")
    assert [p.name for p in find_hr_images(listing)] == ["astronaut.png", "chelsea.jpg"]
    rel = hr_dir / "rel.txt"
    rel.write_text("sub/chelsea.jpg\n")
    assert find_hr_images(rel) == [hr_dir / "sub" / "chelsea.jpg"]
    bad = tmp_path / "bad.txt"
    bad.write_text("readme.md\n")
    with pytest.raises(ValueError, match="not an image"):
        find_hr_images(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SRDataset(tmp_path / "nowhere", crop_size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        SRDataset(empty, crop_size=32)
    with pytest.raises(ValueError, match="multiple of scale"):
        SRDataset(hr_dir, crop_size=30, scale=4)
    with pytest.raises(ValueError, match="degradation must be"):
        SRDataset(hr_dir, crop_size=32, degradation="gaussian")
    with pytest.raises(ValueError, match="unknown degradation_options"):
        SRDataset(hr_dir, crop_size=32, degradation_options={"blur_sigmaa": (1, 2)})


def test_corrupt_file_is_skipped_with_a_warning(tmp_path):
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = SRDataset(tmp_path, crop_size=32, degradation="bicubic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = [ds[i] for i in range(2)]
    assert any("broken.png" in str(w.message) for w in caught)
    assert all(torch.allclose(hr, torch.full_like(hr, 128 / 255)) for _, hr in pairs)


def test_step_batch_sampler_layout_and_resume():
    full = StepBatchSampler(2, world_size=2, rank=1)
    it = iter(full)
    assert [next(it) for _ in range(3)] == [[2, 3], [6, 7], [10, 11]]
    resumed = iter(StepBatchSampler(2, world_size=2, rank=1, start_micro_step=2))
    assert next(resumed) == [10, 11]
    with pytest.raises(ValueError):
        StepBatchSampler(0)
