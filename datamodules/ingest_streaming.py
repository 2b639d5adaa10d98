"""Streaming ingest: slide-sized images enter the layout shard by shard, checked on the way through.

Why: a whole-slide CODEX (50 channels × 30,000² px × uint16 ≈ 90 GB) cannot be read whole, yet it
must reach the same layout with the same guarantees as a small image. Here

* the image is opened lazily (:func:`datamodules.slide_readers.open_slide`: tiled/pyramidal TIFF,
  OME-TIFF, and for H&E the OpenSlide formats); only the header is checked before the dataset is
  touched (channel count against the names/table, dtype, H&E = RGB uint8);
* pixels are copied one output shard (``C × 1024 × 1024``) at a time into the store's OME-Zarr
  layout (same codecs as :func:`datamodules.ome_zarr.write_ome_zarr`), reordered into the panel on
  the fly (unmeasured channels zero), and each shard is validated as it passes (NaN/inf refuse the
  ingest, negative values are counted for the warning); the image is written under the dataset
  writer's temporary name, so an error leaves the dataset as it was;
* the tissue mask (when none is given) comes from an Otsu threshold of a thumbnail (a pyramid level
  when the file has one), resampled to full resolution by nearest neighbour.

Registration of a large H&E works on downsampled images and warps tile by tile
(:class:`datamodules.registration.WarpedImage`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from datamodules import layout
from datamodules.ingest_files import HE, IngestError
from datamodules.ome_zarr import CHUNK_YX, SHARD_YX, omero_attrs, zarr_store
from datamodules.preprocess import otsu_tissue_mask
from datamodules.slide_readers import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, ReadableReader, SlideReader, open_slide

#: Images above this many (uncompressed) bytes are ingested shard by shard unless told otherwise.
STREAM_ABOVE_BYTES = 256 * 2**20
#: Bytes of one statistics row block (statistics read the stored image in row blocks and work in float64).
STATS_BLOCK_BYTES = 16 * 2**20


def streamable(path: Path) -> bool:
    """Files that can be read region by region (not folders, not PNG/JPEG)."""
    return (path.is_file() or path.suffix.lower() == ".mrxs") and path.suffix.lower() in TIFF_SUFFIXES + OPENSLIDE_SUFFIXES


def should_stream(path: Path, stream: bool | None) -> bool:
    """``stream`` when given (False for a file that cannot stream is fine, True is refused), else by size."""
    if stream is not None:
        if stream and not streamable(path):
            raise IngestError(path, "--stream", "only tiled TIFF / OME-TIFF and slide files (.svs, .ndpi, ...) stream",
                              "convert the image to a tiled OME-TIFF, or drop --stream")
        return stream
    if not streamable(path):
        return False
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return True  # slide formats are read through OpenSlide, region by region, whatever their size
    try:
        with open_slide(path) as reader:
            c, h, w = reader.shape
            return c * h * w * reader.dtype.itemsize > STREAM_ABOVE_BYTES
    except Exception:  # noqa: BLE001 - the in-memory reader reports the damage with its own message
        return False


def open_source(path: Path) -> Any:
    try:
        return open_slide(path)
    except ValueError as exc:  # SlideReadError, DamagedImageError, ImageMetadataError
        raise IngestError(path, "file", str(exc).removeprefix(f"{path}: "), "re-export the image as a tiled OME-TIFF") from None


def check_lazy_he(reader: Any, source: str) -> None:
    c = reader.shape[0]
    if c != 3:
        raise IngestError(source, "channels", f"H&E must have 3 colour channels (RGB), got {c} (shape {reader.shape})",
                          "export the H&E as an 8-bit RGB image" + (" (drop the alpha channel)" if c == 4 else ""))
    if reader.dtype != np.uint8:
        raise IngestError(source, "dtype", f"H&E must be 8-bit RGB, got {reader.dtype.itemsize * 8}-bit {reader.dtype}",
                          "convert to uint8 RGB (e.g. rescale a 16-bit scan to 0-255) before ingesting")


def check_lazy_multiplex(reader: Any, n_expected: int, names_from: str, source: str) -> None:
    c = reader.shape[0]
    if c != n_expected:
        raise IngestError(source, "channels", f"image has {c} channels (shape {reader.shape}) but the {names_from} lists "
                          f"{n_expected}", "make the channel table list exactly one row per image channel, in image order")
    if not (np.issubdtype(reader.dtype, np.integer) or np.issubdtype(reader.dtype, np.floating)):
        raise IngestError(source, "dtype", f"unsupported pixel type {reader.dtype}", "save integer or float pixels")


class PanelImage:
    """The source in the dataset's panel order (unmeasured channels zero), validated as it is read.

    NaN/inf pixels raise :class:`IngestError` (the write is then abandoned); the smallest value seen
    is kept for the negative-values warning."""

    def __init__(self, reader: Any, source_names: Sequence[str], panel_names: Sequence[str], source: str):
        self.reader = reader
        index = {n: i for i, n in enumerate(source_names)}
        self.index = [index.get(str(n)) for n in panel_names]
        self.shape = (len(self.index), *reader.shape[1:])
        self.dtype = np.dtype(reader.dtype)
        self.source = source
        self.min_seen: float = math.inf

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        block = np.asarray(self.reader.read(y, x, h, w))
        if self.index == list(range(block.shape[0])):
            out = block
        else:
            out = np.zeros((len(self.index), h, w), dtype=block.dtype)
            for j, i in enumerate(self.index):
                if i is not None:
                    out[j] = block[i]
        if np.issubdtype(out.dtype, np.floating):
            bad = ~np.isfinite(out)
            if bad.any():
                chans = sorted(set(np.nonzero(bad)[0].tolist()))[:10]
                raise IngestError(self.source, "pixels", f"NaN/inf pixels in the region y={y} x={x} ({h}×{w}) (channels {chans})",
                                  "replace them, e.g. np.nan_to_num(image, nan=0, posinf=0, neginf=0), and re-export")
        if out.size and (np.issubdtype(out.dtype, np.signedinteger) or np.issubdtype(out.dtype, np.floating)):
            self.min_seen = min(self.min_seen, float(out.min()))
        return out if channels is None else out[list(channels)]


def write_image_streaming(writer: Any, modality: str, tissue_id: str, image: Any, mpp: float,
                          channel_names: Sequence[str], progress: bool = False) -> str:
    """Copy ``image`` (``shape``/``dtype``/``read``) into the layout shard by shard; atomic like ``write_image``."""
    c, h, w = image.shape
    dtype = np.dtype(image.dtype)
    if modality == HE and (c != 3 or dtype != np.uint8):
        raise IngestError(tissue_id, "image", f"H&E must be (3,Y,X) uint8, got {image.shape} {dtype}", "export RGB uint8")
    rel = layout.image_path(modality, mpp, tissue_id)
    shard = (c, min(SHARD_YX, _round_up(h, CHUNK_YX)), min(SHARD_YX, _round_up(w, CHUNK_YX)))
    chunk = (c, min(CHUNK_YX, shard[1]), min(CHUNK_YX, shard[2]))
    with writer.atomic_path(rel) as tmp:
        group = zarr.open_group(store=zarr_store(writer.fs, tmp, read_only=False), mode="w", zarr_format=3)
        group.attrs.update(omero_attrs(tissue_id, channel_names, mpp))
        arr = group.create_array(
            "0", shape=(c, h, w), dtype=dtype, chunks=chunk, shards=shard,
            compressors=[BloscCodec(typesize=dtype.itemsize, cname="lz4", clevel=3, shuffle="bitshuffle"), Crc32cCodec()],
            dimension_names=("c", "y", "x"), fill_value=0, config={"write_empty_chunks": True},
        )
        ys, xs = range(0, h, shard[1]), range(0, w, shard[2])
        cells = [(y, x) for y in ys for x in xs]
        if progress:
            from tqdm import tqdm

            cells = tqdm(cells, desc=f"ingest {tissue_id}", unit="shard")
        for y, x in cells:
            bh, bw = min(shard[1], h - y), min(shard[2], w - x)
            arr[:, y : y + bh, x : x + bw] = image.read(y, x, bh, bw)
    return writer.target(rel)


def thumbnail_tissue_mask(image: Any, modality: str, max_side: int | None = None) -> np.ndarray | None:
    """Full-resolution ``(H, W)`` bool tissue mask from an Otsu threshold of a thumbnail (None: no tissue).

    A :class:`SlideReader` makes the thumbnail from its coarsest fine-enough pyramid level; any other
    ``read``-able image is block-averaged from full-resolution tiles. The mask is expanded by
    nearest neighbour straight into its final array (one bool per pixel, the layout's format)."""
    reader = image if isinstance(image, SlideReader) else ReadableReader(image)
    if max_side is None:  # the Otsu signal is float64 per channel: keep it near 128 MB
        max_side = int(np.clip(math.sqrt(2**24 / reader.shape[0]), 256, 2048))
    small, factor = reader.thumbnail(max_side)
    if np.issubdtype(small.dtype, np.floating) and not np.isfinite(small).all():  # a NaN spreads into its block's mean
        chans = sorted(set(np.nonzero(~np.isfinite(small))[0].tolist()))[:10]
        raise IngestError(reader.name, "pixels", f"NaN/inf pixels (channels {chans}, seen in a {factor:g}× overview)",
                          "replace them, e.g. np.nan_to_num(image, nan=0, posinf=0, neginf=0), and re-export")
    mask = otsu_tissue_mask(small, modality)
    if not mask.any():
        return None
    _, h, w = reader.shape
    yi = np.minimum((np.arange(h) / factor).astype(np.int64), mask.shape[0] - 1)
    xi = np.minimum((np.arange(w) / factor).astype(np.int64), mask.shape[1] - 1)
    return mask[yi[:, None], xi[None, :]]


def stats_block_rows(shape: Sequence[int], dtype: Any) -> int:
    """Rows per statistics block so that one block stays near :data:`STATS_BLOCK_BYTES`."""
    c, _, w = shape
    return max(16, int(STATS_BLOCK_BYTES // max(1, c * w * np.dtype(dtype).itemsize)))


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m
