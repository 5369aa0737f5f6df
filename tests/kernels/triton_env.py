"""Where the Triton tests run, shared by tests/kernels/test_triton_*.py.

Without CUDA the kernels run under the interpreter, which must be switched on before triton is first
imported (tests/conftest.py does it before collection; this module repeats it for a test file imported
some other way); with CUDA they run compiled on the GPU unless ``TRITON_INTERPRET=1`` is set. If
triton was imported first without it, its mode is kept rather than half-switched, and the Triton test
modules skip themselves with the reason.
"""

import os
import sys

import pytest
import torch

TOO_LATE = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not TOO_LATE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"


def skip_if_triton_imported_too_late() -> None:
    """Call at module level in each Triton test module, after its imports."""
    from mor_kernels import dispatch

    dispatch.clear_cache()
    if TOO_LATE and not torch.cuda.is_available():
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 could be set and there is no GPU; run these tests in "
            "their own process: TRITON_INTERPRET=1 pytest tests/kernels/test_triton_*.py",
            allow_module_level=True,
        )
