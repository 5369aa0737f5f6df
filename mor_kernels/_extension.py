"""Loads the compiled extension ``mor_kernels._C`` on first use and says why when it cannot."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import torch


def build_info() -> dict | None:
    """What ``setup.py`` recorded about the build (``torch``, ``cuda``, ``arch_list``), or None."""
    path = Path(__file__).with_name("_C_build.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.cache
def load():
    """``(module, None)`` when the extension imports, else ``(None, reason)``."""
    try:
        return importlib.import_module("mor_kernels._C"), None
    except ImportError as err:
        info = build_info() or {}
        built = info.get("torch")
        mismatch = (
            f"; it was built against torch {built} but torch {torch.__version__} is running"
            if built and built != torch.__version__
            else ""
        )
        return None, (
            f"the compiled extension mor_kernels._C is not available ({err}{mismatch}); build it against the "
            "installed torch with `pip install --no-build-isolation .`"
        )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``mor::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA") in this process."""
    module, _ = load()
    if module is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mor::{op}", dispatch_key)
