"""Run by tests/sr/test_image_fuzz.py in a subprocess whose address space is capped (RLIMIT_AS):
feeds ``load_image`` random truncations and header edits of real PNG/JPEG/WebP files.

    python image_fuzz_worker.py FOLDER EXAMPLES CAP_BYTES

Property: every call returns the original pixels or raises ``ImageReadError``; an edited JPEG/WebP (no
checksum over their data) may also decode to other pixels, but then to an image of the size its header
declares, with values in [0, 1]. Nothing else is allowed: no other exception, no MemoryError, no crash.
Prints one JSON line with the outcome counts; exit code 0 when the property held.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mor_model.sr.image_io import ImageReadError, image_size, load_image

FORMATS = {  # name: (extension, Pillow save options)
    "png": (".png", {}),
    "jpeg": (".jpg", {"quality": 90}),
    "jpeg-progressive": (".jpg", {"quality": 90, "progressive": True}),
    "webp-lossy": (".webp", {"quality": 80}),
    "webp-lossless": (".webp", {"lossless": True}),
}


def _vm_size() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _photo() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((48, 40), Image.BICUBIC))


def _declare_size(raw: bytes, fmt: str, width: int, height: int) -> bytes:
    """``raw`` with the image size in its header replaced (checksums fixed where the format has them)."""
    b = bytearray(raw)
    if fmt == "png":  # IHDR data at 16..29, its CRC at 29..33
        b[16:24] = struct.pack(">II", width, height)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif fmt.startswith("jpeg"):  # SOFn: FF C0/C2, length, precision, height, width
        for i in range(2, len(b) - 9):
            if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC1, 0xC2):
                b[i + 5 : i + 9] = struct.pack(">HH", height, width)
                break
    else:  # WebP: VP8 (lossy) 14-bit sizes after the start code, VP8L 14-bit sizes packed after 0x2F
        i = b.find(b"VP8 ")
        if i >= 0:
            b[i + 14 : i + 18] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        i = b.find(b"VP8L")
        if i >= 0:
            bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | (b[i + 12] >> 4 << 28)
            b[i + 9 : i + 13] = struct.pack("<I", bits)
    return bytes(b)


def main(folder: Path, examples: int, cap: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    originals = {}
    for fmt, (ext, opts) in FORMATS.items():
        path = folder / f"original_{fmt}{ext}"
        Image.fromarray(photo).save(path, **opts)
        originals[fmt] = (ext, path.read_bytes(), load_image(path))
    counts = {"same": 0, "refused": 0, "other_pixels": 0}
    reasons: dict[str, int] = {}
    limit = _vm_size() + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def check(fmt: str, data: bytes, edited_header: bool) -> None:
        ext, _, pixels = originals[fmt]
        path = folder / f"case{ext}"
        path.write_bytes(data)
        try:
            img = load_image(path)
        except ImageReadError as e:
            counts["refused"] += 1
            key = e.reason.split(":")[0][:40]
            reasons[key] = reasons.get(key, 0) + 1
            return
        if img.shape == pixels.shape and torch.equal(img, pixels):
            counts["same"] += 1
            return
        # other pixels: only for an edited header of a format without a checksum over its data
        assert edited_header and fmt != "png", f"{fmt}: {'edited' if edited_header else 'cut'} file loaded other pixels"
        width, height = image_size(path)
        assert img.dim() == 3 and img.shape[0] == 3, img.shape
        assert tuple(img.shape[1:]) in ((height, width), (width, height)), (img.shape, width, height)  # EXIF turns
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
        counts["other_pixels"] += 1

    formats = st.sampled_from(sorted(FORMATS))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        fmt=formats,
        kind=st.sampled_from(["truncate", "edit", "declare"]),
        cut=st.floats(0, 1, exclude_max=True),
        edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=4),
        size=st.tuples(st.sampled_from([1, 47, 49, 4000, 9000, 16383, 65535]), st.sampled_from([1, 41, 9000, 16383])),
    )
    def prop(fmt, kind, cut, edits, size):
        _, raw, _ = originals[fmt]
        if kind == "truncate":
            check(fmt, raw[: int(cut * len(raw))], False)
        elif kind == "edit":  # bytes of the header region (the first 64)
            b = bytearray(raw)
            for offset, value in edits:
                b[offset % len(b)] = value
            check(fmt, bytes(b), True)
        else:  # a header that declares another size (a decompression bomb when large)
            check(fmt, _declare_size(raw, fmt, *size), True)

    prop()
    print(json.dumps({"counts": counts, "reasons": reasons, "limit": limit}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
