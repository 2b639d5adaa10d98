"""Dataset store: round trips, partial reads, missing chunks, atomic writes, the real example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from datamodules import layout
from datamodules.store import DatasetStore, DatasetWriter, MissingChunkError, StoreError

REPO = Path(__file__).resolve().parents[1]


def _write_small(root: Path, size: int = 600, channels: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.random((channels, size, size + 40), dtype=np.float32)
    names = [f"M{i}" for i in range(channels)]
    with DatasetWriter.create(root) as w:
        w.write_image("codex", "t0", image, 0.5, names)
        w.write_channels("codex", pd.DataFrame({"channel_name": names, "uniprot_id": ["P08575", None, "P01730", None, None]}))
        w.write_channels_per_tissue("codex", pd.DataFrame([[True] * channels], index=pd.Index(["t0"], name="tissue_id"), columns=names))
        w.write_tissue_mask("t0", 0.5, image[0] > 0.2)
        w.write_cell_mask("t0", 0.5, (image[1] * 10).astype(np.uint16))
        w.write_tissues(pd.DataFrame({"tissue_id": ["t0"], "patient_id": ["p0"], "split": ["train"]}))
        w.write_cells(pd.DataFrame({"tissue_id": ["t0"] * 3, "cell_id": [1, 2, 3]}))
        w.write_embedding("P08575", torch.arange(640, dtype=torch.float32))
    return image


def test_roundtrip_and_crop_read(tmp_path: Path) -> None:
    image = _write_small(tmp_path / "ds")
    store = DatasetStore(tmp_path / "ds")
    assert store.modalities() == ["codex"]
    assert store.resolutions("codex") == [0.5]
    img = store.image("codex", "t0")
    assert img.shape == image.shape and img.channel_names == [f"M{i}" for i in range(5)]
    np.testing.assert_array_equal(img.read(100, 300, 128, 128), image[:, 100:228, 300:428])
    np.testing.assert_array_equal(img.read(0, 0, 10, 10, channels=[3, 1]), image[[3, 1], :10, :10])
    np.testing.assert_array_equal(img.read_all(), image)
    assert store.tissue_mask("t0", 0.5).dtype == bool
    assert store.cell_mask("t0", 0.5).shape == image.shape[1:]
    assert torch.equal(store.embedding("P08575"), torch.arange(640, dtype=torch.float32))
    problems = store.validate()
    assert not [p for p in problems if p.severity == "error"], problems
    assert any("P01730" in p.message for p in problems)  # channel with an id but no embedding: a warning


def test_crop_read_is_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((4, 1024, 1024), dtype=np.float32)
    with DatasetWriter.create(tmp_path / "ds") as w:
        w.write_image("imc", "big", image, 1.0, ["a", "b", "c", "d"])
    store = DatasetStore(tmp_path / "ds")
    img = store.image("imc", "big")
    read_bytes: list[int] = []
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        buf = await original(self, key, prototype, byte_range)
        if buf is not None:
            read_bytes.append(len(buf))
        return buf

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    crop = img.read(300, 300, 128, 128)
    np.testing.assert_array_equal(crop, image[:, 300:428, 300:428])
    shard_size = (tmp_path / "ds/imc/1_0mpp/images/big.ome.zarr/0/c/0/0/0").stat().st_size
    # one 256x256 inner chunk (+ the shard index) of a shard holding 16 chunks
    assert 0 < sum(read_bytes) < shard_size / 4, (sum(read_bytes), shard_size)


def test_missing_chunk_is_a_clear_error(tmp_path: Path) -> None:
    _write_small(tmp_path / "ds")
    (tmp_path / "ds/codex/0_5mpp/images/t0.ome.zarr/0/c/0/0/0").unlink()
    img = DatasetStore(tmp_path / "ds").image("codex", "t0")
    with pytest.raises(MissingChunkError, match=r"0/c/0/0/0' is missing"):
        img.read(0, 0, 16, 16)
    errors = [p for p in DatasetStore(tmp_path / "ds").validate() if p.severity == "error"]
    assert any("missing" in p.message for p in errors)


def test_failed_create_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter.create(tmp_path / "ds") as w:
            w.write_tissues(pd.DataFrame({"tissue_id": ["a"], "split": ["train"]}))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_existing_without_overwrite(tmp_path: Path) -> None:
    _write_small(tmp_path / "ds")
    with pytest.raises(StoreError, match="overwrite"):
        DatasetWriter.create(tmp_path / "ds")
    _write_small(tmp_path / "ds2")
    with DatasetWriter.create(tmp_path / "ds", overwrite=True) as w:
        w.write_tissues(pd.DataFrame({"tissue_id": ["new"], "split": ["test"]}))
    assert DatasetStore(tmp_path / "ds").tissue_ids() == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds2"]


def test_append_rejects_duplicate_tissue(tmp_path: Path) -> None:
    _write_small(tmp_path / "ds")
    w = DatasetWriter.open(tmp_path / "ds")
    with pytest.raises(StoreError, match="already present"):
        w.append_tissues(pd.DataFrame({"tissue_id": ["t0"], "split": ["train"]}))
    w.append_tissues(pd.DataFrame({"tissue_id": ["t1"], "split": ["val"]}))
    assert DatasetStore(tmp_path / "ds").tissue_ids(split="val") == ["t1"]


def test_atomic_image_write_leaves_no_partial_image(tmp_path: Path) -> None:
    _write_small(tmp_path / "ds")
    w = DatasetWriter.open(tmp_path / "ds")
    bad = np.full((5, 64, 64), np.nan, dtype=np.float32)
    with pytest.raises(StoreError, match="NaN"):
        w.write_image("codex", "t9", bad, 0.5, [f"M{i}" for i in range(5)])
    assert "t9" not in DatasetStore(tmp_path / "ds").image_ids("codex")
    leftovers = list((tmp_path / "ds/codex/0_5mpp/images").glob(".*tmp*"))
    assert leftovers == []


def test_path_escape_rejected() -> None:
    for bad in ["../evil", "/abs", "a/b", ""]:
        with pytest.raises(ValueError):
            layout.image_path("he", 0.5, bad)


def test_mask_shape_mismatch_reported(tmp_path: Path) -> None:
    _write_small(tmp_path / "ds")
    DatasetWriter.open(tmp_path / "ds").write_tissue_mask("t0", 0.5, np.ones((10, 10), bool))
    errors = [p for p in DatasetStore(tmp_path / "ds").validate() if p.severity == "error"]
    assert any("disagrees" in p.message for p in errors)


def test_fsspec_memory_url() -> None:
    rng = np.random.default_rng(2)
    image = (rng.random((3, 200, 300)) * 255).astype(np.uint8)
    with DatasetWriter.create("memory://virtuplex-test/ds", overwrite=True) as w:
        w.write_image("he", "m0", image, 0.5, ["R", "G", "B"])
        w.write_tissues(pd.DataFrame({"tissue_id": ["m0"], "split": ["test"]}))
    store = DatasetStore("memory://virtuplex-test/ds")
    np.testing.assert_array_equal(store.image("he", "m0").read(10, 20, 50, 60), image[:, 10:60, 20:80])


def test_real_example_opens(imc_example: Path) -> None:
    store = DatasetStore(imc_example)
    assert len(store.channels("imc")) == 43
    assert len(store.cells()) == 2185
    assert store.cell_mask("cords2024cancer_ocmzljpb_0001", 1.0).shape == (697, 597)
    assert len(store.embedding_ids()) == 40
    assert store.standardization("imc", 1.0) is not None
    img = store.image("imc", "cords2024cancer_ocmzljpb_0001")
    assert img.shape == (43, 697, 597)
    with pytest.raises(MissingChunkError, match="missing"):
        img.read(0, 0, 128, 128)


def test_info_cli_on_real_example(imc_example: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "experiments.data_info", str(imc_example)],
                            capture_output=True, text=True, cwd=REPO, env={"COLUMNS": "200", "PATH": ""})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert "43 channels" in result.stdout and "2185" in result.stdout
    assert "0/c/0/0/0' is missing" in result.stdout
