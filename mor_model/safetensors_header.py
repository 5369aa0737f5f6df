"""Reading a safetensors file's header without reading (or allocating) its tensors.

The format: an 8-byte little-endian length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data section, every byte of which
belongs to exactly one tensor. :func:`read_header` checks all of it against the file's size (the
declared length, each tensor's byte count against ``dtype`` and ``shape``, offsets that tile the data
section without gaps or overlaps), so that sizes taken from the header are sizes the file really holds.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FLOAT_DTYPES", "HeaderError", "TensorInfo", "read_header"]

#: bytes per element of the safetensors dtypes
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file; the message names it and says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({name: TensorInfo}, metadata)`` of the safetensors file ``path``; reads the header only.

    Raises:
        HeaderError: cut file, a header length beyond the file, JSON that is not a safetensors header,
            unknown dtypes, byte counts that do not match the shapes, or a data section that the
            tensors do not tile exactly.
    """
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> HeaderError:
        return HeaderError(f"{path}: {why}")

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length (a cut file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise bad(f"declares a {n}-byte header but holds {size - 8} bytes after the length (cut or corrupt)")
        if n > MAX_HEADER_BYTES:
            raise bad(f"declares a {n}-byte header, more than the {MAX_HEADER_BYTES} bytes safetensors allows")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"corrupt header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise bad(f"corrupt header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise bad("corrupt header (__metadata__ is not an object)")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"corrupt header (entry {name!r} is not an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):  # fmt: skip
            raise bad(f"tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(
                f"tensor {name!r} has data offsets {offsets!r} outside the {data_size}-byte data section "
                "(a cut or corrupt file)"
            )
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"tensor {name!r} ({dtype}, shape {tuple(shape)}) needs {nbytes} bytes but its offsets span "
                f"{offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))
    end = 0
    for info in sorted(tensors.values(), key=lambda t: t.offsets):
        if info.offsets[0] != end:
            raise bad(f"the tensors' data does not tile the data section (a gap or overlap at byte {end})")
        end = info.offsets[1]
    if end != data_size:
        raise bad(f"the tensors hold {end} bytes but the data section has {data_size} (a cut or padded file)")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
