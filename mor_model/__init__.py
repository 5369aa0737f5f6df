"""Model layer for MoR adapters: layers, injection into diffusers models, degradation-aware routing,
losses, adapter files, and the one-step super-resolution pipeline (built on ``mor_kernels``).

Nothing here is kernel code; every MoR computation goes through ``mor_kernels``.
"""

__version__ = "0.1.0"
