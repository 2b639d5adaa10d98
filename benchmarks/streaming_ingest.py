"""Peak memory of ingesting a slide-sized multiplex OME-TIFF (streamed shard by shard).

    python -m benchmarks.streaming_ingest [--size 20000] [--channels 40] [--workdir DIR]

Writes a ``channels × size × size`` uint16 OME-TIFF (512 px tiles, zstd) generated tile by tile:
zero background with square tissue patches (a deterministic function of channel and tile, so any
crop can be recomputed), about ``--tissue-fraction`` of the tiles. Ingests it with
``datamodules.ingest.ingest`` in a child process (the streamed path: the image is far above the
in-memory limit's reach of 2 GB), prints the child's peak RSS (``getrusage(RUSAGE_CHILDREN)``)
and checks random crops of the stored image against the generator, bit for bit.
20,000² × 40 × uint16 is 32 GB uncompressed; the bound asserted by the slow test is 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
TILE = 512
N_BANK = 16


def _bank(seed: int = 0) -> np.ndarray:
    """A few noisy 512² uint16 tissue tiles reused across the slide (cheap, compressible, nonzero)."""
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 200.0, size=(N_BANK, TILE, TILE)) + 1).astype(np.uint16)


class SyntheticPlex:
    """Pixel values of the generated slide as a function of (channel, tile): what any crop must equal."""

    def __init__(self, channels: int, size: int, tissue_fraction: float = 0.15, seed: int = 0):
        self.shape = (channels, size, size)
        self.bank = _bank(seed)
        n = -(-size // TILE)
        rng = np.random.default_rng(seed + 1)
        self.tissue = rng.random((n, n)) < tissue_fraction

    def tile(self, c: int, ty: int, tx: int) -> np.ndarray:
        if not self.tissue[ty, tx]:
            return np.zeros((TILE, TILE), np.uint16)
        return self.bank[(c * 7 + ty * 13 + tx * 31) % N_BANK]

    def tiles(self) -> Iterator[np.ndarray]:
        c, h, w = self.shape
        for ci in range(c):
            for ty in range(-(-h // TILE)):
                for tx in range(-(-w // TILE)):
                    yield self.tile(ci, ty, tx)

    def crop(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        c = self.shape[0]
        out = np.empty((c, h, w), np.uint16)
        for ci in range(c):
            for yy in range(y - y % TILE, y + h, TILE):
                for xx in range(x - x % TILE, x + w, TILE):
                    t = self.tile(ci, yy // TILE, xx // TILE)
                    y0, x0 = max(y, yy), max(x, xx)
                    y1, x1 = min(y + h, yy + TILE), min(x + w, xx + TILE)
                    out[ci, y0 - y : y1 - y, x0 - x : x1 - x] = t[y0 - yy : y1 - yy, x0 - xx : x1 - xx]
        return out


def write_plex(path: Path, plex: SyntheticPlex, mpp: float = 0.5) -> Path:
    c = plex.shape[0]
    meta = {"axes": "CYX", "Channel": {"Name": [f"M{i:02d}" for i in range(c)]}, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
    tifffile.imwrite(path, plex.tiles(), shape=plex.shape, dtype=np.uint16, tile=(TILE, TILE), ome=True, bigtiff=True,
                     metadata=meta, photometric="minisblack", compression="zstd", compressionargs={"level": 1})
    return path


CHILD = """
import json, sys, time
from datamodules.ingest import ingest
t0 = time.perf_counter()
r = ingest(sys.argv[1], "codex", "bench", "slide", sys.argv[2], split="train")
print(json.dumps({"shape": list(r.shape), "seconds": time.perf_counter() - t0, "warnings": r.warnings}))
"""


def measure(size: int = 20_000, channels: int = 40, tissue_fraction: float = 0.15, workdir: Path | None = None,
            n_crops: int = 12) -> dict:
    from datamodules.store import DatasetStore

    plex = SyntheticPlex(channels, size, tissue_fraction)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # a named scratch folder need not exist yet
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        src = write_plex(tmp / "plex.ome.tif", plex)
        write_s = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp / "out")], cwd=REPO, env=env,
                              capture_output=True, text=True)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise RuntimeError(f"ingest failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        if peak_kb <= before:
            raise RuntimeError("could not attribute the peak RSS to the ingest child (an earlier child peaked higher)")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        img = DatasetStore(tmp / "out" / "bench").image("codex", "slide")
        rng = np.random.default_rng(0)
        identical = True
        for _ in range(n_crops):
            h, w = int(rng.integers(1, 700)), int(rng.integers(1, 700))
            y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            identical &= bool(np.array_equal(img.read(y, x, h, w), plex.crop(y, x, h, w)))
        return {"size": size, "channels": channels, "uncompressed_gb": channels * size * size * 2 / 2**30,
                "tiff_gb": src.stat().st_size / 2**30, "write_tiff_s": write_s, "ingest_s": info["seconds"],
                "peak_rss_mb": peak_kb / 1024, "stored_shape": info["shape"], "crops_bit_identical": identical,
                "n_crops": n_crops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming_ingest", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=20_000)
    p.add_argument("--channels", type=int, default=40)
    p.add_argument("--tissue-fraction", type=float, default=0.15)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    r = measure(args.size, args.channels, args.tissue_fraction, args.workdir)
    print("| image | uncompressed | OME-TIFF | ingest | peak RSS | crops bit-identical |")
    print("|---|---|---|---|---|---|")
    print(f"| {r['channels']}×{r['size']}×{r['size']} uint16 | {r['uncompressed_gb']:.1f} GB | {r['tiff_gb']:.2f} GB | "
          f"{r['ingest_s']:.0f} s | {r['peak_rss_mb']:.0f} MB | {r['n_crops'] if r['crops_bit_identical'] else 'NO'} |")
    return 0 if r["crops_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
