"""Tile read speed of the slide backends: OpenSlide (bundled library) vs tifffile (Zarr store).

    python -m benchmarks.slide_readers [--size 8192] [--tiles 400] [--tile 256] [--workdir DIR]

Writes one Aperio-style ``.svs`` (JPEG tiles of 256 px, a 4× level, ``MPP`` in the description:
what OpenSlide recognises as ``aperio``) and one pyramidal zlib OME-TIFF of the same RGB slide,
generated tile by tile. Then reads ``--tiles`` random tiles (fixed seed, aligned and unaligned)
through :func:`datamodules.slide_readers.open_slide` with each backend that can read the file and
prints tiles/s and MB/s. Decoding dominates, so the numbers say which backend to default to.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from datamodules.pyramids import write_pyramidal_ome_tiff
from datamodules.slide_readers import open_slide

SVS_TILE = 256


def he_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """``(H, W, 3)`` uint8: glass with pink-purple textured tissue (compresses like a real scan)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = (np.sin(yy / 37.0) + np.cos(xx / 53.0) + np.sin((yy + xx) / 91.0)) > 0.3
    out = np.full((h, w, 3), 240, dtype=np.uint8)
    noise = rng.normal(0, 20, size=(int(tissue.sum()), 3))
    out[tissue] = np.clip(np.array([190, 110, 180]) + noise, 0, 255).astype(np.uint8)
    return out


def _svs_tiles(rgb_tile_source, h: int, w: int) -> Iterator[np.ndarray]:  # type: ignore[no-untyped-def]
    for y in range(0, h, SVS_TILE):
        for x in range(0, w, SVS_TILE):
            tile = np.full((SVS_TILE, SVS_TILE, 3), 240, dtype=np.uint8)
            block = rgb_tile_source(y, x, min(SVS_TILE, h - y), min(SVS_TILE, w - x))
            tile[: block.shape[0], : block.shape[1]] = block
            yield tile


def write_aperio_svs(path: Path, h: int, w: int, mpp: float = 0.5, read=None, levels: int = 2,  # type: ignore[no-untyped-def]
                     compression: str = "jpeg") -> Path:
    """An Aperio-like tiled pyramidal TIFF (``.svs``): ``read(y, x, h, w) -> (h, w, 3)`` gives the pixels.

    Levels are 4× apart as Aperio writes them; the description starts with ``Aperio Image Library``
    and states ``MPP``, which is what OpenSlide's aperio driver looks for."""
    read = read or (lambda y, x, hh, ww: he_like(hh, ww, seed=y * 7919 + x))
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k in range(levels):
            f = 4**k
            lh, lw = -(-h // f), -(-w // f)
            desc = (f"Aperio Image Library v12.0.15\n{w}x{h} [0,0 {w}x{h}] ({SVS_TILE}x{SVS_TILE}) JPEG/RGB Q=90"
                    f"|AppMag = 20|MPP = {mpp * f:.4f}")
            source = read if f == 1 else (lambda y, x, hh, ww, f=f: read(y * f, x * f, min(hh * f, h - y * f),
                                                                         min(ww * f, w - x * f))[::f, ::f][:hh, :ww])
            tif.write(_svs_tiles(source, lh, lw), shape=(lh, lw, 3), dtype=np.uint8, tile=(SVS_TILE, SVS_TILE),
                      photometric="rgb", compression=compression, description=desc, metadata=None,
                      subfiletype=0 if k == 0 else 1)
    return path


def time_reads(reader, n_tiles: int, tile: int, seed: int = 0) -> dict:  # type: ignore[no-untyped-def]
    _, h, w = reader.shape
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, h - tile, n_tiles), rng.integers(0, w - tile, n_tiles)
    reader.read(0, 0, tile, tile)  # warm-up: opens caches
    t0 = time.perf_counter()
    for y, x in zip(ys, xs):
        reader.read(int(y), int(x), tile, tile)
    dt = time.perf_counter() - t0
    return {"tiles_per_s": n_tiles / dt, "mb_per_s": n_tiles * tile * tile * 3 / dt / 2**20}


def measure(size: int = 8192, n_tiles: int = 400, tile: int = SVS_TILE, workdir: Path | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        svs = write_aperio_svs(Path(tmp) / "slide.svs", size, size)
        with open_slide(svs, backend="tifffile") as src:
            ome = Path(tmp) / "slide.ome.tif"
            write_pyramidal_ome_tiff(src, ome, 0.5, ["R", "G", "B"], compression="zlib")
            whole = src.read(0, 0, size, size) if size <= 8192 else None
        for path, backends in ((svs, ("openslide", "tifffile")), (ome, ("tifffile",))):
            for backend in backends:
                with open_slide(path, backend=backend) as reader:
                    r = time_reads(reader, n_tiles, tile)
                    if whole is not None:  # both backends decode the same pixels (JPEG: up to the decoder)
                        got = reader.read(1000, 1000, tile, tile).astype(int)
                        r["max_abs_diff_vs_tifffile_svs"] = int(np.abs(got - whole[:, 1000:1000 + tile, 1000:1000 + tile]).max())
                rows.append({"file": path.name, "backend": backend, **r})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.slide_readers", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=8192, help="slide side in px")
    p.add_argument("--tiles", type=int, default=400, help="random tiles read per backend")
    p.add_argument("--tile", type=int, default=SVS_TILE, help="tile side in px")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    rows = measure(args.size, args.tiles, args.tile, args.workdir)
    print("| file | backend | tiles/s | MB/s | max |Δ| vs tifffile |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['backend']} | {r['tiles_per_s']:.0f} | {r['mb_per_s']:.0f} | "
              f"{r.get('max_abs_diff_vs_tifffile_svs', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
