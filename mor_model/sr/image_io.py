"""Image files in and out for the CLI: collect inputs, load to tensors, plan and write outputs safely.

- ``collect_images(inputs)``: files and folders (``recursive=True`` descends) -> image files with a
  supported extension (png, jpg, jpeg, webp, bmp, tif, tiff; any case), in a stable order, plus a list
  of problems (missing paths, unsupported files given by name) instead of an exception.
- ``load_image(path)``: RGB float32 (3, H, W) in ``[0, 1]``; grey, grey+alpha, palette, RGBA, CMYK,
  16-bit grey (full precision), 32-bit integer (read as 16-bit data) and float images (``[0, 1]``, or
  rescaled from 0-255/0-65535 when larger values occur) are converted; alpha is dropped (the colour
  channels are kept as stored); the EXIF orientation is applied. Pillow decodes 16-bit *RGB* files
  to 8 bits, so those are read at 8-bit precision. Unreadable, corrupt or truncated files raise
  ``ImageReadError`` (a ``ValueError``) naming the file; so does a header that declares more pixels
  than ``max_pixels`` or than there is memory to decode (checked before decoding, with
  :mod:`mor_model.sr.image_checks`). ``image_size(path)`` reads the declared size alone.
- ``drop_earlier_outputs(collected, out_dir, ...)``: when the output folder overlaps the scanned
  input folders, takes earlier results out of the inputs (so a rerun skips them instead of
  upscaling them again), and refuses (``ValueError``) a layout where outputs could not be told from
  inputs.
- ``plan_outputs(files, out_dir, ...)``: one output path per input that never equals an input file,
  never collides with another output, and keeps sub-folders of folder inputs; existing outputs are
  marked to be skipped unless ``overwrite``. ``suffix`` must be a plain part of a file name
  (``check_suffix``: no separator, no ``..``).
- ``save_image(img, path)``: 8-bit PNG/JPEG/WebP/BMP/TIFF written to a temporary file in the same
  folder and moved into place (:func:`mor_model.atomic_write.atomic_path`: readers never see a
  half-written file; a failed write leaves no partial file; ``overwrite=False`` never replaces a file).
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic_write import atomic_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "CollectedImages",
    "OutputPlan",
    "collect_images",
    "image_size",
    "load_image",
    "check_suffix",
    "iter_images",
    "drop_earlier_outputs",
    "plan_outputs",
    "save_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_DEFAULT = object()  # "not given" for arguments whose default is read at call time
_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - pillow is in the [model] extra
        raise ImportError("image I/O needs Pillow: pip install 'mor-sr[model]' (or pip install pillow)") from e
    return Image, ImageOps


class ImageReadError(ValueError):
    """An input image could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {str(path)!r}: {reason}")


@dataclass
class CollectedImages:
    """Result of ``collect_images``: ``files`` to process, ``roots[i]`` the folder argument ``files[i]`` came
    from (None for a file given directly; used to keep sub-folders in the output), ``errors`` as
    ``(path, reason)`` pairs, ``recursive`` whether sub-folders of the folder arguments were scanned."""

    files: list[Path] = field(default_factory=list)
    roots: list[Path | None] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    recursive: bool = False


def is_image_file(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def collect_images(inputs: Iterable[str | os.PathLike], *, recursive: bool = False) -> CollectedImages:
    """Expand files and folders into image files (see the module docstring).

    Folders are listed in sorted order (hidden files skipped); a file given by name must have a
    supported extension; the same file given twice is kept once.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    result = CollectedImages(recursive=bool(recursive))
    seen: set[Path] = set()

    def add(p: Path, root: Path | None) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            result.files.append(p)
            result.roots.append(root)

    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            pattern = p.rglob("*") if recursive else p.iterdir()
            found = sorted(
                q
                for q in pattern
                if q.is_file() and is_image_file(q) and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            if not found:
                result.errors.append((p, f"folder has no images ({', '.join(IMAGE_EXTENSIONS)})"))
            for q in found:
                add(q, p)
        elif p.is_file():
            if is_image_file(p):
                add(p, None)
            else:
                result.errors.append((p, f"unsupported file type {p.suffix!r} (expected one of {IMAGE_EXTENSIONS})"))
        else:
            result.errors.append((p, "no such file or folder"))
    return result


def _to_float_array(img) -> np.ndarray:
    """PIL image (orientation applied) -> float32 (H, W, 3) in [0, 1]."""
    Image, _ = _pil()
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        # 32-bit integer mode: 16-bit data widened by the decoder (PNG/TIFF); read on the 16-bit scale
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(img).astype(np.float32)
        peak = float(arr.max(initial=0))
        if peak > 1.0:  # float data stored on a 0-255 or 0-65535 scale
            arr = arr / (255.0 if peak <= 255.0 else 65535.0)
    else:
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif mode in ("LA", "La", "PA"):
            img = img.convert("L")
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")  # RGBA/RGBa/CMYK/YCbCr/LAB/1 -> RGB (alpha dropped)
        arr = np.asarray(img).astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"unexpected decoded image shape {arr.shape} (mode {mode})")
    return np.clip(arr, 0.0, 1.0)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` the file declares, read from its header (nothing is decoded; the EXIF
    orientation is not applied); raises ``ImageReadError``."""
    Image, _ = _pil()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller applies its own cap
            with Image.open(path) as img:
                return tuple(img.size)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except Exception as e:  # noqa: BLE001 - any failure of the header parser is this file's problem
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from None


def _check_declared_size(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    from .host_memory import format_bytes, host_available_bytes
    from .image_checks import DECODE_BYTES_PER_PIXEL

    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageReadError(
            path,
            f"it declares {width}x{height} = {pixels} pixels, more than the limit of {max_pixels} "
            "(PIL.Image.MAX_IMAGE_PIXELS, or max_pixels=)",
        )
    need = pixels * DECODE_BYTES_PER_PIXEL
    free = host_available_bytes()
    if free is not None and need > free:
        raise ImageReadError(
            path,
            f"decoding its declared {width}x{height} pixels needs about {format_bytes(need)} of memory; "
            f"{format_bytes(free)} is available",
        )


def load_image(path: str | os.PathLike, *, max_pixels: int | None | object = _DEFAULT) -> torch.Tensor:
    """Read an image file as an RGB float32 tensor (3, H, W) in ``[0, 1]``; raises ``ImageReadError``.

    Before anything is decoded, the size the header declares is checked against ``max_pixels``
    (default: Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` at call time, about 89 million; None: no cap of
    ours, though Pillow's header parser still refuses more than twice its ``MAX_IMAGE_PIXELS``)
    and against the memory this process can still allocate, and a PNG's compressed data is checked
    to hold exactly the declared rows (:func:`mor_model.sr.image_checks.check_png_data`). Truncated
    files fail (Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is refused if something set it). Any
    failure of the decoder, running out of memory included, is an ``ImageReadError`` naming the file.
    """
    Image, ImageOps = _pil()
    from PIL import ImageFile

    from .image_checks import PNGDataError, check_png_data

    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageReadError(
            path,
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set (by this program or a library it imported): truncated "
            "files would load with made-up pixels; set it back to False",
        )
    cap = Image.MAX_IMAGE_PIXELS if max_pixels is _DEFAULT else max_pixels
    width, height = image_size(path)
    _check_declared_size(path, width, height, cap)
    try:
        check_png_data(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decided that above
            with Image.open(path) as img:
                if tuple(img.size) != (width, height):
                    raise ValueError(f"the file changed while it was read ({img.size} vs {(width, height)})")
                img.load()  # decode now, so truncated/corrupt data fails here
                img = ImageOps.exif_transpose(img)
                arr = _to_float_array(img)
            if arr.shape[0] == 0 or arr.shape[1] == 0:
                raise ImageReadError(path, "image is empty (0 pixels)")
            chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except PNGDataError as e:
        raise ImageReadError(path, str(e)) from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except MemoryError:
        raise ImageReadError(path, f"not enough memory to decode its {width}x{height} pixels") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, IndexError...
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from None
    return chw


def iter_images(
    paths: Iterable[str | os.PathLike],
) -> Iterator[tuple[Path, torch.Tensor | None, ImageReadError | None]]:
    """Yield ``(path, image, None)`` for readable files and ``(path, None, error)`` for the others."""
    for p in paths:
        try:
            yield Path(p), load_image(p), None
        except ImageReadError as e:
            yield Path(p), None, e


def _output_folder(f: Path, root: Path | None, out_dir: Path) -> Path:
    return out_dir / f.parent.relative_to(root) if root is not None else out_dir


def drop_earlier_outputs(
    collected: CollectedImages, out_dir: str | os.PathLike, *, suffix: str = "", ext: str = ".png"
) -> tuple[CollectedImages, list[Path]]:
    """Takes earlier results out of ``collected`` when the output folder overlaps the scanned folders.

    Returns ``(kept, dropped)``. Files given by name (root None) are always kept. Two cases:

    - ``out_dir`` lies strictly inside a scanned folder (``-o in/out -r`` on ``in/``): every file found
      inside ``out_dir`` through that folder is an earlier result and is dropped.
    - Outputs would be written into a scanned folder (``-o`` equal to a folder input, or above one):
      outputs and inputs then share folders, so on the next run the outputs would be found as
      inputs. With an empty ``suffix`` an output ``p.png`` cannot be told from an input ``p.png``:
      ``ValueError``. With a suffix every output name ends with ``suffix + ext`` (see
      :func:`plan_outputs`), so files in those folders whose names end so (compared
      case-insensitively) are taken as earlier outputs and dropped; a rerun then skips their
      inputs instead of upscaling the outputs again.
    """
    check_suffix(suffix)
    out = Path(out_dir).resolve()
    ext = ext if ext.startswith(".") else "." + ext
    rows = [(f, root, f.resolve(), None if root is None else root.resolve()) for f, root in
            zip(collected.files, collected.roots, strict=True)]  # fmt: skip
    kept, dropped = [], []
    for f, root, rf, rr in rows:
        # found through a folder above the output folder: an earlier result
        if rr is not None and rr in out.parents and out in rf.parents:
            dropped.append(f)
        else:
            kept.append((f, root, rf, rr))
    roots = {rr for *_, rr in kept if rr is not None}

    def scanned(folder: Path) -> bool:
        return any(
            r not in out.parents and (folder == r or (collected.recursive and r in folder.parents)) for r in roots
        )

    mixed = {o for _, _, rf, rr in kept if scanned(o := _output_folder(rf, rr, out))}
    if mixed:
        if not suffix:
            raise ValueError(
                f"outputs would be written into the scanned input folder {sorted(mixed)[0]}: on the next run they "
                "would be taken as new inputs; choose an output folder outside the inputs, or set a suffix "
                "(e.g. --suffix _x4) so earlier outputs can be recognised and skipped"
            )
        tail = (suffix + ext).casefold()
        is_output = [
            rr is not None and rf.parent in mixed and rf.name.casefold().endswith(tail) for _, _, rf, rr in kept
        ]
        dropped += [f for (f, *_), out_name in zip(kept, is_output, strict=True) if out_name]
        kept = [row for row, out_name in zip(kept, is_output, strict=True) if not out_name]
    result = CollectedImages(errors=list(collected.errors), recursive=collected.recursive)
    result.files = [f for f, *_ in kept]
    result.roots = [root for _, root, *_ in kept]
    return result, dropped


@dataclass(frozen=True)
class OutputPlan:
    input: Path
    output: Path
    skip: bool  # the output exists and overwrite is off


def plan_outputs(
    files: list[Path] | CollectedImages,
    out_dir: str | os.PathLike,
    *,
    roots: list[Path | None] | None = None,
    suffix: str = "",
    ext: str = ".png",
    overwrite: bool = False,
) -> list[OutputPlan]:
    """Choose an output path for every input file.

    The output is ``out_dir / <sub-folder under its root> / <stem><suffix><ext>``. When that path is an
    input file, or another input already maps to it (``a.png`` and ``a.jpg``), the input's extension
    is added to the stem (``a_jpg<suffix><ext>``), then a counter (``_1``, ``_2``...) until the name is
    free. With ``overwrite=False`` an output that already exists on disk is marked ``skip``.
    """
    if isinstance(files, CollectedImages):
        roots = files.roots if roots is None else roots
        files = files.files
    if roots is None:
        roots = [None] * len(files)
    if len(roots) != len(files):
        raise ValueError(f"roots must have one entry per file ({len(files)}), got {len(roots)}")
    check_suffix(suffix)
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() not in _FORMATS:
        raise ValueError(f"ext must be one of {tuple(_FORMATS)}, got {ext!r}")
    out_dir = Path(out_dir)
    # compared case-insensitively, so a case-insensitive file system (macOS, Windows) cannot make an
    # output land on an input or on another output (on Linux this only renames a few more outputs)
    inputs = {str(Path(f).resolve()).casefold() for f in files}
    taken: set[str] = set()
    plans = []
    for f, root in zip(files, roots, strict=True):
        f = Path(f)
        sub = f.parent.relative_to(root) if root is not None else Path()
        folder = out_dir / sub
        tag = f.suffix.lstrip(".").lower()
        names = itertools.chain(
            [f"{f.stem}{suffix}{ext}", f"{f.stem}_{tag}{suffix}{ext}"],
            (f"{f.stem}_{tag}_{i}{suffix}{ext}" for i in itertools.count(1)),
        )
        # the names are distinct, so at most len(inputs) + len(taken) of them can be in use: the search
        # ends within that many tries (the bound turns a broken assumption into an error, not a hang)
        for name in itertools.islice(names, len(inputs) + len(taken) + 2):
            out = folder / name
            key = str(out.resolve()).casefold()
            if key not in inputs and key not in taken:
                break
        else:
            raise ValueError(f"found no free output name for {f} in {folder}")
        taken.add(key)
        plans.append(OutputPlan(f, out, skip=(not overwrite) and out.exists()))
    return plans


def check_suffix(suffix: str) -> str:
    """``suffix`` for output names (``--suffix``): a plain piece of a file name. A path separator, ``..``
    or a NUL byte could move an output out of its folder (``"/../../x"``); ``ValueError`` naming it."""
    if not isinstance(suffix, str):
        raise TypeError(f"suffix must be a str, got {type(suffix).__name__}")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(c in suffix for c in seps) or ".." in suffix or "\0" in suffix:
        raise ValueError(f"--suffix must be a plain part of a file name (no path separator, no '..'), got {suffix!r}")
    return suffix


def save_image(img: torch.Tensor, path: str | os.PathLike, *, quality: int = 95, overwrite: bool = True) -> Path:
    """Write an RGB image in ``[0, 1]`` ((3, H, W) or (1, 3, H, W), any float dtype or uint8) atomically.

    The format comes from the extension; values are clamped and rounded to 8 bits; JPEG/WebP use
    ``quality``. Parent folders are created. ``overwrite=False`` never replaces an existing file
    (``FileExistsError``, even for a file that appeared while the image was being made). Returns the path.
    """
    Image, _ = _pil()
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path must end with one of {tuple(_FORMATS)}, got {str(path)!r}")
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor (3, H, W), got {type(img).__name__}")
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"img must have shape (3, H, W) or (1, 3, H, W), got {tuple(img.shape)}")
    if img.dtype == torch.uint8:
        arr = img.detach().cpu()
    else:
        arr = (img.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8)
    arr = arr.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()
    pil = Image.fromarray(arr)
    kwargs = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
    with atomic_path(path, overwrite=overwrite) as tmp:
        pil.save(tmp, format=fmt, **kwargs)
    return path
