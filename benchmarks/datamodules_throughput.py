"""Crops/s of the ROSIE and VirTues DataModules, per worker count, streaming from Zarr.

`python -m benchmarks.datamodules_throughput [--data DIR] [--workers 0 1 2] [--batches 20] [--chunk-cache-mb 0 512]`

Generates a small synthetic dataset when `--data` is not given. Reports crops/s and crops/s per
worker (0 workers = the main process does the loading) for one pass over `--batches` batches after
one warm-up batch; what is timed is the loader only (no model). Each `--chunk-cache-mb` value is a
row set (0 = every crop decodes its Zarr chunks; > 0 = the per-process decoded-chunk LRU cache, which
starts cold, so more batches show more of its effect).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from datamodules.rosie import RosieDataModule
from datamodules.synthetic import generate_dataset
from datamodules.virtues import VirTuesDataModule


def _time_loader(loader, batches: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    it = iter(loader)
    next(it)  # warm-up: worker start, Zarr open
    n = 0
    start = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:  # small datasets: keep going over further epochs
            it = iter(loader)
            batch = next(it)
        n += len(batch["images"]) if "images" in batch else batch["image"].shape[0]
    return time.perf_counter() - start, n


def run(data: Path, workers: list[int], batches: int, batch_size: int, cache_mb: list[float] = (512,)) -> list[dict]:
    rows = []
    for mb in cache_mb:
        for w in workers:
            rosie = RosieDataModule([str(data)], batch_size=batch_size, num_workers=w, augment=True, chunk_cache_mb=mb)
            rosie.setup("fit")
            virtues = VirTuesDataModule([str(data)], modality="imc", batch_size=batch_size, num_workers=w, chunk_cache_mb=mb)
            virtues.setup("fit")
            for name, dm in (("rosie (H&E 128px + targets)", rosie), ("virtues (IMC 128px, all channels)", virtues)):
                seconds, n = _time_loader(dm.train_dataloader(), batches)
                rate = n / seconds
                rows.append({"datamodule": name, "cache_mb": mb, "workers": w, "crops": n, "seconds": seconds,
                             "crops_per_s": rate, "crops_per_s_per_worker": rate / max(w, 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-cache-mb", type=float, nargs="+", default=[0, 512],
                        help="decoded-chunk cache budgets to compare (0 = off)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:

            data = generate_dataset(Path(tmp) / "synthetic", n_tissues=4, size=512, seed=0)
        rows = run(Path(data), args.workers, args.batches, args.batch_size, args.chunk_cache_mb)
    print(f"\n{'datamodule':36s} {'cache MB':>8s} {'workers':>7s} {'crops':>6s} {'crops/s':>9s} {'per worker':>11s}")
    for r in rows:
        print(f"{r['datamodule']:36s} {r['cache_mb']:8g} {r['workers']:7d} {r['crops']:6d} {r['crops_per_s']:9.1f} "
              f"{r['crops_per_s_per_worker']:11.1f}")


if __name__ == "__main__":
    main()
