"""Pure-PyTorch MoR ops: the test oracle, the CPU fallback and the benchmarks' baseline.

Same signatures as the public ops (plus ``upcast``), no argument checks: call them through
``mor_kernels.<op>(..., backend="reference")`` for checked calls.
"""

from .dense_gate import dense_gate
from .mor_conv2d import mor_conv2d
from .mor_linear import mor_linear
from .mor_lora import mor_lora
from .route import route

__all__ = ["dense_gate", "mor_conv2d", "mor_linear", "mor_lora", "route"]
