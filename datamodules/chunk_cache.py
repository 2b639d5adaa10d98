"""A per-process LRU cache of decoded inner chunks, for training loops that revisit the same tiles.

Zarr decodes a whole inner chunk (all channels × 256 × 256) for any crop that touches it, so a
128-px training crop costs up to four full chunk decodes plus zarr's async dispatch (≈ 2 ms on
one core, measured in `benchmarks/datamodules_throughput.py`), while the network step it feeds
takes a fraction of that on a small CPU model. Random crops over a dataset revisit chunks many
times per epoch; keeping decoded chunks turns later visits into a memory copy. The cache is
bounded in bytes and evicts least-recently-used chunks, so slide-sized datasets still stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from datamodules.store import ImageArray


class DecodedChunkCache:
    """LRU map ``(image path, chunk row, chunk col) → decoded (C, h, w) array``, bounded in bytes.

    One instance per process (it lives in :class:`datamodules.sampling.StoreCache`, which is
    rebuilt in every DataLoader worker), so there is no locking and no shared memory.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"DecodedChunkCache: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        chunk = self._chunks.get(key)
        if chunk is None:
            self.misses += 1
            return None
        self._chunks.move_to_end(key)
        self.hits += 1
        return chunk

    def put(self, key: tuple, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.max_bytes:
            return  # larger than the whole budget: never cached
        old = self._chunks.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._chunks[key] = chunk
        self.nbytes += chunk.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._chunks.popitem(last=False)
            self.nbytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._chunks)


class ChunkCachedImage:
    """An :class:`ImageArray` whose `read` goes through a :class:`DecodedChunkCache`.

    Same interface as `ImageArray` for reading (`shape`, `dtype`, `channel_names`, `path`,
    `read`, `read_all`); the first read of a chunk goes through `ImageArray.read`, so missing
    and corrupt chunks raise the same errors naming the file.
    """

    def __init__(self, image: ImageArray, cache: DecodedChunkCache) -> None:
        self.image = image
        self.cache = cache
        _, self.chunk_h, self.chunk_w = image.inner_chunk_shape

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image.shape

    @property
    def dtype(self) -> np.dtype:
        return self.image.dtype

    @property
    def channel_names(self) -> list[str]:
        return self.image.channel_names

    @property
    def path(self) -> str:
        return self.image.path

    @property
    def mpp(self) -> float:
        return self.image.mpp

    def _chunk(self, row: int, col: int) -> np.ndarray:
        key = (self.image.path, row, col)
        chunk = self.cache.get(key)
        if chunk is None:
            _, height, width = self.shape
            y, x = row * self.chunk_h, col * self.chunk_w
            chunk = self.image.read(y, x, min(self.chunk_h, height - y), min(self.chunk_w, width - x))
            self.cache.put(key, chunk)
        return chunk

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """`[channels, y:y+h, x:x+w]` assembled from cached chunks (all channels of a chunk are kept)."""
        c, height, width = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"{self.path}: crop y={y} x={x} h={h} w={w} is outside the image of size {height}×{width}")
        index = None if channels is None else np.asarray(list(channels), dtype=np.intp)
        out = np.empty((c if index is None else len(index), h, w), dtype=self.dtype)
        for row in range(y // self.chunk_h, (y + h - 1) // self.chunk_h + 1):
            for col in range(x // self.chunk_w, (x + w - 1) // self.chunk_w + 1):
                chunk = self._chunk(row, col)
                cy, cx = row * self.chunk_h, col * self.chunk_w
                y0, y1 = max(y, cy), min(y + h, cy + chunk.shape[1])
                x0, x1 = max(x, cx), min(x + w, cx + chunk.shape[2])
                window = chunk[:, y0 - cy : y1 - cy, x0 - cx : x1 - cx]
                out[:, y0 - y : y1 - y, x0 - x : x1 - x] = window if index is None else window[index]
        return out

    def read_all(self) -> np.ndarray:
        _, h, w = self.shape
        return self.read(0, 0, h, w)
