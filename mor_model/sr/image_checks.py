"""Checks made before an image file is decoded, so that a small file cannot claim a huge image.

- ``DECODE_BYTES_PER_PIXEL``: peak host memory of :func:`mor_model.sr.image_io.load_image` per pixel of
  the declared size (Pillow's decoded image, a converted copy, the float32 array and its transposed
  copy); compared with :func:`mor_model.sr.host_memory.host_available_bytes` before decoding.
- ``check_png_data(path)``: Pillow decodes a PNG whose compressed stream ends early (a complete zlib
  stream holding 4 of 9000 rows, say) without an error and fills the missing rows with zeros. This
  reads the IDAT chunks (checking their CRCs) through zlib in bounded pieces and counts the
  decompressed bytes against what ``IHDR`` declares (filter bytes included, Adam7 passes for
  interlaced files), so missing or surplus rows and cut files fail with the reason. Memory stays at
  about 1 MiB whatever the declared size.

JPEG and WebP carry no checksum of their pixel data: a cut JPEG fails in Pillow ("image file is
truncated"), a cut WebP in libwebp, but an edited byte inside their data can decode to other pixels.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

__all__ = ["DECODE_BYTES_PER_PIXEL", "check_png_data", "png_expected_bytes"]

#: peak bytes per pixel of load_image: up to 4 (Pillow's image) + 4 (a converted or transposed copy) + 4
#: (numpy's view copy) + 3 x 12 (float32 RGB: the converted array, the clipped one, the CHW copy)
DECODE_BYTES_PER_PIXEL = 48

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PIECE = 1 << 20


class PNGDataError(ValueError):
    """The PNG's image data does not match its header (the message says how)."""


def png_expected_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int | None:
    """Bytes of filtered scanlines (one filter byte per row) that ``IHDR`` declares; None for an unknown
    colour type (Pillow rejects those itself)."""
    channels = _CHANNELS.get(colour_type)
    if channels is None:
        return None
    bits = channels * bit_depth

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if not interlaced:
        return rows(width, height)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        total += rows(max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy)))
    return total


def check_png_data(path: str | os.PathLike) -> None:
    """Raises :class:`PNGDataError` when the file's image data is cut, corrupt, or not the declared size.

    Only PNG files are read (anything else returns at once); chunks after the image data are left to Pillow.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG_SIGNATURE:
            return
        expected = None
        inflater = zlib.decompressobj()
        produced = 0
        pos = 8
        while True:
            head = fh.read(8)
            if len(head) < 8:
                break
            length, ctype = struct.unpack(">I4s", head)
            pos += 8
            if length > size - pos - 4:
                raise PNGDataError(f"chunk {ctype!r} declares {length} bytes but the file ends first (cut file)")
            if ctype == b"IHDR":
                data = fh.read(length)
                fh.read(4)
                if length != 13:
                    raise PNGDataError(f"IHDR has {length} bytes, expected 13")
                width, height, depth, colour, _c, _f, interlace = struct.unpack(">IIBBBBB", data)
                expected = png_expected_bytes(width, height, depth, colour, interlace == 1)
                if expected is None:
                    return
            elif ctype == b"IDAT":
                if expected is None:
                    raise PNGDataError("image data (IDAT) before the header (IHDR)")
                crc = zlib.crc32(ctype)  # a chunk's CRC covers its type and data
                left = length
                while left:
                    piece = fh.read(min(left, _PIECE))
                    left -= len(piece)
                    crc = zlib.crc32(piece, crc)
                    produced += _inflate(inflater, piece, expected - produced)
                (stored,) = struct.unpack(">I", fh.read(4))
                if stored != crc:
                    raise PNGDataError("an image data chunk (IDAT) fails its CRC check (damaged file)")
            elif ctype == b"IEND" or (ctype in (b"fdAT", b"fcTL") and produced):
                break
            else:
                fh.seek(length + 4, os.SEEK_CUR)
            pos += length + 4
            if inflater.eof:
                break
    if expected is None:
        raise PNGDataError("no IHDR chunk")
    if produced < expected or not inflater.eof:
        raise PNGDataError(
            f"the image data ends early: {produced} of the {expected} bytes the header declares "
            "(a cut or damaged file; Pillow would fill the rest with black)"
        )


def _inflate(inflater, data: bytes, room: int) -> int:
    """Feeds ``data`` to ``inflater``, at most 1 MiB out at a time; returns the bytes produced (raises past
    ``room``)."""
    produced = 0
    buf = data
    while not inflater.eof:
        try:
            out = inflater.decompress(buf, _PIECE)
        except zlib.error as e:
            raise PNGDataError(f"corrupt image data: {e}") from None
        produced += len(out)
        if produced > room:
            raise PNGDataError("the image data holds more rows than the header declares (damaged header)")
        buf = inflater.unconsumed_tail
        if not buf and len(out) < _PIECE:  # input used up and nothing left buffered
            break
    return produced
