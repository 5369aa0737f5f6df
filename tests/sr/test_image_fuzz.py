"""Property-based test of the image loader against damaged files, in a process with capped memory.

Random truncations, header byte edits and declared-size edits (decompression bombs up to 65535x16383)
of real PNG, JPEG (baseline and progressive) and WebP (lossy and lossless) files of a photo: each
load gives the original pixels or fails cleanly with ``ImageReadError`` (see image_fuzz_worker.py for the
exact property; JPEG and WebP have no checksum over their data, so an edited byte there may decode to
other pixels of the declared size). The worker runs under ``RLIMIT_AS`` = its size after imports + 1 GiB,
so a loader that decoded a bomb would hit MemoryError (a failure) rather than the machine's memory.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis", reason="hypothesis (dev extra) is not installed")
pytest.importorskip("PIL.Image", reason="Pillow is not installed")
pytest.importorskip("skimage.data", reason="scikit-image (dev extra) is not installed")

if not sys.platform.startswith("linux"):
    pytest.skip("the memory cap reads /proc/self/status (Linux)", allow_module_level=True)

WORKER = Path(__file__).with_name("image_fuzz_worker.py")


def test_loader_gives_the_same_pixels_or_fails_cleanly(tmp_path):
    cap = 1 << 30
    r = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "cases"), "400", str(cap)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    assert sum(counts.values()) >= 400
    assert counts["same"] > 0 and counts["refused"] > 0, result  # both outcomes were exercised
    # the bombs were refused from their headers (size cap or memory), never decoded
    assert any("declares" in k or "decoding its declared" in k or "too large" in k for k in result["reasons"]), result
