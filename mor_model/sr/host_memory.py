"""How much memory this process can still allocate on the host, and how much a CUDA device has free.

``host_available_bytes()`` is the smallest of: the memory the kernel reports as available
(``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable`` from
``/proc/meminfo``), the room left under a cgroup memory limit (containers; v2 ``memory.max``, v1
``memory.limit_in_bytes``), and the room left under this process's address-space limit
(``RLIMIT_AS``, e.g. ``ulimit -v``). None when none of these can be read (then nothing is refused).
Queried when called, never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["device_free_bytes", "format_bytes", "host_available_bytes"]

_UNLIMITED = 1 << 60  # cgroup files say "max" or a huge number when there is no limit


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < _UNLIMITED:
            return max(limit - usage, 0)
    return None


def _address_space_room() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_available_bytes() -> int | None:
    """Bytes this process can still allocate on the host (see the module docstring), or None if unknown."""
    known = [v for v in (_meminfo_available(), _cgroup_room(), _address_space_room()) if v is not None]
    return min(known) if known else None


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); None for the CPU (it uses host memory)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``320 MiB``..."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
