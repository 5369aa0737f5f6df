"""The output rules every ``mor-sr`` subcommand follows (upscale, route-stats, eval, train, and later ones).

1. No output file is ever an input file. A single-file output (``route-stats -o``/``--json``,
   ``eval --csv``...) that names a file the command reads, or an existing file inside a folder it
   reads from (the model directory, an adapter, the CLIP), is a usage error (exit 2) before any work,
   ``--overwrite`` or not. ``upscale`` plans one output per input under its ``-o`` folder and renames
   outputs that would land on an input (``mor_model.sr.image_io.plan_outputs``; its ``--suffix`` rule
   covers an output folder that is also scanned as input).
2. Two outputs of one command never name the same file.
3. Nothing existing is replaced without ``--overwrite``: a single-file output that exists is a usage
   error; upscale skips existing outputs.
4. Every output is written atomically (:func:`mor_model.atomic_write.atomic_path`: a temporary file
   in the same folder, then a rename), so an interrupted run leaves the old file or the new one.

A new subcommand calls :func:`check_output_files` (and :func:`check_output_folder` for a folder
output) once its inputs are known, turns :class:`UsageError` into exit code 2, and writes through
:func:`write_output` or ``atomic_path``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..atomic_write import atomic_path

__all__ = ["UsageError", "check_output_files", "check_output_folder", "same_file", "write_output"]


class UsageError(ValueError):
    """A problem with the command line, found before any work: exit code 2."""


def _key(path: Path) -> str:
    # case-insensitive, so a case-insensitive file system (macOS, Windows) cannot make two names one file
    return str(path.resolve()).casefold()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file: the same resolved path (compared case-insensitively),
    or, when both exist, the same file on disk (hard links, bind mounts)."""
    a, b = Path(a), Path(b)
    if _key(a) == _key(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, tree: Path) -> bool:
    p, t = _key(path), _key(tree)
    return p == t or p.startswith(t.rstrip(os.sep) + os.sep)


def check_output_files(
    outputs: Mapping[str, str | os.PathLike | None],
    *,
    inputs: Iterable[str | os.PathLike] = (),
    input_trees: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Checks single-file outputs against rules 1-3 of the module docstring; returns ``{flag: Path}``.

    Args:
        outputs: ``{flag: path}`` (``{"-o": "heat.png", "--json": None}``); None entries are left out.
        inputs: the files the command reads.
        input_trees: folders the command reads from (model, adapter, CLIP): an existing file inside
            one counts as an input.
        overwrite: allow replacing an existing output that is not an input.

    Raises:
        UsageError: naming the flag and the file.
    """
    given = {flag: Path(p) for flag, p in outputs.items() if p is not None and str(p) != ""}
    input_list = [Path(p) for p in inputs]
    trees = [Path(t) for t in input_trees if t is not None]
    seen: dict[str, str] = {}
    for flag, path in given.items():
        for f in input_list:
            if same_file(path, f):
                raise UsageError(f"{flag} {path} names an input file ({f}); outputs never replace inputs")
        for tree in trees:
            if path.exists() and _inside(path, tree):
                raise UsageError(f"{flag} {path} is a file inside the input {tree}; outputs never replace inputs")
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder; it needs a file name")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
        key = _key(path)
        if key in seen:
            raise UsageError(f"{flag} and {seen[key]} name the same file {path}")
        seen[key] = flag
        if path.exists() and not overwrite:
            raise UsageError(f"{flag} {path} exists; pass --overwrite to replace it")
    return given


def check_output_folder(flag: str, path: str | os.PathLike) -> Path:
    """An output folder (``upscale -o``): an existing folder or a path that can become one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; it needs a folder (created if missing)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
    return path


def write_output(path: str | os.PathLike, writer: Callable[[Path], object], *, overwrite: bool) -> Path:
    """Runs ``writer(tmp)`` on a temporary path and moves the result onto ``path`` atomically (rule 4);
    with ``overwrite=False`` an existing ``path`` is never replaced (``FileExistsError``)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer(tmp)
    return Path(path)
