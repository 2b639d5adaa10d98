"""Multi-resolution outputs that viewers open at slide scale, written tile by tile.

Why: a slide-sized prediction stored as one full-resolution level makes napari or QuPath decode the
whole image to show an overview. Viewers read pyramids:

* :func:`write_ngff_pyramid` adds 2×-downsampled levels ``1, 2, ...`` beside level ``0`` of an
  OME-Zarr image and lists them in the NGFF ``multiscales`` metadata (``scale`` transforms doubling
  per level), as napari-ome-zarr and other NGFF readers expect;
* :func:`write_pyramidal_ome_tiff` writes a tiled OME-TIFF whose full-resolution pages carry the
  reduced levels as SubIFDs (the layout Bio-Formats/QuPath read), with the pixel size in the
  OME-XML and in the resolution tags.

Both read their source in tiles and write in tiles (level k is computed from level k-1 by 2×2 block
means), so the memory used is a few tiles, whatever the slide size.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import tifffile
import zarr
from zarr.codecs import BloscCodec

from datamodules.ome_zarr import CHUNK_YX, zarr_store
from datamodules.slide_readers import ArrayReader, block_mean

#: Levels are added until the longer side is at most this many pixels.
MIN_TOP_SIDE = 512
#: Tile side of the OME-TIFF (QuPath reads 512 px tiles well).
TIFF_TILE = 512


def level_count(h: int, w: int, min_top_side: int = MIN_TOP_SIDE, max_levels: int = 12) -> int:
    """Number of levels (full resolution included) halving until the longer side is ≤ ``min_top_side``."""
    n = 1
    while max(h, w) > min_top_side and n < max_levels:
        h, w = -(-h // 2), -(-w // 2)
        n += 1
    return n


def as_reader(source: Any) -> Any:
    """Anything with ``read(y, x, h, w)`` and ``shape (C,H,W)``, or a ``(C,H,W)`` sliceable array."""
    return source if hasattr(source, "read") and hasattr(source, "shape") else ArrayReader(source)


def downsample_into(source: Any, target: Any, tile: int = CHUNK_YX) -> None:
    """Fill ``target`` (C, ceil(H/2), ceil(W/2)) with 2×2 block means of ``source``, one output tile at a time."""
    _, h, w = source.shape
    _, th, tw = target.shape
    for y in range(0, th, tile):
        for x in range(0, tw, tile):
            oh, ow = min(tile, th - y), min(tile, tw - x)
            sy, sx = 2 * y, 2 * x
            block = np.asarray(source.read(sy, sx, min(2 * oh, h - sy), min(2 * ow, w - sx)))
            target[:, y : y + oh, x : x + ow] = block_mean(block, 2)[:, :oh, :ow]


# ============================================================================================
# OME-Zarr (NGFF multiscales)
# ============================================================================================


def _multiscales(attrs: dict) -> tuple[dict, dict]:
    """(the dict holding ``multiscales``, the first multiscale) of NGFF 0.5 (``ome``) or 0.4 attributes."""
    holder = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    if not holder.get("multiscales"):
        raise ValueError("not an OME-Zarr image: no NGFF 'multiscales' in its attributes")
    return holder, holder["multiscales"][0]


def write_ngff_pyramid(zarr_image_path: str | os.PathLike, n_levels: int | None = None, min_top_side: int = MIN_TOP_SIDE,
                       storage_options: dict | None = None) -> list[tuple[int, ...]]:
    """Add levels ``1..n-1`` (2× steps, block means) to the OME-Zarr image at ``zarr_image_path``.

    Level 0 is read in tiles; each level is written chunk by chunk from the previous one; the NGFF
    ``multiscales[0].datasets`` are rewritten with one ``scale`` transform per level (level 0's
    scale doubled in Y/X per step). Returns the shapes of all levels. Idempotent: existing levels
    above 0 are replaced.
    """
    fs, path = fsspec.core.url_to_fs(str(zarr_image_path), **(storage_options or {}))
    group = zarr.open_group(store=zarr_store(fs, path.rstrip("/"), read_only=False), mode="r+")
    attrs = dict(group.attrs)
    holder, ms = _multiscales(attrs)
    base = group["0"]
    c, h, w = base.shape
    n = n_levels or level_count(h, w, min_top_side)
    scale0 = next(t["scale"] for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
    chunk_c = base.chunks[0]
    shapes: list[tuple[int, ...]] = [(c, h, w)]
    datasets = [ms["datasets"][0]]
    source: Any = as_reader(base)
    for k in range(1, n):
        lh, lw = -(-shapes[-1][1] // 2), -(-shapes[-1][2] // 2)
        level = group.create_array(
            str(k), shape=(c, lh, lw), dtype=base.dtype, chunks=(chunk_c, min(CHUNK_YX, lh), min(CHUNK_YX, lw)),
            compressors=BloscCodec(typesize=base.dtype.itemsize, cname="lz4", clevel=3, shuffle="bitshuffle"),
            dimension_names=("c", "y", "x"), fill_value=0, overwrite=True, config={"write_empty_chunks": True},
        )
        downsample_into(source, level)
        source = as_reader(level)
        shapes.append((c, lh, lw))
        scale = list(scale0[:-2]) + [scale0[-2] * 2**k, scale0[-1] * 2**k]
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    ms = {**ms, "datasets": datasets, "type": "2x2 block mean"}
    holder["multiscales"] = [ms] + list(holder["multiscales"][1:])
    group.attrs.update(attrs)
    return shapes


# ============================================================================================
# Pyramidal OME-TIFF
# ============================================================================================


def _tiles(reader: Any, tile: int, rgb: bool) -> Iterator[np.ndarray]:
    """Full-size tiles (edge tiles zero-padded) in TIFF order: channel by channel, rows, columns.

    For planar multi-channel images each tile is read for one channel: a source that stores all
    channels in one chunk decodes it once per channel (memory stays one tile)."""
    c, h, w = reader.shape
    planes = [None] if rgb else [[i] for i in range(c)]
    for channels in planes:
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                th, tw = min(tile, h - y), min(tile, w - x)
                block = np.asarray(reader.read(y, x, th, tw) if channels is None else reader.read(y, x, th, tw, channels=channels))
                data = block.transpose(1, 2, 0) if rgb else block[0]
                if (th, tw) != (tile, tile):
                    pad = ((0, tile - th), (0, tile - tw)) + (((0, 0),) if rgb else ())
                    data = np.pad(data, pad)
                yield np.ascontiguousarray(data)


def write_pyramidal_ome_tiff(source_reader: Any, path: str | os.PathLike, mpp: float, channel_names: Sequence[str],
                             n_levels: int | None = None, tile: int = TIFF_TILE, compression: str | None = "zlib",
                             min_top_side: int = MIN_TOP_SIDE, workdir: str | os.PathLike | None = None) -> list[tuple[int, ...]]:
    """Write ``source_reader`` ``(C, H, W)`` as a tiled, pyramidal OME-TIFF at ``path`` (local file).

    * RGB uint8 with 3 channels (H&E) is written interleaved (``photometric=rgb``), anything else as
      one greyscale plane per channel (``CYX``, channel names in the OME-XML);
    * reduced levels (2× block means, computed tile by tile into a temporary Zarr beside ``path``)
      are SubIFDs of each full-resolution page (``subfiletype=1``), as Bio-Formats/QuPath expect;
    * the file is written under a temporary name and renamed, so it appears complete or not at all.

    Returns the ``(C, H, W)`` shape of every level.
    """
    reader = as_reader(source_reader)
    c, h, w = reader.shape
    if len(channel_names) != c:
        raise ValueError(f"{path}: {c} channels but {len(channel_names)} channel names")
    dtype = np.dtype(reader.dtype)
    rgb = c == 3 and dtype == np.uint8 and [str(n).upper() for n in channel_names] in (["R", "G", "B"], ["RED", "GREEN", "BLUE"])
    n = n_levels or level_count(h, w, min_top_side)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp_dir = tempfile.mkdtemp(prefix=".pyramid-", dir=workdir or folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        levels = [reader]
        for k in range(1, n):
            _, ph, pw = levels[-1].shape
            arr = zarr.create_array(store=os.path.join(tmp_dir, str(k)), shape=(c, -(-ph // 2), -(-pw // 2)), dtype=dtype,
                                    chunks=(1 if c > 4 else c, CHUNK_YX, CHUNK_YX), fill_value=0,
                                    compressors=BloscCodec(typesize=dtype.itemsize, cname="lz4", clevel=1, shuffle="bitshuffle"))
            downsample_into(levels[-1], arr)
            levels.append(as_reader(arr))
        meta: dict[str, Any] = {"axes": "YXS" if rgb else "CYX", "PhysicalSizeX": float(mpp), "PhysicalSizeXUnit": "µm",
                                "PhysicalSizeY": float(mpp), "PhysicalSizeYUnit": "µm"}
        if not rgb:
            meta["Channel"] = {"Name": [str(n) for n in channel_names]}
        photometric = "rgb" if rgb else "minisblack"
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for k, level in enumerate(levels):
                _, lh, lw = level.shape
                res = 1e4 / (float(mpp) * 2**k)  # pixels per cm
                shape = (lh, lw, 3) if rgb else (c, lh, lw)
                kwargs: dict[str, Any] = dict(shape=shape, dtype=dtype, tile=(tile, tile), photometric=photometric,
                                              compression=compression, resolution=(res, res), resolutionunit="CENTIMETER")
                if rgb:
                    kwargs["planarconfig"] = "contig"
                if k == 0:
                    tif.write(_tiles(level, tile, rgb), subifds=n - 1, metadata=meta, **kwargs)
                else:
                    tif.write(_tiles(level, tile, rgb), subfiletype=1, metadata=None, **kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return [tuple(int(s) for s in lv.shape) for lv in levels]


def ngff_level_paths(zarr_image_path: str | os.PathLike) -> list[str]:
    """The dataset paths of an OME-Zarr image's multiscales, finest first (for checks and readers)."""
    group = zarr.open_group(str(zarr_image_path), mode="r")
    _, ms = _multiscales(dict(group.attrs))
    return [d["path"] for d in ms["datasets"]]


def pyramid_factor(shape0: Sequence[int], shape_k: Sequence[int]) -> float:
    """Downsample of a level relative to level 0 (mean of the Y and X ratios)."""
    return (shape0[-2] / shape_k[-2] + shape0[-1] / shape_k[-1]) / 2 if math.prod(shape_k) else math.inf
