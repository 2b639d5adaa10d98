"""Opening a user's image file, refusing damaged files and metadata that disagrees with the pixels.

Why one module: ingest and ``rosie_predict`` read the same kinds of files, and both used to accept
files that were cut off. tifffile opens a truncated TIFF with whatever IFDs survived (logging an
error and returning, say, one channel of five), an OME-XML header that lists more planes than the
file stores is resolved by a guess, and a header-only PNG fails deep inside a decoder. Here every
such file is refused with one line naming it and saying what is wrong:

* empty or unreadable files, truncated IFD chains and pixel data that runs past the end of the file
  (:class:`DamagedImageError`);
* OME-XML that disagrees with the planes present (:class:`ImageMetadataError`).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.limits import ImageTooLargeError, check_in_memory

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".scn")
RECOPY = "copy or export the file again"


class DamagedImageError(ValueError):
    """The file is empty, truncated or not the image format its name says."""


class ImageMetadataError(ValueError):
    """The file's metadata disagrees with the pixels it stores; nothing is guessed."""


def check_regular_file(path: str | Path, what: str = "image") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {what} file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not an {what} file")
    if path.stat().st_size == 0:
        raise DamagedImageError(f"{path}: the {what} file is empty (0 bytes); {RECOPY}")
    return path


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _tifffile_messages() -> Iterator[list[logging.LogRecord]]:
    """tifffile reports damage and metadata conflicts through its logger, not as exceptions."""
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def open_tiff(path: str | Path, check_size: Callable[[tuple[int, ...], Any], None] | None = None) -> Any:
    """A ``tifffile.TiffFile`` whose first series is complete and agrees with its metadata.

    ``check_size(shape, dtype)`` runs on the full-resolution level first: a header that claims an
    impossible size is reported as such, not as the damage it also is."""
    import tifffile

    path = check_regular_file(path)
    with _tifffile_messages() as messages:
        try:
            tif = tifffile.TiffFile(str(path))
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, struct.error) as exc:
            raise DamagedImageError(f"{path}: not a readable TIFF (damaged, truncated or another format: {exc}); "
                                    f"{RECOPY}") from None
        try:
            series = tif.series[0] if tif.series else None
            if series is None:
                raise DamagedImageError(f"{path}: the TIFF holds no image; {RECOPY}")
            if check_size is not None:
                level = series.levels[0] if getattr(series, "levels", None) else series
                check_size(tuple(level.shape), level.dtype)
            check_tiff_complete(tif, series, path)
        except BaseException:
            tif.close()
            raise
    _raise_on_messages(messages, path, tif)
    return tif


def _raise_on_messages(messages: list[logging.LogRecord], path: Path, tif: Any) -> None:
    texts = [m.getMessage() for m in messages]
    ome = [t for t in texts if "OME series" in t or "OME-XML" in t]
    errors = [m.getMessage() for m in messages if m.levelno >= logging.ERROR]
    if not (ome or errors):
        return
    tif.close()
    if ome:
        detail = _ome_plane_count(tif) or ome[0].split("> ", 1)[-1]
        raise ImageMetadataError(f"{path}: its OME-XML metadata disagrees with the planes stored in the file ({detail}); "
                                 "re-export it so the header matches the pixels (e.g. bfconvert or tifffile)")
    detail = errors[0].split("> ", 1)[-1]
    raise DamagedImageError(f"{path}: the TIFF is damaged or truncated ({detail}); {RECOPY}")


def ome_pixels(ome_xml: str | None):  # type: ignore[no-untyped-def]
    """The `Pixels` element of the first OME Image, or None (no/invalid OME-XML)."""
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    return next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)


def ome_channel_names(ome_xml: str | None) -> list[str] | None:
    """Channel Name attributes of the first OME Image, or None when any is absent."""
    pixels = ome_pixels(ome_xml)
    if pixels is None:
        return None
    channels = [el for el in pixels if el.tag.endswith("}Channel") or el.tag == "Channel"]
    names = [el.get("Name") for el in channels]
    if not names or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def ome_mpp(ome_xml: str | None) -> float | None:
    """PhysicalSizeX of the first OME Image in µm (None when absent, non-positive or in an unknown unit)."""
    pixels = ome_pixels(ome_xml)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    size = float(pixels.get("PhysicalSizeX"))
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
    return None if factor is None or size <= 0 else size * factor


def _ome_plane_count(tif: Any) -> str | None:
    """'the header declares N planes (C×Z×T), the file stores M' from the OME-XML, when it says."""
    pixels = ome_pixels(tif.ome_metadata)
    if pixels is None:
        return None
    sizes = [int(pixels.get(k, 1)) for k in ("SizeC", "SizeZ", "SizeT")]
    declared = sizes[0] * sizes[1] * sizes[2]
    stored = sum(int(np.prod(p.shape)) // max(1, p.imagelength * p.imagewidth) for p in tif.pages)
    return (f"the header declares {sizes[0]} channel(s) × {sizes[1]} z × {sizes[2]} t = {declared} plane(s), "
            f"the file stores {stored}")


def check_tiff_complete(tif: Any, series: Any, path: Path) -> None:
    """Every strip/tile of the full-resolution level must lie inside the file."""
    size = path.stat().st_size
    level = series.levels[0] if getattr(series, "levels", None) else series
    for page in level.pages:
        if page is None or not hasattr(page, "dataoffsets"):
            continue
        offsets, counts = page.dataoffsets, page.databytecounts
        if not len(offsets):
            continue
        if any(c == 0 for c in counts) and page.compression != 1 and np.prod(page.shape) > 0:
            raise DamagedImageError(f"{path}: page {page.index} has empty pixel strips (an interrupted write); {RECOPY}")
        end = max(int(o) + int(c) for o, c in zip(offsets, counts))
        if end > size:
            raise DamagedImageError(f"{path}: truncated: the pixel data runs to byte {end:,} but the file has {size:,} "
                                    f"bytes; {RECOPY}")


#: PNG colour type -> samples per pixel (grey, RGB, palette, grey+alpha, RGBA).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _png_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) from a PNG's IHDR chunk; Pillow would report a 16-bit RGB PNG as 8-bit."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    samples = _PNG_SAMPLES.get(colour)
    if samples is None:
        return None
    shape = (height, width) if samples == 1 else (height, width, samples)
    return shape, np.dtype(np.uint16 if depth == 16 else np.uint8)


def raster_properties(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a PNG/JPEG/BMP from its header, at the bit depth the file stores."""
    import imageio.v3 as iio

    path = check_regular_file(path)
    header = _png_header(path) if path.suffix.lower() == ".png" else None
    if header is not None:
        return header
    try:
        props = iio.improps(path)
    except Exception as exc:  # Pillow raises SyntaxError, OSError, ValueError for broken headers
        raise DamagedImageError(f"{path}: not a readable {path.suffix.lstrip('.').upper()} image ({exc}); {RECOPY}") from None
    return tuple(props.shape), np.dtype(props.dtype)


def read_raster(path: str | Path) -> np.ndarray:
    """A whole PNG/JPEG/BMP (they are not tiled), RGB order, at the file's bit depth.

    Truncated files are refused, not half-decoded: a PNG's chunks are checked (CRC and length) by
    Pillow before OpenCV decodes it (OpenCV keeps 16-bit colour, Pillow does not); JPEG and BMP are
    decoded by Pillow, which raises on a truncated stream."""
    import imageio.v3 as iio
    from PIL import Image

    path = check_regular_file(path)
    kind = path.suffix.lstrip(".").upper()
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as im:
                im.verify()
            return _decode_png(path)
        return np.asarray(iio.imread(path))
    except DamagedImageError:
        raise
    except Exception as exc:  # "image file is truncated", "broken PNG file", CRC errors, ...
        raise DamagedImageError(f"{path}: the {kind} image is damaged or truncated ({exc}); {RECOPY}") from None


def _decode_png(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DamagedImageError(f"{path}: the PNG image cannot be decoded; {RECOPY}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[..., [2, 1, 0, 3]]
    return np.ascontiguousarray(img)


MASK_SUFFIXES = (".tif", ".tiff", ".png", ".npy", ".npz")


def read_mask_file(path: str | Path, what: str = "mask") -> np.ndarray:
    """A 2-D label or binary mask from TIFF, PNG, ``.npy`` or ``.npz``.

    An ``.npz`` must hold its mask under the key ``mask`` or be a single array; with several arrays
    and no ``mask`` key, which one is the mask is not guessed.
    """
    path = check_regular_file(path, what)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        with open_tiff(path) as tif:
            series = tif.series[0]
            _check_mask_size(path, series.shape, series.dtype, what)
            try:
                arr = series.asarray()
            except Exception as exc:  # codec errors of damaged strips
                raise DamagedImageError(f"{path}: the {what}'s pixel data cannot be decoded ({exc}); {RECOPY}") from None
    elif suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DamagedImageError(f"{path}: not a plain .npy array ({exc}); save it with np.save(path, mask)") from None
        _check_mask_size(path, arr.shape, arr.dtype, what)
        arr = np.asarray(arr)
    elif suffix == ".npz":
        arr = _npz_mask(path, what)
    elif suffix in RASTER_SUFFIXES:
        arr = read_raster(path)
    else:
        raise ValueError(f"{path}: unsupported {what} file type {suffix!r}; save it as TIFF, PNG, .npy or .npz")
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim != 2:
        raise ValueError(f"{path}: a {what} must be one 2-D (Y,X) plane, got shape {arr.shape}")
    return arr


def _npz_mask(path: Path, what: str) -> np.ndarray:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            if "mask" in keys:
                return np.asarray(data["mask"])
            if len(keys) == 1:
                logging.getLogger(__name__).info("%s: using its only array %r as the %s", path, keys[0], what)
                return np.asarray(data[keys[0]])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DamagedImageError(f"{path}: not a readable .npz ({exc}); {RECOPY}") from None
    raise ImageMetadataError(f"{path}: the .npz holds {len(keys)} arrays ({', '.join(keys[:8])}) and none is named 'mask'; "
                             f"save the {what} alone or as np.savez(path, mask=...)")


def _check_mask_size(path: Path, shape: Any, dtype: Any, what: str) -> None:
    try:
        check_in_memory(tuple(shape), dtype, str(path))
    except ImageTooLargeError as exc:
        raise ValueError(f"{path}: the {what} {exc.describe()}; tile or downsample it first") from None
