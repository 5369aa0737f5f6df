"""Model ids the way diffusers users pass them (mor_model.sr.hub): a Hugging Face cache folder built here
holds the tiny model under made-up repo ids (no download, ever), HF_HOME points at it, HF_HUB_OFFLINE=1.

Checked: from_pretrained and `mor-sr upscale --model org/tiny-mor` load it; adapter and CLIP ids find their
folder at a repo's root or in the default sub-folder; what save_adapter writes, published as a repo, loads
back by id; a missing id fails offline saying it is not in the cache; a local folder of the same spelling
wins; a revision picks its own snapshot; the training config resolves ids; the open_clip MODEL:TAG path.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the [model] extra (diffusers) is not installed")
pytest.importorskip("open_clip", reason="the [model] extra (open_clip_torch) is not installed")
pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")

import torch  # noqa: E402

from mor_model.sr.hub import download_patterns, is_repo_id, resolve_source  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def add_to_cache(hf_home: Path, repo_id: str, source: Path, *, commit=COMMIT, ref="main") -> Path:
    """Copies ``source`` into the hub cache layout: models--org--name/snapshots/<commit>/, refs/<ref>."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_dir_for_hub):
    home = tmp_path_factory.mktemp("hf_home")
    add_to_cache(home, "org/tiny-mor", tiny_model_dir_for_hub)
    # an adapter-only repo: what save_adapter wrote, at the repo's root (how the README publishes one)
    add_to_cache(home, "org/tiny-adapter", tiny_model_dir_for_hub / "mor_adapter")
    add_to_cache(home, "org/tiny-clip", tiny_model_dir_for_hub / "degradation_clip")
    return home


@pytest.fixture(scope="module")
def tiny_model_dir_for_hub(tmp_path_factory):
    from mor_model.testing import tiny_model

    return tiny_model(tmp_path_factory.mktemp("tiny_hub"))


@pytest.fixture
def offline(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_repo_id_spelling():
    for good in ("org/tiny-mor", "stabilityai/stable-diffusion-2-1-base", "gpt2", "a.b/c_d"):
        assert is_repo_id(good), good
    for bad in ("/abs/path", "./x", "a/b/c", "org/na--me", "org/..", "~/x", "", "org/name/"):
        assert not is_repo_id(bad), bad


def test_resolve_finds_each_kind_offline(offline):
    snap = offline / "hub" / "models--org--tiny-mor" / "snapshots" / COMMIT
    assert resolve_source("org/tiny-mor") == snap
    assert resolve_source("org/tiny-mor", kind="adapter") == snap / "mor_adapter"
    assert resolve_source("org/tiny-mor", kind="vae_adapter") == snap / "vae_encoder_adapter"
    assert resolve_source("org/tiny-mor", kind="clip") == snap / "degradation_clip"
    root = offline / "hub" / "models--org--tiny-adapter" / "snapshots" / COMMIT
    assert resolve_source("org/tiny-adapter", kind="adapter") == root
    with pytest.raises(FileNotFoundError, match="has no mor_adapter.json"):
        resolve_source("org/tiny-clip", kind="adapter")


def test_missing_id_offline_says_not_in_cache(offline):
    with pytest.raises(FileNotFoundError, match=r"org/missing.*not in the cache .*HF_HUB_OFFLINE=1"):
        resolve_source("org/missing")
    with pytest.raises(FileNotFoundError, match="at revision v2 is not in the cache"):
        resolve_source("org/tiny-mor@v2")
    with pytest.raises(FileNotFoundError, match="not spelled like a Hugging Face repo id"):
        resolve_source("no/such/folder")


def test_revision_picks_its_snapshot(offline, tmp_path, tiny_model_dir_for_hub):
    repo = offline / "hub" / "models--org--tiny-rev"
    if not repo.exists():
        add_to_cache(offline, "org/tiny-rev", tiny_model_dir_for_hub / "mor_adapter")
        add_to_cache(offline, "org/tiny-rev", tiny_model_dir_for_hub / "mor_adapter", commit=OTHER_COMMIT, ref="v2")
    assert resolve_source("org/tiny-rev", kind="adapter").name == COMMIT
    assert resolve_source("org/tiny-rev", kind="adapter", revision="v2").name == OTHER_COMMIT
    assert resolve_source("org/tiny-rev@v2", kind="adapter").name == OTHER_COMMIT
    assert resolve_source("org/tiny-rev", kind="adapter", revision=OTHER_COMMIT).name == OTHER_COMMIT
    with pytest.raises(ValueError, match="names revision"):
        resolve_source("org/tiny-rev@v2", kind="adapter", revision="main")


def test_local_folder_wins_over_the_id(offline, tmp_path, monkeypatch):
    local = tmp_path / "org" / "tiny-mor"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_source("org/tiny-mor") == Path("org/tiny-mor")  # the local one, not the cached snapshot


def test_download_patterns_prefer_safetensors():
    files = [
        "model_index.json",
        "v2-1_512-ema-pruned.ckpt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",  # no safetensors in this folder: the .bin is kept
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]
    allow, ignore = download_patterns("model", files)
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert kept == {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/pytorch_model.bin",
        "vae/diffusion_pytorch_model.safetensors",
    }
    allow, ignore = download_patterns("adapter", ["mor_adapter.json", "mor_adapter.safetensors", "README.md"])
    assert set(filter_repo_objects(["mor_adapter.json", "mor_adapter.safetensors", "README.md"], allow_patterns=allow,
                                   ignore_patterns=ignore)) == {"mor_adapter.json", "mor_adapter.safetensors"}  # fmt: skip


def test_from_pretrained_by_repo_ids(offline, tiny_model_dir_for_hub):
    from mor_model.sr import MoRSRPipeline

    lq = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    by_id = MoRSRPipeline.from_pretrained("org/tiny-mor", adapter="org/tiny-adapter", clip="org/tiny-clip")
    local = MoRSRPipeline.from_pretrained(tiny_model_dir_for_hub)
    out = by_id(lq, tile=0)
    assert out.shape == (1, 3, 48, 64)
    assert torch.equal(out, local(lq, tile=0))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        MoRSRPipeline.from_pretrained("org/tiny-mor", adapter="org/no-adapter")


def test_save_adapter_round_trips_through_a_repo(offline, tiny_model_dir_for_hub, tmp_path):
    """save_adapter's folder, published as is, is what from_pretrained(adapter=repo_id) reads back."""
    from mor_model import save_adapter
    from mor_model.layers import mor_layers
    from mor_model.sr import MoRSRPipeline

    pipe = MoRSRPipeline.from_pretrained(tiny_model_dir_for_hub)
    for layer in mor_layers(pipe.unet).values():
        torch.nn.init.normal_(layer.lora_b, std=0.1, generator=torch.Generator().manual_seed(1))
    save_adapter(pipe.unet, tmp_path / "published")
    add_to_cache(offline, "org/published", tmp_path / "published")
    back = MoRSRPipeline.from_pretrained("org/tiny-mor", adapter="org/published")
    for (name, a), b in zip(mor_layers(pipe.unet).items(), mor_layers(back.unet).values(), strict=True):
        assert torch.equal(a.lora_b, b.lora_b), name


def test_training_config_resolves_ids(offline, tmp_path):
    import json

    from mor_model.train.config import load_config

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(
        json.dumps({"model": "org/tiny-mor", "adapter": "org/tiny-adapter", "output_dir": "run", "data": {"hr": ["."]}})
    )
    cfg = load_config(cfg_file)
    assert Path(cfg.model).name == COMMIT and (Path(cfg.model) / "unet").is_dir()
    assert (Path(cfg.adapter) / "mor_adapter.json").is_file()
    (tmp_path / "org" / "tiny-mor").mkdir(parents=True)  # a folder next to the config wins
    assert Path(load_config(cfg_file).model) == tmp_path / "org" / "tiny-mor"
    cfg_file.write_text(json.dumps({"model": "org/missing", "output_dir": "run", "data": {"hr": ["."]}}))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        load_config(cfg_file)


def run_cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "mor_model", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
        timeout=600,
    )


def test_cli_upscale_by_repo_id_offline(hf_home, tiny_model_dir_for_hub, tmp_path):
    from PIL import Image

    Image.new("RGB", (12, 8), (200, 40, 90)).save(tmp_path / "a.png")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    r = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "out", "--model", "org/tiny-mor", "-q", env=env)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "out" / "a.png") as out:
        assert out.size == (48, 32)
    r = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "out2", "--model", "org/tiny-mor", "--revision",
                "v9", "-q", env=env)  # fmt: skip
    assert r.returncode == 2 and "at revision v9 is not in the cache" in r.stderr, r.stderr
    r = run_cli("upscale", tmp_path / "a.png", "-o", tmp_path / "out3", "--model", "org/missing", env=env)
    assert r.returncode == 2
    assert "org/missing" in r.stderr and "not in the cache" in r.stderr, r.stderr
    assert not (tmp_path / "out3").exists()


def test_open_clip_model_and_tag(tmp_path, tiny_model_dir_for_hub):
    """--clip MODEL:TAG goes through DegradationEstimator.from_pretrained (in a subprocess: registering the tiny
    architecture with open_clip is global state); TAG may be a weights file; offline, an uncached tag fails
    with a message about the cache; unknown names and tags are refused before any download."""
    code = f"""
import json, sys
from pathlib import Path
import open_clip, torch
from mor_model.sr.loading import _load_estimator, open_clip_name
clip_dir = Path({str(tiny_model_dir_for_hub / "degradation_clip")!r})
cfg = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
Path({str(tmp_path)!r}, "tiny-clip-arch.json").write_text(json.dumps(cfg))
open_clip.add_model_config(Path({str(tmp_path)!r}, "tiny-clip-arch.json"))
weights = clip_dir / "open_clip_model.safetensors"
assert open_clip_name(f"tiny-clip-arch:{{weights}}") == ("tiny-clip-arch", str(weights))
est = _load_estimator(f"tiny-clip-arch:{{weights}}", torch.device("cpu"))
ref = _load_estimator(str(clip_dir), torch.device("cpu"))
x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
assert torch.allclose(est(x), ref(x), atol=1e-6), (est(x), ref(x))
for spec, msg in [("no-such-arch:openai", "not an open_clip architecture"), ("ViT-B-32:no-such-tag", "no pretrained tag"),
                  ("ViT-B-32:openai", "HF_HUB_OFFLINE=1")]:
    try:
        _load_estimator(spec, torch.device("cpu"))
    except (ValueError, FileNotFoundError) as e:
        assert msg in str(e), (spec, str(e))
    else:
        sys.exit(f"{{spec}} loaded")
print("ok")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
