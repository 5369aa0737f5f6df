"""Shared test setup.

Triton reads ``TRITON_INTERPRET`` when it is first imported, and any test module (or the package
code it imports) may import it first, so the choice is made here, before collection: on a machine
without CUDA the Triton kernels run under the interpreter on CPU tensors; with CUDA they run on the
GPU (set ``TRITON_INTERPRET=1`` yourself to test the interpreter path there).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
