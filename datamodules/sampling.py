"""Crop reading and sampling shared by the ROSIE and VirTues DataModules.

The Dataset objects that use this are pickled into worker processes, so open Zarr handles are
kept in a per-process cache that is never pickled (each worker opens its own).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from datamodules.chunk_cache import ChunkCachedImage, DecodedChunkCache
from datamodules.store import DatasetStore, ImageArray


class StoreCache:
    """Per-process cache of DatasetStore and ImageArray handles, dropped on pickling.

    With ``chunk_cache_mb > 0`` images are returned as :class:`ChunkCachedImage`, so crops that
    revisit a tile copy decoded pixels instead of decoding the chunk again (each process, i.e.
    each DataLoader worker, holds at most that many MB).
    """

    def __init__(self, chunk_cache_mb: float = 0) -> None:
        if chunk_cache_mb < 0:
            raise ValueError(f"chunk_cache_mb must be >= 0, got {chunk_cache_mb}")
        self.chunk_cache_mb = chunk_cache_mb
        self._stores: dict[str, DatasetStore] = {}
        self._images: dict[tuple, ImageArray | ChunkCachedImage] = {}
        self._chunks = DecodedChunkCache(int(chunk_cache_mb * 2**20)) if chunk_cache_mb > 0 else None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"chunk_cache_mb": self.chunk_cache_mb}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:  # forked worker: handles of the parent are not reused
            self.__init__(self.chunk_cache_mb)

    def store(self, root: str) -> DatasetStore:
        self._check_pid()
        if root not in self._stores:
            self._stores[root] = DatasetStore(root)
        return self._stores[root]

    def image(self, root: str, modality: str, tissue_id: str, mpp: float) -> ImageArray | ChunkCachedImage:
        key = (root, modality, tissue_id, mpp)
        self._check_pid()
        if key not in self._images:
            image = self.store(root).image(modality, tissue_id, mpp)
            self._images[key] = ChunkCachedImage(image, self._chunks) if self._chunks is not None else image
        return self._images[key]


def read_padded(image: ImageArray | ChunkCachedImage, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None,
                fill: float = 0) -> np.ndarray:
    """Read `[y:y+h, x:x+w]`, padding the parts outside the image with `fill`.

    Used at image borders (H&E is padded with white, 255; multiplex images with 0): the patch
    centred on a border pixel still has the model's input size.
    """
    c_all, height, width = image.shape
    n_channels = c_all if channels is None else len(channels)
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
    if y0 == y and x0 == x and y1 == y + h and x1 == x + w:
        return image.read(y, x, h, w, channels)
    out = np.full((n_channels, h, w), fill, dtype=image.dtype)
    if y1 > y0 and x1 > x0:
        out[:, y0 - y : y1 - y, x0 - x : x1 - x] = image.read(y0, x0, y1 - y0, x1 - x0, channels)
    return out


def block_means(image: ImageArray, block: int, rows_per_read: int = 1024) -> np.ndarray:
    """Mean of every non-overlapping `block`×`block` square per channel: (C, H//block, W//block).

    Read in horizontal bands so a slide never has to fit in memory at once.
    """
    c, h, w = image.shape
    hb, wb = h // block, w // block
    out = np.empty((c, hb, wb), dtype=np.float32)
    band = max(block, (rows_per_read // block) * block)
    for y in range(0, hb * block, band):
        rows = min(band, hb * block - y)
        data = image.read(y, 0, rows, wb * block).astype(np.float32)
        out[:, y // block : (y + rows) // block] = data.reshape(c, rows // block, block, wb, block).mean(axis=(2, 4))
    return out


def tissue_fraction_grid(mask: np.ndarray, block: int) -> np.ndarray:
    """Fraction of tissue pixels in every `block`×`block` square (H//block, W//block)."""
    hb, wb = mask.shape[0] // block, mask.shape[1] // block
    m = mask[: hb * block, : wb * block].astype(np.float32)
    return m.reshape(hb, block, wb, block).mean(axis=(1, 3))


def sample_subimages(mask: np.ndarray | None, shape: tuple[int, int], size: int, min_tissue: float,
                     rng: np.random.Generator, factor: int = 4) -> np.ndarray:
    """The VirTues paper's sub-images: `factor`·N random `size` squares (N = squares that fit), >= `min_tissue` tissue.

    Returns (K, 2) top-left corners. Images smaller than `size` give one corner at (0, 0), padded later.
    """
    h, w = shape
    if h < size or w < size:
        return np.zeros((1, 2), dtype=np.int64)
    n = max(1, (h // size) * (w // size))
    ys = rng.integers(0, h - size + 1, size=factor * n)
    xs = rng.integers(0, w - size + 1, size=factor * n)
    corners = np.stack([ys, xs], axis=1)
    if mask is None:
        return corners
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[ys + size, xs + size] - integral[ys, xs + size] - integral[ys + size, xs] + integral[ys, xs]
    return corners[sums / (size * size) >= min_tissue]


def no_validation_split(split: str, data_dirs: object) -> str:
    """Why training refuses to validate on another split: early stopping and checkpoint selection
    on test tissues would leak the test set into the model that is later scored on it."""
    return (f"{data_dirs}: no tissue has split {split!r}, so there is nothing to validate on (test tissues are never "
            "used for validation); mark some tissues 'val' in metadata/tissues.parquet, or train without validation "
            "with --trainer.limit_val_batches 0")
