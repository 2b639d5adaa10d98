"""Output files of a prediction: the float32 OME-Zarr image, the OME-TIFF copy, local temporaries.

Every file appears complete or not at all: the Zarr image is written under the dataset writer's
temporary path (:meth:`datamodules.store.DatasetWriter.atomic_path`), the OME-TIFF and other
single files under a local temporary name that is renamed (or uploaded) when writing succeeded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import tifffile
import zarr
from zarr.codecs import BloscCodec

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


def write_ome_tiff(fs: Any, target: str, image: Any, channel_names: Sequence[str], mpp: float, band: int = CHUNK,
                   description: str | None = None) -> None:
    """Uncompressed float32 OME-TIFF (``CYX``, channel names, pixel size) copied band by band.

    Memory-mapped (``tifffile.memmap``), so it is written in the order the Zarr image is read and
    never held in memory; written under a temporary name and renamed.
    """
    m, h, w = image.shape
    meta = {"axes": "CYX", "Channel": {"Name": [str(c) for c in channel_names]},
            "PhysicalSizeX": float(mpp), "PhysicalSizeXUnit": "µm", "PhysicalSizeY": float(mpp), "PhysicalSizeYUnit": "µm"}
    if description:
        meta["Description"] = description
    with local_output(fs, target, ".ome.tif") as tmp:
        mm = tifffile.memmap(tmp, shape=(m, h, w), dtype="float32", ome=True, metadata=meta, photometric="minisblack")
        for y in range(0, h, band):
            mm[:, y : y + band] = np.asarray(image[:, y : y + band])
        mm.flush()
        del mm
