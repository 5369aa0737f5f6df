"""Freed memory kept in the process on a CPU: what a CPU inference process (the ``mor-sr`` CLI) sets once.

oneDNN reorders every convolution weight into fresh memory on each call, and the merged weights of
``mor_model.inference`` are made per image. glibc hands blocks that large back to the kernel when they are
freed (``mmap``/``munmap``, and trimming of the heap's top), so each one comes back as new pages: about 300k
minor page faults per SD 2.1-base UNet forward at a 32x32 latent, 0.3-1.2 s of kernel time on top of ~1.6 s
of compute on the 2-core Xeon of ``benchmarks/README.md`` (wall time 1.86 -> 1.55 s for the bare UNet,
1.96 -> 1.68 s with MoR, measured there). ``mallopt`` can keep them in the process instead: no ``mmap`` per
large block, no trimming. The price is that the process's resident memory does not shrink after a peak, which
is what an inference process that runs the same model again wants; a library must not decide that for its
host, so only the CLI calls this (``MOR_KEEP_FREED_MEMORY=0`` to not).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h


def keep_freed_memory() -> str:
    """Sets glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to its maximum for this process (Linux with
    glibc; elsewhere nothing). Returns what it did, in words."""
    if not sys.platform.startswith("linux"):
        return "allocator left alone (not Linux)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError) as err:  # not glibc (musl has no mallopt)
        return f"allocator left alone ({err})"
    return "freed memory kept in the process (glibc mallopt)" if ok else "allocator left alone (mallopt refused)"
