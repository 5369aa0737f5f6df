"""Atomic file writes: a temporary file in the target's folder, flushed to disk, then renamed into place.

``with atomic_path(path) as tmp: writer(tmp)`` hands out a hidden temporary path in the same folder
(same file system, so the rename is atomic) that keeps ``path``'s extension (writers that pick the
format from it, like matplotlib's ``savefig``, keep working). When the block ends without an error
the file is fsynced and moved onto ``path``: readers see the old file or the new one, never half of
one. On an error the temporary file is removed and ``path`` is untouched.

``overwrite=False`` never replaces an existing ``path``: the file is linked into place with
``os.link``, which fails when the name exists, so even a file created by someone else between a
check and the write survives (``FileExistsError``); on file systems without hard links the check is
``os.path.lexists`` just before an ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with FileExistsError when path exists: no check-then-write race
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(path)) from None
    except OSError:  # no hard links here (FAT, some network file systems)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary path to write; on success it becomes ``path`` (see the module docstring).

    Parent folders are created. The temporary file is created empty with ``O_EXCL`` and the usual
    ``0o666 & ~umask`` permissions (``mkstemp`` would make it private), so the writer may open it by
    name or replace it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and os.path.lexists(path):  # early, before any work; _move_into_place re-checks
        raise FileExistsError(errno.EEXIST, "exists already (not replaced)", str(path))
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync(tmp)
        _move_into_place(tmp, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Writes ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)
