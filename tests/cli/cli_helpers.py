"""Helpers of the CLI tests: file digests and small photos."""

import hashlib


def digest_tree(*roots):
    """``{path: sha256}`` of every file under ``roots`` (files or folders)."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths})
    return out


def save_photo(path, size=(16, 16), seed=0):
    """A small random RGB image file (format from the extension)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def png_bytes(width, height, rows=None, *, level=1):
    """An 8-bit RGB PNG of black pixels declaring ``width x height``; with ``rows`` its (complete, valid)
    compressed stream holds only that many rows: Pillow alone would load it as a full black image."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(level)
    row = b"\x00" * (1 + 3 * width)
    data = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
