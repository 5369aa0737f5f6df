"""`mor-sr demo` in a real browser: the server on a free loopback port with the tiny model, driven by
Playwright in headless Chromium (Debian's `chromium`, never a downloaded browser build).

Upload an image -> the SR image is 4x its size, the scores and the heatmap are shown; a corrupt file and an
image over --max-pixels -> a message on the page, and the next upload still works; the page asks nothing of
any host but the demo's; Ctrl-C removes the temporary folder. A screenshot of the finished page is saved
to $MOR_TEST_ARTIFACTS (default: the test's tmp folder).

Skipped with the reason when gradio, playwright or /usr/bin/chromium is missing, unless
MOR_REQUIRE_DEMO_TEST=1 (set by .ci/run), which turns the skip into a failure.
Runtime on the 2-core CPU box: about a minute.
"""

import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from mor_kernels import dispatch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("MOR_REQUIRE_DEMO_TEST") == "1":
            pytest.fail(f"MOR_REQUIRE_DEMO_TEST=1 but {why}")
        pytest.skip(why)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo(path, size, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    _need(importlib.util.find_spec("gradio") is not None, "gradio is not installed (pip install 'mor-sr[demo]')")
    port = free_port()
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - read while the server runs
    cmd = [sys.executable, "-m", "mor_model", "demo", "--model", tiny_model_dir, "--port", port, "--max-pixels", 2500]
    proc = subprocess.Popen(
        [str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=dict(os.environ)
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"the demo did not start:\n{log.read()}")
        time.sleep(0.5)
    yield url, proc, log
    if proc.poll() is None:  # the test failed before stopping it: Ctrl-C first, so it removes its folder
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    log.close()


def test_demo_in_a_browser(server, tmp_path):
    _need(importlib.util.find_spec("playwright") is not None, "playwright is not installed (pip install playwright)")
    _need(Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing (apt-get install chromium)")
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    url, proc, log = server
    good = photo(tmp_path / "good.png", (24, 16), seed=1)
    again = photo(tmp_path / "again.png", (20, 12), seed=2)
    big = photo(tmp_path / "big.png", (60, 50), seed=3)  # 3000 pixels > --max-pixels 2500
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image")
    artefacts = Path(os.environ.get("MOR_TEST_ARTIFACTS") or tmp_path)
    artefacts.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path),  # a fresh profile every run
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1100},
        )
        try:
            page = ctx.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            upload = page.locator("#input-file input[type=file]")
            details = page.locator("#details")

            def run(path):
                clear = page.locator("#input-file").get_by_role("button", name="Clear")
                if clear.count():  # the previous upload: clear it to get the file input back
                    clear.click()
                upload.set_input_files(str(path))
                # uploaded: the file's link points at the server's copy (in the demo's temporary folder)
                expect(page.locator(f'#input-file a[href$="/{Path(path).name}"]')).to_have_count(1, timeout=30_000)
                page.click("#run")

            def result_sizes():
                return page.evaluate(
                    "Array.from(document.querySelectorAll('#result img')).map(i => [i.naturalWidth, i.naturalHeight])"
                )

            run(good)
            expect(details).to_contain_text("24x16 -> output 96x64", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('#result img').length == 2", timeout=30_000)
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#result img')).every(i => i.complete && i.naturalWidth > 0)"
            )
            assert result_sizes() == [[96, 64], [96, 64]]  # bicubic | SR, both 4x the 24x16 input
            link = page.locator('#download a[href$="/good_x4.png"]')
            expect(link).to_have_count(1)
            with Image.open(io.BytesIO(page.request.get(link.get_attribute("href")).body())) as downloaded:
                assert downloaded.size == (96, 64)  # the download is the SR image itself
            for name in ("bad quality", "blurry", "noisy", "compression artifacts"):  # the scores, as numbers
                expect(details).to_contain_text(name)
            assert re.search(r"blurry\s*\|?\s*0\.\d{3}", details.inner_text()), details.inner_text()
            expect(page.locator("#scores canvas, #scores svg").first).to_be_visible(timeout=30_000)  # the bar chart
            heat = page.locator("#heatmap img")
            expect(heat).to_be_visible(timeout=30_000)
            assert page.evaluate("document.querySelector('#heatmap img').naturalWidth") > 100
            want = dispatch.resolve("mor_linear", "auto", torch.device("cpu"), torch.float32).backend
            expect(details).to_contain_text(f"backend {want!r}")  # what auto picks on this CPU
            page.screenshot(path=str(artefacts / "demo.png"), full_page=True)

            run(broken)
            expect(page.get_by_text("unreadable image broken.png").first).to_be_visible(timeout=60_000)
            assert "mor-sr-demo-" not in page.locator("body").inner_text()  # no server paths on the page
            run(big)
            expect(page.get_by_text("this page takes at most 2500").first).to_be_visible(timeout=60_000)

            run(again)  # the server goes on serving after the failures
            expect(details).to_contain_text("20x12 -> output 80x48", timeout=120_000)
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#result img')).every(i => i.complete && i.naturalWidth == 80)"
            )
            assert result_sizes() == [[80, 48], [80, 48]]
            expect(details).to_contain_text("1: again.png")  # the heatmap now has a column per good run
            page.screenshot(path=str(artefacts / "demo_after_errors.png"), full_page=True)
        finally:
            ctx.close()

    foreign = [u for u in requests if not u.startswith(url) and not u.startswith(("data:", "blob:"))]
    assert not foreign, foreign  # nothing but the demo's own server
    log.seek(0)
    text = log.read()
    assert f"Running on local URL:  {url.rstrip('/')}" in text, text  # bound to loopback
    work = Path(re.search(r"temporary files in (\S+);", text).group(1))
    assert (work / "uploads").is_dir()
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert not work.exists()  # uploads and results are gone with the server
