"""Loads the compiled extension ``mor_kernels._C`` on first use and says why when it cannot."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def load():
    """``(module, None)`` when the extension imports, else ``(None, reason)``."""
    try:
        return importlib.import_module("mor_kernels._C"), None
    except ImportError as err:
        return None, (
            f"the compiled extension mor_kernels._C is not available ({err}); build it with "
            "`pip install --no-build-isolation .` in an environment that has torch"
        )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``mor::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA") in this process."""
    module, _ = load()
    if module is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mor::{op}", dispatch_key)
