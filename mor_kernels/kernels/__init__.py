"""``@triton.jit`` kernels and their private launchers, one file per op (imported lazily)."""
