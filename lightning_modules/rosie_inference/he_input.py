"""H&E input for ROSIE prediction: open a file lazily, check it is RGB uint8, present one interface.

Whatever the source (a whole-slide file or TIFF/OME-TIFF read region by region through
:mod:`datamodules.slide_readers`, a PNG/JPEG, a dataset's OME-Zarr image, or an array in memory), the prediction loop only sees the store's ``ImageArray``
interface: ``shape (3, H, W)``, ``dtype`` and ``read(y, x, h, w)``. The checks refuse what ROSIE
cannot read *before* a model is loaded, with a message that says how to convert the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.image_files import RASTER_SUFFIXES, DamagedImageError, check_regular_file, raster_properties
from datamodules.slide_readers import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, SlideReadError, open_slide


class HEInputError(ValueError):
    """The H&E input cannot be used as is; the message says how to fix it."""


class ArrayHE:
    """An RGB uint8 H&E image behind the store's ``ImageArray`` interface (``shape (3,H,W)``, ``read``).

    ``array`` is any sliceable array (numpy, zarr, tifffile's zarr store) and ``axes`` names its
    dimensions (``Y``, ``X``, ``S`` for the colour axis, anything else must have size 1). Only
    the region asked for is read, so a lazily opened TIFF is never loaded whole.
    """

    def __init__(self, array: Any, axes: str, name: str, keep: Any = None):
        self.array = array
        self.axes = axes
        self.name = name
        self._keep = keep  # e.g. the open TiffFile behind a lazy array
        shape = tuple(int(n) for n in array.shape)
        self._pos = {a: axes.index(a) for a in "YXS"}
        self.shape = (shape[self._pos["S"]], shape[self._pos["Y"]], shape[self._pos["X"]])
        self.dtype = np.dtype(array.dtype)
        kept = [a for a in axes if a in "YXS"]
        self._order = [kept.index(a) for a in "SYX"]

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """The ``(3, h, w)`` crop at ``(y, x)``; a crop outside the image is a caller's bug, so it raises."""
        _, height, width = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"{self.name}: crop y={y} x={x} h={h} w={w} is outside the image of size {height}×{width}")
        index = tuple(slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None) if a == "S" else 0
                      for a in self.axes)
        try:
            out = np.asarray(self.array[index]).transpose(self._order)
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # a strip or tile that does not decode: the codec's own error type
            raise DamagedImageError(f"{self.name}: the pixels at y={y} x={x} ({h}×{w}) cannot be decoded, the file is "
                                    f"damaged ({type(exc).__name__}: {exc}); copy or export it again") from None
        return out if channels is None else out[list(channels)]

    def close(self) -> None:
        """Release the file behind a lazy array (an open TIFF holds a file handle)."""
        if self._keep is not None and hasattr(self._keep, "close"):
            self._keep.close()


def check_he(shape: Sequence[int], channels: int, dtype: np.dtype, name: str) -> None:
    """Refuse what ROSIE cannot read, saying how to convert it."""
    if channels == 1:
        raise HEInputError(f"{name}: H&E image is grayscale (1 channel, shape {tuple(shape)}); ROSIE needs an RGB "
                           "H&E image. Export the slide as RGB (e.g. `PIL.Image.open(p).convert('RGB').save(q)`).")
    if channels == 4:
        raise HEInputError(f"{name}: H&E image has 4 channels (RGBA, shape {tuple(shape)}); drop the alpha channel, "
                           "e.g. `PIL.Image.open(p).convert('RGB').save(q)` or `rgb = rgba[..., :3]`.")
    if channels != 3:
        raise HEInputError(f"{name}: H&E image must have 3 colour channels (RGB), found {channels} (shape {tuple(shape)})")
    dtype = np.dtype(dtype)
    if dtype != np.uint8:
        bits = dtype.itemsize * 8
        kind = f"{bits}-bit ({dtype})" if dtype.kind in "ui" else f"floating point ({dtype})"
        raise HEInputError(
            f"{name}: H&E image is {kind}; ROSIE was trained on 8-bit RGB (uint8, 0–255). Convert it, e.g. "
            "`skimage.util.img_as_ubyte(img)` (rescales the full 16-bit or 0–1 float range to 0–255), or "
            "`img.astype(np.uint8)` if the values already lie in 0–255."
        )


def check_store_he(image: Any, name: str) -> None:
    """A dataset's H&E image (``(3, H, W)``) goes through the same checks as a file."""
    check_he(image.shape, image.shape[0], image.dtype, name)


def open_he_image(path: str | os.PathLike) -> tuple[Any, float | None]:
    """Open an H&E image file lazily; returns the image and its µm/px when the file states it.

    Every format :func:`datamodules.slide_readers.open_slide` reads: vendor slides through OpenSlide
    (.svs, .ndpi, .mrxs, .scn, ...), TIFF / OME-TIFF (any layout tifffile knows: RGB interleaved,
    planar, tiled, pyramidal) through tifffile's Zarr interface, and PNG / JPEG (decoded whole,
    they are not tiled). Only the regions read are decoded, and the reader keeps the file's pyramid,
    so the foreground thumbnail comes from a reduced level (:func:`~.geometry.foreground_grid`).
    The µm/px is the reader's (OME-XML, an Aperio ``MPP``, OpenSlide's property or the TIFF
    resolution tags); a truncated or inconsistent file is refused at open.
    """
    path = check_regular_file(path, "H&E image") if Path(path).suffix.lower() != ".mrxs" else Path(path)
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:  # check the header before decoding the whole image
        shape, dtype = raster_properties(path)
        check_he(shape, 1 if len(shape) == 2 else shape[2], dtype, str(path))
    elif suffix not in OPENSLIDE_SUFFIXES + TIFF_SUFFIXES:
        raise HEInputError(f"{path}: unsupported H&E file type {path.suffix!r}; use a slide ({', '.join(OPENSLIDE_SUFFIXES)}), "
                           "TIFF/OME-TIFF, PNG or JPEG, or a dataset folder with --tissue-id")
    try:
        reader = open_slide(path)
    except SlideReadError as exc:
        raise HEInputError(str(exc)) from None
    try:
        check_he(reader.shape, reader.shape[0], reader.dtype, str(path))
    except BaseException:
        reader.close()
        raise
    return reader, reader.mpp


def as_he_image(image: Any) -> Any:
    """Anything the prediction accepts -> a checked object with ``shape (3,H,W)`` and ``read``.

    An object that already reads crops (:class:`ArrayHE`, a store image) is checked and passed
    through; an RGB uint8 array ``(H,W,3)`` or ``(3,H,W)`` is wrapped.
    """
    if hasattr(image, "read") and hasattr(image, "shape"):
        check_he(image.shape, image.shape[0], image.dtype, getattr(image, "name", getattr(image, "path", "H&E image")))
        return image
    arr = np.asarray(image)
    if arr.ndim == 2:
        check_he(arr.shape, 1, arr.dtype, "H&E array")
    if arr.ndim != 3:
        raise HEInputError(f"H&E array must be (H,W,3) or (3,H,W), got shape {arr.shape}")
    if arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
        check_he(arr.shape, arr.shape[-1], arr.dtype, "H&E array")
        return ArrayHE(arr, "YXS", "H&E array")
    check_he(arr.shape, arr.shape[0], arr.dtype, "H&E array")
    return ArrayHE(arr, "SYX", "H&E array")
