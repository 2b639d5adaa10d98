"""Output files of a prediction: the float32 OME-Zarr image and its pyramid, the OME-TIFF copy, local temporaries.

Every file appears complete or not at all: the Zarr image is written under the dataset writer's
temporary path (:meth:`datamodules.store.DatasetWriter.atomic_path`), the OME-TIFF and other
single files under a local temporary name that is renamed (or uploaded) when writing succeeded.
"""

from __future__ import annotations

import contextlib
import html
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

from datamodules.pyramids import MIN_TOP_SIDE, TIFF_TILE, write_ngff_pyramid, write_pyramidal_ome_tiff
from datamodules.store import omero_attrs, zarr_store

#: Output Zarr chunk side (output px); also the band height of the OME-TIFF copy and the blend.
CHUNK = 256
#: Predictions are written as this modality, so a prediction folder reads like a measured dataset.
PREDICTED_MODALITY = "codex"


def fsspec_root(out: str | os.PathLike) -> tuple[Any, str]:
    """The filesystem and root path (no trailing ``/``) of an output folder, local or remote."""
    fs, root = fsspec.core.url_to_fs(str(out))
    return fs, root.rstrip("/")


def create_zarr_image(fs: Any, path: str, shape: tuple[int, int, int], mpp: float, channel_names: Sequence[str],
                      name: str, chunk: int = CHUNK, provenance: dict | None = None) -> Any:
    """An empty float32 OME-Zarr v3 image to be filled tile by tile.

    Unsharded inner chunks ``(M, chunk, chunk)`` (blosc-lz4-bitshuffle like the store), so a tile of
    ``chunk`` output px writes whole chunks once; ``write_empty_chunks`` so background chunks exist and
    the store's missing-chunk check holds. ``provenance`` (checkpoint SHA-256, model µm/px, ...) is
    kept in the group attributes under ``virtuplex``, beside the OME µm/px and channel names.
    """
    m, h, w = shape
    group = zarr.open_group(store=zarr_store(fs, path, read_only=False), mode="w", zarr_format=3)
    group.attrs.update(omero_attrs(name, channel_names, mpp))
    if provenance:
        group.attrs["virtuplex"] = dict(provenance)
    return group.create_array(
        "0", shape=shape, dtype="float32", chunks=(m, min(chunk, h), min(chunk, w)),
        compressors=BloscCodec(typesize=4, cname="lz4", clevel=3, shuffle="bitshuffle"),
        dimension_names=("c", "y", "x"), fill_value=0, config={"write_empty_chunks": True},
    )


def open_zarr_image(fs: Any, path: str, read_only: bool = True) -> Any:
    """The ``(M, H, W)`` array of a written OME-Zarr image, read-only unless asked (ranks fill their regions)."""
    array = zarr.open_group(store=zarr_store(fs, path, read_only=read_only), mode="r" if read_only else "r+")["0"]
    # the creation-time setting is not stored: background chunks must still be written
    return array if read_only else array.with_config({"write_empty_chunks": True})


@contextlib.contextmanager
def local_output(fs: Any, target: str, suffix: str) -> Iterator[str]:
    """A local temporary file that becomes ``target`` when the block succeeds (rename, or upload)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    folder = os.path.dirname(target) if local else tempfile.gettempdir()
    if local:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        if local:
            os.replace(tmp, target)
        else:
            fs.put(tmp, target)
            os.remove(tmp)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add_ngff_pyramid(fs: Any, path: str, min_top_side: int = MIN_TOP_SIDE) -> int:
    """Add the NGFF multiscales levels (2× block means) to the OME-Zarr image at ``path``; returns the levels.

    Levels halve until the longer side is at most ``min_top_side`` px, so an image of at most that
    side keeps one level (its ``multiscales`` metadata stays valid, listing dataset ``0`` only).
    Level ``0`` is untouched: the store and every reader of the prediction read it alone
    (:class:`datamodules.ome_zarr.ImageArray` opens ``0``; resolutions are folders, not levels).
    """
    return len(write_ngff_pyramid(fs.unstrip_protocol(path), min_top_side=min_top_side))


class _ChannelTiles:
    """A ``(M, H, W)`` array re-chunked to one channel per chunk, beside the OME-TIFF being written.

    The OME-TIFF is written channel by channel; the output Zarr keeps all markers in one chunk,
    so reading a tile of one channel would decode all of them (M times over). One pass copies the
    image into ``(1, tile, tile)`` chunks (each source chunk decoded once), read back per channel.
    """

    def __init__(self, image: Any, folder: str, tile: int):
        m, h, w = image.shape
        self.array = zarr.create_array(store=folder, shape=(m, h, w), dtype=image.dtype, chunks=(1, min(tile, h), min(tile, w)),
                                       compressors=BloscCodec(typesize=4, cname="lz4", clevel=1, shuffle="bitshuffle"),
                                       fill_value=0)
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                self.array[:, y : y + tile, x : x + tile] = np.asarray(image[:, y : y + tile, x : x + tile])
        self.shape = (m, h, w)
        self.dtype = np.dtype(image.dtype)

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        if channels is None:
            return np.asarray(self.array[:, y : y + h, x : x + w])
        return np.stack([np.asarray(self.array[c, y : y + h, x : x + w]) for c in channels])


def ome_tiff_tile(h: int, w: int) -> int:
    """TIFF tile side: :data:`TIFF_TILE` px, or the image's longer side rounded up to 16 when smaller."""
    return min(TIFF_TILE, max(16, -(-max(h, w) // 16) * 16))


def write_ome_tiff(fs: Any, target: str, image: Any, channel_names: Sequence[str], mpp: float,
                   description: str | None = None, min_top_side: int = MIN_TOP_SIDE) -> int:
    """Tiled, pyramidal float32 OME-TIFF (``CYX``, channel names, pixel size) of a ``(M, H, W)`` array.

    Written by :func:`datamodules.pyramids.write_pyramidal_ome_tiff` tile by tile (512 px tiles,
    uncompressed like the Zarr chunks' raw floats would barely shrink): full resolution plus SubIFD
    levels halving until the longer side is at most ``min_top_side`` px (so ≥ 2 levels above
    ``min_top_side``). ``description`` (provenance) goes into the OME-XML. Written under a local
    temporary name and renamed (or uploaded): the file appears complete or not at all. Returns the
    number of levels.
    """
    m, h, w = image.shape
    tile = ome_tiff_tile(h, w)
    with local_output(fs, target, ".ome.tif") as tmp:
        work = tempfile.mkdtemp(prefix=".ome-tiff-", dir=os.path.dirname(tmp))
        try:
            source = _ChannelTiles(image, os.path.join(work, "channels.zarr"), tile)
            levels = write_pyramidal_ome_tiff(source, tmp, mpp, [str(c) for c in channel_names], tile=tile,
                                              compression=None, min_top_side=min_top_side, workdir=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if description:
            _set_description(tmp, description)
    return len(levels)


def _set_description(path: str, description: str) -> None:
    """Put ``description`` into the OME-XML ``Image`` (before ``Pixels``, where the schema wants it)."""
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages[0].description
    if "<Pixels " not in xml:
        return
    xml = xml.replace("<Pixels ", f"<Description>{html.escape(description, quote=False)}</Description><Pixels ", 1)
    tifffile.tiffcomment(path, comment=xml.encode("utf-8"), pageindex=0)
