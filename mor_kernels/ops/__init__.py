"""Backend modules for the dispatcher (see ``mor_kernels.dispatch``).

``triton_backend.py`` (fused Triton kernels as ``torch.library`` custom ops) and ``extension_backend.py`` (the
compiled ``mor_kernels._C`` ops, ``backend="cuda"``/``"cpp"``) each provide the ops they implement
with the canonical signatures documented in ``mor_kernels.functional``.
"""
