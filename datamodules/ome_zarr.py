"""OME-Zarr v3 images of the dataset layout: lazy, checked partial reads and the one writer.

* Images are ``c,y,x``, sharded (shard ``C×1024×1024``, inner chunk ``C×256×256``) with
  blosc-lz4-bitshuffle and a crc32c per inner chunk, like the VirTues example dataset; a crop is a
  partial read of the inner chunks it touches, never of the whole image.
* Zarr silently returns the fill value for a chunk whose file is absent. For a measured image that
  is data loss, so reads check that every shard file they touch exists and raise
  :class:`MissingChunkError` naming the file otherwise; a chunk that fails to decode is
  reported as corrupt, naming its file.
* Paths are fsspec URLs or local paths, so images can live on object storage.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from datamodules.limits import ImageTooLargeError, check_in_memory
from datamodules.store_errors import MissingChunkError, StoreError

SHARD_YX = 1024
CHUNK_YX = 256


def normalise_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Collapse `a/../b` for local paths so messages show the real location."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return os.path.normpath(path) if protocol in ("file", "local") else path.rstrip("/")


def join_path(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


class ImageArray:
    """A lazily opened OME-Zarr image: metadata at open, pixels only on `read`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, mpp: float, opened_store: Any | None = None):
        self.fs = fs
        self.path = path
        self.mpp = mpp
        if not fs.exists(join_path(path, "zarr.json")):
            raise StoreError(f"{path}: not an OME-Zarr v3 image (no zarr.json)")
        store = opened_store if opened_store is not None else zarr_store(fs, path, read_only=True)
        try:
            group = zarr.open_group(store=store, mode="r")
            self._array = group["0"]
        except Exception as exc:  # zarr raises many types for broken metadata
            raise StoreError(f"{path}: cannot open the image metadata ({type(exc).__name__}: {exc})") from exc
        attrs = dict(group.attrs)
        omero = attrs.get("ome", attrs).get("omero", {}) if isinstance(attrs.get("ome", attrs), dict) else {}
        self.channel_names: list[str] = [c.get("label", str(i)) for i, c in enumerate(omero.get("channels", []))]
        self._shard_shape = tuple(self._array.shards or self._array.chunks)
        self._present_shards: set[tuple[int, ...]] = set()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    @property
    def inner_chunk_shape(self) -> tuple[int, int, int]:
        """The unit zarr decodes: (C, 256, 256) inner chunks of the sharded layout."""
        return tuple(self._array.chunks)  # type: ignore[return-value]

    def shard_files(self, y0: int = 0, x0: int = 0, y1: int | None = None, x1: int | None = None) -> list[tuple[tuple[int, ...], str]]:
        """Shard index tuples and file paths that the region [y0:y1, x0:x1] (all channels) touches."""
        c, h, w = self.shape
        y1 = h if y1 is None else y1
        x1 = w if x1 is None else x1
        sc, sy, sx = self._shard_shape
        out = []
        for ci, yi, xi in itertools.product(
            range(0, (c + sc - 1) // sc), range(y0 // sy, (max(y1, y0 + 1) - 1) // sy + 1), range(x0 // sx, (max(x1, x0 + 1) - 1) // sx + 1)
        ):
            out.append(((ci, yi, xi), join_path(self.path, "0", "c", str(ci), str(yi), str(xi))))
        return out

    def missing_shards(self) -> list[str]:
        return [p for _, p in self.shard_files() if not self.fs.exists(p)]

    def _check_shards(self, y0: int, x0: int, y1: int, x1: int) -> None:
        for key, path in self.shard_files(y0, x0, y1, x1):
            if key in self._present_shards:
                continue
            if not self.fs.exists(path):
                raise MissingChunkError(
                    f"{self.path}: chunk file '0/c/{'/'.join(map(str, key))}' is missing, so its pixels are unavailable "
                    f"(zarr would silently return zeros). Re-copy or re-ingest this image."
                )
            self._present_shards.add(key)

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """Partial read of `[channels, y:y+h, x:x+w]`; only the inner chunks it touches are decoded."""
        c, height, width = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"{self.path}: crop y={y} x={x} h={h} w={w} is outside the image of size {height}×{width}")
        channels = None if channels is None else list(channels)
        n_channels = c if channels is None else len(channels)
        try:
            check_in_memory((n_channels, h, w), self.dtype, self.path, "Read it in crops (ImageArray.read) or tiles.")
        except ImageTooLargeError as exc:
            raise StoreError(str(exc)) from None
        self._check_shards(y, x, y + h, x + w)
        try:
            if channels is None:
                return np.asarray(self._array[:, y : y + h, x : x + w])
            idx = channels
            if idx and idx == list(range(idx[0], idx[-1] + 1)):
                return np.asarray(self._array[idx[0] : idx[-1] + 1, y : y + h, x : x + w])
            return np.asarray(self._array.get_orthogonal_selection((idx, slice(y, y + h), slice(x, x + w))))
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # codec / checksum / short-read errors surface deep inside zarr
            files = ", ".join(f"'0/c/{'/'.join(map(str, k))}'" for k, _ in self.shard_files(y, x, y + h, x + w))
            raise StoreError(
                f"{self.path}: chunk file(s) {files} are corrupt or truncated ({type(exc).__name__}: {exc}). "
                "Re-copy or re-ingest this image."
            ) from exc

    def read_all(self) -> np.ndarray:
        c, h, w = self.shape
        return self.read(0, 0, h, w)


def zarr_store(fs: fsspec.AbstractFileSystem, path: str, read_only: bool) -> Any:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore(fs=_async_wrap(fs), path=path, read_only=read_only)


def _async_wrap(fs: fsspec.AbstractFileSystem) -> Any:
    """zarr's FsspecStore wants an async filesystem; wrap a sync one when needed."""
    if getattr(fs, "async_impl", False):
        return fs
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs)


def omero_attrs(name: str, channel_names: Sequence[str], mpp: float) -> dict:
    palette = ["FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FFFFFF"]
    return {
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "name": name,
                    "axes": [
                        {"name": "c", "type": "channel"},
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp, mpp]}]}],
                }
            ],
            "omero": {
                "id": 1,
                "name": name,
                "version": "0.5",
                "channels": [
                    {"active": True, "coefficient": 1.0, "color": palette[i % len(palette)], "family": "linear",
                     "inverted": False, "label": str(c)}
                    for i, c in enumerate(channel_names)
                ],
            },
        }
    }


def write_ome_zarr(fs: fsspec.AbstractFileSystem, path: str, image: np.ndarray, mpp: float, channel_names: Sequence[str],
                   name: str | None = None) -> None:
    """Write `image` (C,Y,X) as an OME-Zarr v3 image at `path` (not atomic by itself)."""
    if image.ndim != 3:
        raise ValueError(f"{path}: image must be (C,Y,X), got shape {image.shape}")
    if len(channel_names) != image.shape[0]:
        raise ValueError(f"{path}: {image.shape[0]} channels but {len(channel_names)} channel names")
    c, h, w = image.shape
    store = zarr_store(fs, path, read_only=False)
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    group.attrs.update(omero_attrs(name or path.rstrip("/").split("/")[-1].replace(".ome.zarr", ""), channel_names, mpp))
    shard = (c, min(SHARD_YX, _round_up(h, CHUNK_YX)), min(SHARD_YX, _round_up(w, CHUNK_YX)))
    chunk = (c, min(CHUNK_YX, shard[1]), min(CHUNK_YX, shard[2]))
    arr = group.create_array(
        "0", shape=image.shape, dtype=image.dtype, chunks=chunk, shards=shard,
        # blosc as in the VirTues example; a crc32c per inner chunk makes silent corruption a read error
        compressors=[BloscCodec(typesize=image.dtype.itemsize, cname="lz4", clevel=3, shuffle="bitshuffle"), Crc32cCodec()],
        dimension_names=("c", "y", "x"), fill_value=0, config={"write_empty_chunks": True},
    )
    arr[...] = image


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m
