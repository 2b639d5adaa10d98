"""Several ingests into one dataset at the same time lose no row (the dataset write lock).

Each round starts N processes behind a barrier, each adding its own tissue to one dataset (the first
round also races to create it). Without the lock, table updates (read, modify, rename) overwrite
each other and rows vanish from ``tissues.parquet`` and ``channels_per_tissue.parquet``.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from datamodules.ingest import ingest
from datamodules.store import DatasetStore

N_PROCESSES = 4
ROUNDS = 3
CHANNELS = ["DAPI", "CD45", "PanCK"]


def _image(folder: Path, index: int) -> Path:
    rng = np.random.default_rng(index)
    data = rng.random((len(CHANNELS), 48, 48), dtype=np.float32) * 100
    path = folder / f"img{index}.ome.tif"
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": CHANNELS}})
    return path


def _worker(image: str, out: str, tissue_id: str, barrier, errors) -> None:  # type: ignore[no-untyped-def]
    try:
        barrier.wait(timeout=60)
        ingest(image, "imc", "ds", tissue_id, out, split="train", resolution=1.0)
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"{tissue_id}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_ingests_lose_no_row(tmp_path: Path, round_: int) -> None:
    ctx = mp.get_context("fork")
    out = tmp_path / "datasets"
    expected: list[str] = []
    # round 0 races to create the dataset; later rounds add to one that exists
    for batch in range(2 if round_ else 1):
        barrier, errors = ctx.Barrier(N_PROCESSES), ctx.Queue()
        ids = [f"r{round_}b{batch}t{i}" for i in range(N_PROCESSES)]
        images = [_image(tmp_path, round_ * 100 + batch * 10 + i) for i in range(N_PROCESSES)]
        procs = [ctx.Process(target=_worker, args=(str(img), str(out), tid, barrier, errors)) for img, tid in zip(images, ids)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        assert not failures, failures
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        expected += ids
        store = DatasetStore(out / "ds")
        assert sorted(store.tissue_ids()) == sorted(expected), "rows lost from tissues.parquet"
        per_tissue = store.channels_per_tissue("imc")
        assert sorted(per_tissue.index.astype(str)) == sorted(expected), "rows lost from channels_per_tissue.parquet"
        stats = store.standardization("imc", 1.0)
        assert sorted(stats.upper_quantiles.index.astype(str)) == sorted(expected), "statistics miss a tissue"
        assert sorted(store.image_ids("imc", 1.0)) == sorted(expected)
        assert not [p for p in store.validate() if p.severity == "error"]
    assert len(pd.read_parquet(out / "ds" / "metadata" / "tissues.parquet")) == len(expected)
