"""The decoded-chunk cache returns exactly what the store returns, stays inside its byte budget,
and keeps the store's error messages."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from datamodules.chunk_cache import ChunkCachedImage, DecodedChunkCache
from datamodules.sampling import StoreCache
from datamodules.store import DatasetStore, DatasetWriter, MissingChunkError


@pytest.fixture()
def odd_image(tmp_path):
    """4 channels × 600 × 700 (not a multiple of the 256-px inner chunk), values unique per pixel."""
    root = tmp_path / "ds"
    data = np.arange(4 * 600 * 700, dtype=np.float32).reshape(4, 600, 700)
    with DatasetWriter.create(root) as w:
        w.write_image("imc", "t0", data, 1.0, ["A", "B", "C", "D"])
    return root, data


def test_cached_reads_equal_store_reads(odd_image):
    root, data = odd_image
    image = DatasetStore(root).image("imc", "t0")
    cached = ChunkCachedImage(image, DecodedChunkCache(64 * 2**20))
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(1, 300, size=2)
        y, x = rng.integers(0, 600 - h + 1), rng.integers(0, 700 - w + 1)
        channels = None if rng.random() < 0.5 else sorted(rng.choice(4, size=rng.integers(1, 5), replace=False).tolist())
        expect = data[:, y : y + h, x : x + w] if channels is None else data[channels, y : y + h, x : x + w]
        np.testing.assert_array_equal(cached.read(int(y), int(x), int(h), int(w), channels), expect)
    np.testing.assert_array_equal(cached.read(0, 0, 600, 700, [3, 0]), data[[3, 0]])  # non-monotonic channels
    assert cached.cache.hits > 0
    with pytest.raises(ValueError, match="outside the image"):
        cached.read(590, 0, 20, 10)


def test_budget_is_respected_and_lru_keeps_recent_chunks(odd_image):
    root, _ = odd_image
    image = DatasetStore(root).image("imc", "t0")
    chunk_bytes = 4 * 256 * 256 * 4
    cache = DecodedChunkCache(2 * chunk_bytes + 1)
    cached = ChunkCachedImage(image, cache)
    cached.read(0, 0, 10, 10)        # chunk (0, 0)
    cached.read(0, 300, 10, 10)      # chunk (0, 1)
    cached.read(0, 0, 10, 10)        # hit, (0, 0) becomes most recent
    cached.read(300, 0, 10, 10)      # chunk (1, 0) evicts (0, 1)
    assert cache.nbytes <= cache.max_bytes and len(cache) == 2
    hits = cache.hits
    cached.read(0, 0, 10, 10)
    assert cache.hits == hits + 1
    cached.read(0, 300, 10, 10)
    assert cache.misses == 4

    tiny = DecodedChunkCache(100)  # smaller than one chunk: reads work, nothing is kept
    np.testing.assert_array_equal(ChunkCachedImage(image, tiny).read(5, 5, 3, 3), image.read(5, 5, 3, 3))
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_missing_chunk_error_names_the_file(odd_image):
    root, _ = odd_image
    (root / "imc/1_0mpp/images/t0.ome.zarr/0/c/0/0/0").unlink()
    cached = StoreCache(chunk_cache_mb=16).image(str(root), "imc", "t0", 1.0)
    assert isinstance(cached, ChunkCachedImage)
    with pytest.raises(MissingChunkError, match="0/c/0/0/0"):
        cached.read(0, 0, 8, 8)


def test_store_cache_keeps_its_budget_across_pickling():
    cache = pickle.loads(pickle.dumps(StoreCache(chunk_cache_mb=32)))
    assert cache.chunk_cache_mb == 32 and cache._chunks is not None and cache._chunks.max_bytes == 32 * 2**20
    assert pickle.loads(pickle.dumps(StoreCache()))._chunks is None
    with pytest.raises(ValueError):
        StoreCache(chunk_cache_mb=-1)


def test_rosie_items_identical_with_and_without_cache(synthetic_dataset):
    import torch

    from datamodules.rosie import RosieDataModule

    items = []
    for mb in (0, 64):
        dm = RosieDataModule([str(synthetic_dataset)], batch_size=4, chunk_cache_mb=mb, center_crop=64)
        dm.setup("fit")
        ds = dm.train_dataloader().dataset
        items.append([ds[(1, i)] for i in range(0, len(ds), max(1, len(ds) // 25))])
    for a, b in zip(*items):
        assert a["image"].shape == (3, 64, 64)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
