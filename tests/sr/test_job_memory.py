"""The planned peak memory of an upscaling job (mor_model.sr.tile_plan.job_memory), the check every front end
runs with it before decoding an image (mor_model.sr.job_check) and the host memory query: where the bytes
are counted (host or device), how they grow, what the refusal says."""

from types import SimpleNamespace

import pytest
import torch

from mor_model.sr import host_memory
from mor_model.sr.job_check import ImageTooLargeError, load_checked, memory_problem
from mor_model.sr.tile_plan import (
    MAX_SCALE,
    JobMemory,
    auto_tile_sizes,
    check_call_options,
    job_memory,
    memory_shortfall,
    pixels_on_host,
    resolve_tile_sizes,
)
from mor_model.testing import TINY_UNET_CONFIG, TINY_VAE_CONFIG

KW = dict(unet_config=TINY_UNET_CONFIG, vae_config=TINY_VAE_CONFIG, dtype=torch.float32)
TILES = {"unet": 16, "encoder": 64, "decoder": 16}


def test_pixels_dominate_and_grow_with_the_output():
    small = job_memory(64, 64, device="cpu", tiles=TILES, **KW)
    large = job_memory(256, 256, device="cpu", tiles=TILES, **KW)
    assert small.output == (256, 256) and large.output == (1024, 1024)
    assert small.device == 0 and large.device == 0  # the CPU: everything is host memory
    # the tile plan is the same, so the difference is what scales with the image: at least the output's
    # float32 copies, 12 bytes per pixel each
    assert large.host - small.host >= 12 * (1024 * 1024 - 256 * 256) * 8
    assert job_memory(64, 64, device="cpu", tiles=TILES, scale=8, **KW).output == (512, 512)
    two = job_memory(64, 64, device="cpu", tiles=TILES, batch=2, **KW)
    assert two.host == 2 * small.host


def test_device_placement_follows_the_pipeline():
    tiled = job_memory(256, 256, device="cuda", tiles=TILES, **KW)  # tiled VAE: pixels stay on the host
    whole = job_memory(256, 256, device="cuda", tiles=dict.fromkeys(TILES, 0), **KW)  # all on the device
    assert tiled.host > tiled.device > 0
    assert whole.device > whole.host and whole.device > tiled.device


def test_shortfall_messages():
    job = JobMemory(host=100 << 30, device=10 << 30, output=(36000, 36000))
    assert memory_shortfall(job, host_free=None, device_free=None) is None
    assert memory_shortfall(job, host_free=200 << 30, device_free=20 << 30) is None
    msg = memory_shortfall(job, host_free=20 << 30, device_free=None)
    assert msg == "needs about 100.0 GiB of host memory for a 36000x36000 output; 20.0 GiB is available"
    msg = memory_shortfall(job, host_free=200 << 30, device_free=1 << 30)
    assert msg.startswith("needs about 10.0 GiB of device memory") and "1.0 GiB is free" in msg


def test_resolve_tile_sizes_is_the_pipelines_rule():
    auto = {"unet": 8, "encoder": 32, "decoder": 8}
    assert resolve_tile_sizes(0, 64, 16, lambda: auto) == {"unet": 0, "encoder": 0, "decoder": 0}
    assert resolve_tile_sizes(None, 64, None, lambda: auto) == {"unet": 8, "encoder": 64, "decoder": 8}

    def not_called():
        raise AssertionError("auto tiles computed although every size was given")

    assert resolve_tile_sizes(4, 8, 2, not_called) == {"unet": 4, "encoder": 8, "decoder": 2}


def test_pixels_stay_on_the_host_when_a_vae_stage_is_tiled():
    # a padded 64 x 48 image, VAE factor 4: the encoder is tiled below 64 pixels, the decoder below 16 latents
    assert not pixels_on_host({"unet": 8, "encoder": 0, "decoder": 0}, 64, 48, 4)  # both whole
    assert not pixels_on_host({"unet": 8, "encoder": 64, "decoder": 16}, 64, 48, 4)  # one tile each = whole
    assert pixels_on_host({"unet": 0, "encoder": 32, "decoder": 0}, 64, 48, 4)
    assert pixels_on_host({"unet": 0, "encoder": 0, "decoder": 8}, 64, 48, 4)
    assert pixels_on_host({"encoder": 0, "decoder": 12}, 48, 64, 4)  # either side counts


def _fake_pipe(auto=None):
    """What memory_problem reads of a pipeline: the configs, dtype, device and auto_tile_sizes."""

    def auto_tile_sizes(batch):
        if auto is None:
            raise AssertionError("auto tiles computed although every size was given")
        return auto

    return SimpleNamespace(
        unet=SimpleNamespace(config=TINY_UNET_CONFIG),
        vae=SimpleNamespace(config=TINY_VAE_CONFIG),
        dtype=torch.float32,
        device=torch.device("cpu"),
        auto_tile_sizes=auto_tile_sizes,
    )


def test_memory_problem_plans_with_the_tiles_the_call_would_use(monkeypatch):
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1 << 40)
    assert memory_problem(_fake_pipe(), 16, 16, tile=16, encoder_tile=64, decoder_tile=16) is None
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1 << 20)
    why = memory_problem(_fake_pipe(TILES), 16, 24, scale=2, tile=None)
    want = job_memory(16, 24, device="cpu", tiles=TILES, scale=2, **KW)
    assert why == memory_shortfall(want, host_free=1 << 20, device_free=None)
    assert why.startswith("needs about") and "for a 48x32 output; 1.0 MiB is available" in why


def test_load_checked_refuses_before_decoding(monkeypatch, tmp_path):
    from PIL import Image

    from mor_model.sr import image_io

    path = tmp_path / "a.png"
    Image.new("RGB", (24, 16), (10, 20, 30)).save(path)
    decoded = []
    real = image_io.load_image
    monkeypatch.setattr(image_io, "load_image", lambda p, **kw: decoded.append(p) or real(p, **kw))
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(ImageTooLargeError) as e:
        load_checked(_fake_pipe(TILES), path)
    assert (e.value.width, e.value.height) == (24, 16) and not decoded
    assert str(e.value).startswith("too large for this machine (24x16 input): it needs about")
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1 << 40)
    img = load_checked(_fake_pipe(TILES), path)
    assert decoded == [path] and img.shape == (3, 16, 24)
    with pytest.raises(image_io.ImageReadError, match="a.png"):  # max_pixels reaches load_image
        load_checked(_fake_pipe(TILES), path, max_pixels=100)
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(image_io.ImageReadError, match="b.png"):
        load_checked(_fake_pipe(TILES), tmp_path / "b.png")


def test_scale_is_capped():
    check_call_options(vae_factor=4, unet_factor=2, scale=MAX_SCALE)
    for bad in (1e9, MAX_SCALE + 0.5, float("inf"), float("nan"), 0, -1):
        with pytest.raises(ValueError, match="scale must"):
            check_call_options(vae_factor=4, unet_factor=2, scale=bad)


def test_cpu_tiles_fit_the_host_memory(monkeypatch):
    roomy = auto_tile_sizes(TINY_UNET_CONFIG, TINY_VAE_CONFIG, torch.float32, device="cpu")
    monkeypatch.setattr(host_memory, "host_available_bytes", lambda: 1 << 30)
    tight = auto_tile_sizes(TINY_UNET_CONFIG, TINY_VAE_CONFIG, torch.float32, device="cpu")
    assert all(tight[k] <= roomy[k] for k in roomy) and tight != roomy


def test_host_available_bytes_reads_the_address_space_limit():
    """The limit of this process (RLIMIT_AS) bounds what is available; checked in a child process."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from mor_model.sr.host_memory import host_available_bytes, _address_space_room\n"
        "free = host_available_bytes()\n"
        "size = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:')][0]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))\n"
        "room = host_available_bytes()\n"
        "print(free, room)\n"
        "assert room <= 256 << 20 and (free is None or room < free), (free, room)\n"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status (Linux)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
