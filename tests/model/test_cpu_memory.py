"""mor_model.cpu_memory: freed memory kept in a CPU inference process, and the CLI setting it on CPU runs only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mor_model.cli import common


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_stops_the_page_faults_of_large_blocks():
    """A freed 64 MB block comes back from the process's heap instead of fresh pages (run in a child process: the
    setting lasts for the process)."""
    code = (
        "import resource, torch\n"
        "from mor_model.cpu_memory import keep_freed_memory\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "def churn():\n"
        "    for _ in range(3): torch.empty(16 * 2**20).fill_(1.0)\n"
        "churn(); f = faults(); churn(); before = faults() - f\n"
        "msg = keep_freed_memory(); churn(); f = faults(); churn(); after = faults() - f\n"
        "print(before, after, msg)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, msg = out.stdout.strip().split(" ", 2)
    assert msg == "freed memory kept in the process (glibc mallopt)"
    assert int(before) > 3 * 10_000 and int(after) < int(before) // 10, (before, after)


def test_the_cli_keeps_freed_memory_on_cpu_runs_only(monkeypatch):
    import mor_model.cpu_memory

    calls = []
    monkeypatch.setattr(mor_model.cpu_memory, "keep_freed_memory", lambda: calls.append(1) or "kept")
    monkeypatch.delenv("MOR_KEEP_FREED_MEMORY", raising=False)
    assert common.keep_freed_memory_on_cpu("cpu") == "kept"
    assert common.keep_freed_memory_on_cpu("cuda:0") is None  # a GPU run: the host allocator is not the cost
    monkeypatch.setenv("MOR_KEEP_FREED_MEMORY", "0")
    assert common.keep_freed_memory_on_cpu("cpu") is None
    assert calls == [1]


def test_load_pipeline_sets_it_before_loading(monkeypatch):
    """``mor-sr upscale`` / ``route-stats`` load through ``load_pipeline``: the setting comes first, so the model's
    own allocations already come from the kept heap."""
    import argparse

    from mor_model.sr.pipeline import MoRSRPipeline

    order = []
    monkeypatch.setattr(common, "keep_freed_memory_on_cpu", lambda device: order.append(("keep", device)))
    monkeypatch.setattr(MoRSRPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: order.append(("load",))))
    args = argparse.Namespace(model="m", adapter=None, clip=None, vae_adapter=None, dtype="fp32", device="cpu",
                              backend="auto", fold_shared=False)  # fmt: skip
    common.load_pipeline(args)
    assert order == [("keep", "cpu"), ("load",)]
