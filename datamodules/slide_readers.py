"""Lazy whole-slide readers behind one interface: ``open_slide(path) -> SlideReader``.

Why one interface: ingest, registration and ``rosie_predict`` all need "the pixels of this region"
from files that labs scan to (Aperio .svs, Hamamatsu .ndpi, 3DHISTECH .mrxs, Leica .scn, generic
tiled / pyramidal TIFF, OME-TIFF, PNG/JPEG) and none of them may load a 100,000² px slide whole.
A :class:`SlideReader` has

* ``shape`` ``(C, H, W)`` and ``dtype`` of the full-resolution level, ``mpp`` (µm/px or None),
  ``channel_names`` (OME-XML names, ``R,G,B`` for RGB, else None), ``name`` and ``backend``;
* ``read(y, x, h, w, channels=None) -> (C, h, w)`` at full resolution (the store's ``ImageArray``
  interface, so ``rosie_predict``'s H&E input accepts a reader as is);
* ``level_count``, ``level_shapes`` ``[(H, W), ...]``, ``level_downsamples`` and
  ``read_level(level, y, x, h, w)`` in that level's pixels, ``best_level(downsample)`` and
  ``thumbnail(max_side)`` (from the coarsest level that is fine enough, read in tiles);
* ``close()`` (also a context manager).

Backends: OpenSlide (the wheel bundles its C library; vendor formats, default for .svs/.ndpi/
.mrxs/.scn/...), tifffile through its Zarr store (``aszarr``: only the tiles a read touches are
decoded; OME-TIFF, generic tiled/pyramidal TIFF, also reads .svs/.ndpi with ``backend="tifffile"``),
and a whole-image decoder for PNG/JPEG (not tiled; refused above the in-memory limit). Every
refusal is one line naming the file: :class:`SlideReadError`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from datamodules.image_files import (RASTER_SUFFIXES, DamagedImageError, ImageMetadataError, check_regular_file,
                                     ome_channel_names, ome_mpp, open_tiff, raster_properties, read_raster)
from datamodules.limits import ImageTooLargeError, check_in_memory

#: Vendor formats OpenSlide reads (tifffile can read some of them too: ``backend="tifffile"``).
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
BACKENDS = ("auto", "openslide", "tifffile", "raster")


class SlideReadError(ValueError):
    """The slide cannot be opened or read as asked; the message names the file and the fix."""


class SlideReader:
    """Base of the backends: geometry, bounds checks, thumbnails. Subclasses implement ``_read``."""

    backend = "base"

    def __init__(self, name: str, level_shapes: Sequence[tuple[int, int]], channels: int, dtype: Any,
                 mpp: float | None, channel_names: list[str] | None, level_downsamples: Sequence[float] | None = None):
        self.name = name
        self.path = name
        self.level_shapes = [(int(h), int(w)) for h, w in level_shapes]
        self.channels = int(channels)
        self.dtype = np.dtype(dtype)
        self.mpp = mpp
        self.channel_names = channel_names
        h0, w0 = self.level_shapes[0]
        self.level_downsamples = list(level_downsamples) if level_downsamples is not None else [
            (h0 / h + w0 / w) / 2 for h, w in self.level_shapes]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.level_shapes[0])

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """``(C, h, w)`` crop of the full-resolution level; a crop outside the image is a caller's bug."""
        return self.read_level(0, y, x, h, w, channels)

    def read_level(self, level: int, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.name}: level {level} does not exist (the slide has {self.level_count})")
        height, width = self.level_shapes[level]
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"{self.name}: crop y={y} x={x} h={h} w={w} is outside level {level} of size {height}×{width}")
        try:
            out = self._read(level, int(y), int(x), int(h), int(w))
        except (IndexError, TypeError, ValueError):
            raise
        except Exception as exc:  # codec errors of a damaged tile come in the codec's own types
            raise DamagedImageError(f"{self.name}: the pixels at level {level} y={y} x={x} ({h}×{w}) cannot be decoded, "
                                    f"the file is damaged ({type(exc).__name__}: {exc}); copy or export it again") from None
        return out if channels is None else out[list(channels)]

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (level 0 if none)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def thumbnail(self, max_side: int = 2048, read_bytes: int = 32 * 2**20) -> tuple[np.ndarray, float]:
        """``(C, h, w)`` area-averaged overview with ``max(h, w) <= max_side`` and its downsample factor.

        Reads the coarsest pyramid level that is fine enough, tile by tile, and block-averages it:
        a 100,000² slide with a pyramid costs a few MB, one without costs a pass over level 0."""
        _, h0, w0 = self.shape
        target = max(1.0, max(h0, w0) / max_side)
        level = self.best_level(target)
        ds = self.level_downsamples[level]
        factor = max(1, math.ceil(target / ds))
        lh, lw = self.level_shapes[level]
        th, tw = -(-lh // factor), -(-lw // factor)
        out = np.empty((self.channels, th, tw), dtype=self.dtype)
        read_px = max(factor, int(math.sqrt(read_bytes / (self.channels * self.dtype.itemsize))))  # a block of ~read_bytes
        step = max(1, read_px // factor) * factor
        for y in range(0, lh, step):
            for x in range(0, lw, step):
                block = self.read_level(level, y, x, min(step, lh - y), min(step, lw - x))
                small = block_mean(block, factor)
                out[:, y // factor : y // factor + small.shape[1], x // factor : x // factor + small.shape[2]] = small
        return out, ds * factor

    def close(self) -> None:
        pass

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, shape={self.shape}, dtype={self.dtype}, mpp={self.mpp}, "
                f"levels={self.level_shapes})")


def block_mean(block: np.ndarray, factor: int) -> np.ndarray:
    """``(C, h, w)`` → ``(C, ceil(h/f), ceil(w/f))`` by averaging f×f blocks (edge blocks: edge-padded).

    Integer images are rounded back to their dtype, so a uint8 H&E stays uint8."""
    if factor == 1:
        return block
    c, h, w = block.shape
    ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
    if (ph, pw) != (h, w):
        block = np.pad(block, ((0, 0), (0, ph - h), (0, pw - w)), mode="edge")
    work = np.float64 if block.dtype.itemsize > 4 or np.issubdtype(block.dtype, np.integer) else np.float32
    out = np.empty((c, ph // factor, pw // factor), dtype=block.dtype)
    for i in range(c):  # channel by channel: the float copy is one plane, not the block
        mean = block[i].reshape(ph // factor, factor, pw // factor, factor).mean(axis=(1, 3), dtype=work)
        if np.issubdtype(block.dtype, np.integer):
            info = np.iinfo(block.dtype)
            mean = np.clip(np.rint(mean), info.min, info.max)
        out[i] = mean
    return out


# ============================================================================================
# Backends
# ============================================================================================


class ArrayReader(SlideReader):
    """An in-memory (or any sliceable) ``(C, H, W)`` array behind the reader interface (tests, PNG/JPEG)."""

    backend = "array"

    def __init__(self, array: Any, name: str = "array", mpp: float | None = None, channel_names: list[str] | None = None):
        if len(array.shape) != 3:
            raise ValueError(f"{name}: an array slide must be (C,Y,X), got shape {tuple(array.shape)}")
        self.array = array
        c, h, w = (int(n) for n in array.shape)
        super().__init__(name, [(h, w)], c, array.dtype, mpp, channel_names)

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.asarray(self.array[:, y : y + h, x : x + w])


class ReadableReader(SlideReader):
    """Any object with ``shape (C,H,W)``, ``dtype`` and ``read(y, x, h, w)`` as a single-level reader
    (thumbnails of a lazily warped or reordered image)."""

    backend = "readable"

    def __init__(self, image: Any, name: str | None = None):
        self.image = image
        c, h, w = (int(n) for n in image.shape)
        super().__init__(name or str(getattr(image, "name", getattr(image, "source", "image"))), [(h, w)], c, image.dtype,
                         getattr(image, "mpp", None), getattr(image, "channel_names", None))

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.asarray(self.image.read(y, x, h, w))


class OpenSlideReader(SlideReader):
    """OpenSlide's vendor-format support; RGBA regions composited onto white (transparent = no scan)."""

    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        try:
            self.slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideReadError(f"{path}: OpenSlide does not recognise this file as a slide; export it as OME-TIFF "
                                 "or pass a TIFF to the tifffile backend") from None
        except openslide.OpenSlideError as exc:
            raise DamagedImageError(f"{path}: OpenSlide cannot read the slide ({exc}); copy or export it again") from None
        props = self.slide.properties
        mpp = _positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        shapes = [(h, w) for w, h in self.slide.level_dimensions]
        super().__init__(str(path), shapes, 3, np.uint8, mpp, ["R", "G", "B"], list(self.slide.level_downsamples))
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        rgba = np.asarray(self.slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        alpha = rgba[..., 3:4].astype(np.uint16)
        rgb = rgba[..., :3]
        if alpha.min() < 255:  # regions the scanner skipped are transparent: show them as glass
            rgb = ((rgb.astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def close(self) -> None:
        self.slide.close()


class TiffReader(SlideReader):
    """tifffile's Zarr view of each pyramid level: only the tiles a read touches are decoded."""

    backend = "tifffile"

    def __init__(self, path: Path):
        self.tif = open_tiff(path)
        try:
            series = self.tif.series[0]
            levels = list(series.levels) if getattr(series, "levels", None) else [series]
            self._axes = levels[0].axes
            self._arrays = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(levels))]
            self._layout = _axes_layout(self._axes, tuple(levels[0].shape), path)
            shapes = [(lv.shape[lv.axes.index("Y")], lv.shape[lv.axes.index("X")]) for lv in levels]
            channels = levels[0].shape[self._axes.index(self._layout[0])] if self._layout[0] else 1
            names = ome_channel_names(self.tif.ome_metadata) if self.tif.is_ome else None
            if names is not None and len(names) != channels:
                raise ImageMetadataError(f"{path}: its OME-XML names {len(names)} channels but the file stores {channels}; "
                                         "re-export it so the header matches the pixels")
            if names is None and self._layout[0] == "S" and channels == 3:
                names = ["R", "G", "B"]
            super().__init__(str(path), shapes, channels, series.dtype, _tiff_mpp(self.tif), names)
        except BaseException:
            self.tif.close()
            raise

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        cax, order = self._layout
        index = tuple(slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None) if a == cax else 0
                      for a in self._axes)
        out = np.asarray(self._arrays[level][index])
        return out[None] if not cax else np.ascontiguousarray(out.transpose(order))

    def close(self) -> None:
        self.tif.close()


def _axes_layout(axes: str, shape: tuple[int, ...], path: Path) -> tuple[str, list[int]]:
    """(channel axis or '', transpose order of the kept axes to (C, Y, X)); extra axes must be 1."""
    if "Y" not in axes or "X" not in axes:
        raise SlideReadError(f"{path}: the TIFF series has axes {axes!r}, no Y/X plane; save (C,Y,X) or RGB planes")
    sizes = dict(zip(axes, shape))
    candidates = [a for a in axes if a not in "YX" and sizes[a] > 1]
    if len(candidates) > 1:
        raise SlideReadError(f"{path}: the TIFF has several non-spatial axes {dict((a, sizes[a]) for a in candidates)} "
                             f"(axes {axes!r}); save one 2-D plane per channel as (C,Y,X): project or select Z/T first")
    cax = candidates[0] if candidates else ("S" if "S" in axes else "C" if "C" in axes else "")
    kept = [a for a in axes if a in "YX" or a == cax]
    return cax, [kept.index(a) for a in (cax + "YX" if cax else "YX")]


def _positive_float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _tiff_mpp(tif: Any) -> float | None:
    """µm/px from OME-XML, else an Aperio ``MPP =`` description, else the resolution tags (cm/inch)."""
    if tif.is_ome:
        mpp = ome_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    page = tif.pages[0]
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", page.description or "")
    if match:
        return _positive_float(match.group(1))
    tags = page.tags
    unit, xres = tags.get("ResolutionUnit"), tags.get("XResolution")
    if unit is None or xres is None:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    per_unit = float(num) / float(den or 1)
    um = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))
    if um is None or per_unit <= 0:
        return None
    mpp = um / per_unit
    return mpp if mpp < 50 else None  # 72 dpi (353 µm/px) is a default, not a microscope's pixel size


class RasterReader(ArrayReader):
    """PNG/JPEG: not tiled, so decoded whole (refused above the in-memory limit)."""

    backend = "raster"

    def __init__(self, path: Path):
        shape, dtype = raster_properties(path)
        try:
            check_in_memory(shape, dtype, str(path))
        except ImageTooLargeError as exc:
            raise SlideReadError(f"{path}: the image {exc.describe()}; PNG/JPEG are not tiled, so export the slide as a "
                                 "tiled (OME-)TIFF") from None
        arr = read_raster(path)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        names = ["R", "G", "B"] if arr.shape[0] == 3 else None
        super().__init__(np.ascontiguousarray(arr), str(path), None, names)


def open_slide(path: str | os.PathLike, backend: str = "auto") -> SlideReader:
    """Open a slide lazily (see the module docstring); ``backend`` in ``auto|openslide|tifffile|raster``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mrxs":  # an index file beside a folder of data files: check_regular_file's size test is wrong here
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such slide file")
    else:
        path = check_regular_file(path, "slide")
    if backend == "auto":
        backend = ("openslide" if suffix in OPENSLIDE_SUFFIXES else "tifffile" if suffix in TIFF_SUFFIXES
                   else "raster" if suffix in RASTER_SUFFIXES else "")
        if not backend:
            raise SlideReadError(f"{path}: unsupported slide type {suffix!r}; use {', '.join(OPENSLIDE_SUFFIXES + TIFF_SUFFIXES)}, "
                                 "PNG or JPEG, or convert it to OME-TIFF (e.g. bfconvert)")
    if backend == "openslide":
        return OpenSlideReader(path)
    if backend == "tifffile":
        return TiffReader(path)
    return RasterReader(path)
