"""Peak memory of predicting a 100,000 × 100,000 px slide at stride 8 (the slide is never materialised).

    python -m benchmarks.slide_100k [--size 100000] [--islands 1] [--radius 2300] [--workdir DIR]

The slide is :class:`SyntheticSlide`, a lazy reader (the :mod:`datamodules.slide_readers`
interface: ``shape``, ``read``, levels) whose pixels are computed on request: white glass with
``--islands`` round tissue islands of ``--radius`` px, noise seeded per 512 px tile so any region
is reproducible. Islands must survive the foreground's Otsu thumbnail (~2048 px, objects under
0.1 % of it are dropped), so one island of 2,300 px radius (~260,000 patches at stride 8). It is predicted with the library call behind ``rosie_predict``
(``lightning_modules.rosie_inference.predict_to_dataset``: foreground from a thumbnail, tiles of
256 output px streamed into the OME-Zarr) by a random convnext_atto demo checkpoint (50 markers,
central 32 px; the cost is that of a trained one), then the output gets its NGFF pyramid
(:func:`datamodules.pyramids.write_ngff_pyramid`). All of it runs in a child process whose peak RSS
(``getrusage(RUSAGE_CHILDREN)``) is printed; the issue's bound is 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from datamodules.slide_readers import SlideReader

REPO = Path(__file__).resolve().parents[1]
TILE = 512


class SyntheticSlide(SlideReader):
    """A lazily generated RGB slide: glass (242) with noisy pink-purple discs; levels 1, 4, 16, 64 (the
    coarser levels are computed as block means of the same discs, so thumbnails are cheap)."""

    backend = "synthetic"

    def __init__(self, size: int = 100_000, islands: int = 4, radius: int = 300, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.uniform(radius, size - radius, size=(islands, 2))
        self.radius, self.seed = radius, seed
        shapes = [(-(-size // f), -(-size // f)) for f in (1, 4, 16, 64)]
        super().__init__(f"synthetic {size}² slide", shapes, 3, np.uint8, 0.5, ["R", "G", "B"], [1.0, 4.0, 16.0, 64.0])

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        f = self.level_downsamples[level]
        out = np.full((3, h, w), 242, dtype=np.uint8)
        near = self.centres[(self.centres[:, 0] + self.radius > y * f) & (self.centres[:, 0] - self.radius < (y + h) * f)
                            & (self.centres[:, 1] + self.radius > x * f) & (self.centres[:, 1] - self.radius < (x + w) * f)]
        if not len(near):
            return out
        yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float64) * f
        inside = np.zeros((h, w), dtype=bool)
        for cy, cx in near:
            inside |= (yy - cy) ** 2 + (xx - cx) ** 2 < self.radius**2
        if inside.any():  # noise seeded by the region, so a region reads the same every time
            rng = np.random.default_rng((self.seed, level, y, x, h, w))
            noise = rng.normal(0, 18, size=(3, int(inside.sum())))
            out[:, inside] = np.clip(np.array([[200], [120], [190]]) + noise, 0, 255).astype(np.uint8)
        return out


CHILD = """
import json, sys, time
from pathlib import Path
from benchmarks.rosie_predict_memory import write_demo_checkpoint
from benchmarks.slide_100k import SyntheticSlide
from datamodules.pyramids import write_ngff_pyramid
from lightning_modules import rosie_inference as ri
size, islands, radius, tmp = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
ckpt = write_demo_checkpoint(tmp / "demo.ckpt")
predictor = ri.PatchPredictor.from_checkpoint(str(ckpt), device="cpu")
slide = SyntheticSlide(size, islands, radius)
opts = ri.PredictOptions(stride=8, batch_size=256, progress=False)
t0 = time.perf_counter()
entry = ri.predict_to_dataset(slide, predictor, tmp / "pred", "slide", 0.5, opts)
predict_s = time.perf_counter() - t0
t0 = time.perf_counter()
levels = write_ngff_pyramid(tmp / "pred" / entry["image"])
print(json.dumps({"output_shape": entry["output_shape"], "n_patches": entry["n_patches"], "predict_s": predict_s,
                  "pyramid_s": time.perf_counter() - t0, "levels": [list(s) for s in levels],
                  "patches_per_s": entry["patches_per_s"]}))
"""


def measure(size: int = 100_000, islands: int = 1, radius: int = 2300, workdir: Path | None = None) -> dict:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)  # a named scratch folder need not exist yet
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        proc = subprocess.run([sys.executable, "-c", CHILD, str(size), str(islands), str(radius), tmp], cwd=REPO, env=env,
                              capture_output=True, text=True)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise RuntimeError(f"prediction failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        if peak_kb <= before:
            raise RuntimeError("could not attribute the peak RSS to the prediction child (an earlier child peaked higher)")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"size": size, "islands": islands, "radius": radius, "peak_rss_mb": peak_kb / 1024, **info}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.slide_100k", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--islands", type=int, default=1)
    p.add_argument("--radius", type=int, default=2300)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    r = measure(args.size, args.islands, args.radius, args.workdir)
    print("| slide | patches | predict | pyramid | output | levels | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {r['size']}×{r['size']} RGB ({r['islands']} islands r={r['radius']} px) | {r['n_patches']:,} | "
          f"{r['predict_s']:.0f} s | {r['pyramid_s']:.0f} s | {tuple(r['output_shape'])} | {len(r['levels'])} | "
          f"{r['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
