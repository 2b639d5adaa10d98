"""Peak memory of `rosie_predict` on a slide far larger than one would hold in memory.

    python -m benchmarks.rosie_predict_memory [--size 20000] [--tissue-fraction 0.04] [--workdir DIR]

Writes a ``size × size`` RGB H&E as a tiled, zlib-compressed TIFF, generated tile by tile (the
slide itself never exists in memory here either): white glass with round tissue islands covering
about ``--tissue-fraction`` of the area. Then runs ``python -m experiments.rosie_predict`` on it at
stride 8 with the CPU demo model size (convnext_atto on the central 32 px, 50 markers; weights
random, the cost is the same) in a child process, and prints the child's peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``), patches/s and the output shape.

The whole 20,000² slide as uint8 RGB is 1.2 GB, its 50-marker float32 prediction at stride 8 is
1.25 GB; `rosie_predict` streams both by tiles, so the peak stays near the interpreter + model
baseline. ``tests/test_bounded_memory.py`` (marked slow) asserts the < 2 GB bound with this code.
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

from lightning_modules.rosie import RosieModule

REPO = Path(__file__).resolve().parents[1]
TILE = 512


def island_centres(size: int, tissue_fraction: float, radius: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = max(1, int(round(tissue_fraction * size * size / (np.pi * radius * radius))))
    return rng.uniform(radius, size - radius, size=(n, 2))


def slide_tiles(size: int, tissue_fraction: float, seed: int = 0) -> Iterator[np.ndarray]:
    """(TILE, TILE, 3) uint8 tiles in row-major order: glass with pink-purple noisy tissue islands."""
    radius = min(600, size // 8)
    centres = island_centres(size, tissue_fraction, radius, seed)
    rng = np.random.default_rng(seed + 1)
    tissue_colour = np.array([200, 120, 190], dtype=np.float32)
    for y in range(0, size, TILE):
        for x in range(0, size, TILE):
            tile = np.full((TILE, TILE, 3), 242, dtype=np.uint8)
            near = centres[(np.abs(centres[:, 0] - (y + TILE / 2)) < radius + TILE) & (np.abs(centres[:, 1] - (x + TILE / 2)) < radius + TILE)]
            if len(near):
                yy, xx = np.mgrid[y : y + TILE, x : x + TILE]
                inside = np.zeros((TILE, TILE), dtype=bool)
                for cy, cx in near:
                    inside |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius * radius
                if inside.any():
                    noise = rng.normal(0, 18, size=(int(inside.sum()), 3)).astype(np.float32)
                    tile[inside] = np.clip(tissue_colour + noise, 0, 255).astype(np.uint8)
            yield tile


def write_slide(path: Path, size: int, tissue_fraction: float) -> Path:
    import tifffile

    tifffile.imwrite(path, slide_tiles(size, tissue_fraction), shape=(size, size, 3), dtype=np.uint8,
                     tile=(TILE, TILE), photometric="rgb", compression="zlib", compressionargs={"level": 1})
    return path


def write_demo_checkpoint(path: Path, marker_names: list[str] | None = None, center_crop: int | None = 32) -> Path:
    """A randomly initialised convnext_atto RosieModule saved as Lightning would (same cost as trained)."""
    import lightning as L
    import torch

    torch.manual_seed(0)
    kwargs = {"marker_names": marker_names, "num_markers": len(marker_names)} if marker_names else {}
    module = RosieModule(arch="convnext_atto", input_center_crop=center_crop, **kwargs)
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(str(path))
    return path


def measure(size: int = 20_000, tissue_fraction: float = 0.04, workdir: Path | None = None,
            batch_size: int = 256) -> dict:
    """Write the slide and the checkpoint, predict in a child process, return its peak RSS and timings."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        slide = write_slide(tmp / "slide.tif", size, tissue_fraction)
        write_s = time.perf_counter() - t0
        ckpt = write_demo_checkpoint(tmp / "demo.ckpt")
        out = tmp / "pred"
        cmd = [sys.executable, "-m", "experiments.rosie_predict", "--ckpt", str(ckpt), "--he", str(slide),
               "--out", str(out), "--stride", "8", "--mpp", "0.5", "--device", "cpu", "--batch-size", str(batch_size), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        predict_s = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            raise RuntimeError(f"rosie_predict failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        if peak_kb <= before:
            raise RuntimeError("could not attribute the peak RSS to the prediction child (an earlier child peaked higher)")
        qc = json.loads((out / "qc.json").read_text())["tissues"]["slide"]
        return {"size": size, "tissue_fraction": tissue_fraction, "slide_file_mb": slide.stat().st_size / 2**20,
                "write_slide_s": write_s, "predict_s": predict_s, "peak_rss_mb": peak_kb / 1024,
                "n_patches": qc["n_patches"], "patches_per_s": qc["patches_per_s"], "output_shape": qc["output_shape"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rosie_predict_memory", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=20_000, help="slide side in px")
    p.add_argument("--tissue-fraction", type=float, default=0.04, help="area fraction covered by tissue islands")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the temporary slide and prediction (default: system temp)")
    args = p.parse_args(argv)
    r = measure(args.size, args.tissue_fraction, args.workdir)
    print(f"| slide | file | patches | predict | patches/s | output | peak RSS |")
    print(f"|---|---|---|---|---|---|---|")
    print(f"| {r['size']}×{r['size']} RGB ({r['tissue_fraction']:.0%} tissue) | {r['slide_file_mb']:.0f} MB TIFF | "
          f"{r['n_patches']:,} | {r['predict_s']:.0f} s | {r['patches_per_s']:.0f} | {tuple(r['output_shape'])} | "
          f"{r['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
