"""The sliding window: every foreground block's patch through the model, one output tile at a time.

With stride ``s`` every ``s``×``s`` block of the H&E image gets one prediction, made from the
128×128 patch centred on that block (:mod:`~lightning_modules.rosie_inference.geometry`). This is
that loop, written so a whole slide never has to be in memory and so that the GPU, not the patch
bookkeeping, sets the speed. Reading a tile (:func:`read_tile`) and predicting it
(:func:`predict_tile`) are separate steps; what happens to each tile's predictions (Zarr, QC,
cell sums) is up to the consumer of :func:`iter_predictions`.

Padding policy
    Pixels of a patch that fall outside the image are white (255), like background glass: border
    blocks and images smaller than a patch are predicted from white-padded patches, the same
    convention as training (:func:`datamodules.sampling.read_padded` with ``fill=255``).

Streaming
    The output grid is cut into ``tile_size``×``tile_size`` tiles (default 256 output px, one
    output chunk: a 2048×2048 px H&E region at stride 8). Each tile's H&E region plus a
    ``P/2`` halo is read (prefetched in a background thread while the model runs on the previous
    tile), moved to the device once, cut into patches there with ``unfold`` and predicted in
    batches; the tile's predictions are then handed to the consumers (Zarr writer, QC sample, cell
    sums, H&E histogram) and dropped. Peak memory is set by the tile, not the slide.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.sampling import read_padded
from lightning_modules.rosie_inference.geometry import check_stride, output_shape, patch_origin
from lightning_modules.rosie_inference.predictor import PatchPredictor

#: Output tile side in output pixels = output Zarr chunk side: each tile writes whole chunks once.
DEFAULT_TILE = 256
WHITE = 255


@dataclasses.dataclass
class TileResult:
    """One output tile: ``pred[:, a, b]`` is output pixel ``(i0 + a, j0 + b)``."""

    i0: int
    j0: int
    pred: np.ndarray  # (M, th, tw) float32, 0 at background blocks
    fg: np.ndarray  # (th, tw) bool
    fg_values: np.ndarray  # (K, M) float32, predictions of the tile's foreground blocks (row-major order)
    he: np.ndarray | None  # (3, h, w) uint8: the tile's own native H&E pixels (no halo), when asked for
    native: tuple[int, int, int, int]  # y0, y1, x0, x1 of those native pixels


@dataclasses.dataclass
class RunStats:
    """Patches predicted and seconds spent, summed over calls: the throughput line of a run."""

    n_patches: int = 0
    seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        return f"{self.n_patches} patches in {self.seconds:.1f} s = {self.patches_per_s:.1f} patches/s"


def tile_grid(hout: int, wout: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Row-major ``(i0, i1, j0, j1)`` output tiles of side ``tile``, clipped at the grid's edge."""
    return [(i0, min(i0 + tile, hout), j0, min(j0 + tile, wout))
            for i0 in range(0, hout, tile) for j0 in range(0, wout, tile)]


def read_tile(image: Any, fg: np.ndarray, tile: tuple[int, int, int, int], stride: int, patch_size: int,
              want_he: bool = False, fill: int = WHITE, centre: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The H&E pixels one output tile needs: ``(region, he)``.

    ``region`` is the white-padded ``(3, (th-1)·s + P, (tw-1)·s + P)`` window covering every patch of
    the tile (None when the tile has no foreground block: nothing to predict); ``he`` is the tile's
    own native pixels without the halo (for the H&E histogram), when ``want_he``. ``fill`` and
    ``centre`` change the padding value and the patch centre (:func:`patch_origin`) for the
    authors' stitching; the defaults are this package's policy.
    """
    i0, i1, j0, j1 = tile
    P, s = patch_size, stride
    _, h, w = image.shape
    region = None
    if fg[i0:i1, j0:j1].any():
        region = read_padded(image, patch_origin(i0, s, P, centre), patch_origin(j0, s, P, centre),
                             (i1 - i0 - 1) * s + P, (j1 - j0 - 1) * s + P, fill=fill)
    he = None
    if want_he:
        y0, y1, x0, x1 = i0 * s, min(i1 * s, h), j0 * s, min(j1 * s, w)
        if region is not None and centre is None:  # the tile's own pixels sit inside the region, P//2 - s//2 from its corner
            oy, ox = P // 2 - s // 2, P // 2 - s // 2
            he = region[:, oy : oy + y1 - y0, ox : ox + x1 - x0]
        else:
            he = np.asarray(image.read(y0, x0, y1 - y0, x1 - x0))
    return region, he


def predict_tile(region: np.ndarray, tile_fg: np.ndarray, predictor: PatchPredictor, stride: int, batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predict the foreground blocks of one tile from its region: ``(pred (M, th, tw), values (K, M))``.

    The region is moved to the device once and cut into patches there (``unfold`` gives a view, no
    copy per patch); ``on_batch(n)`` is told how many patches each batch predicted (progress).
    """
    P, s, M = predictor.patch_size, stride, predictor.num_markers
    device = predictor.device
    pred = np.zeros((M,) + tile_fg.shape, dtype=np.float32)
    ii, jj = np.nonzero(tile_fg)
    reg = torch.from_numpy(np.ascontiguousarray(region)).to(device, non_blocking=True)
    windows = reg.unfold(1, P, s).unfold(2, P, s).permute(1, 2, 0, 3, 4)  # (ni, nj, 3, P, P) view
    ii_t = torch.from_numpy(ii).to(device)
    jj_t = torch.from_numpy(jj).to(device)
    out = torch.empty((len(ii), M), dtype=torch.float32, device=device)
    for b in range(0, len(ii), batch_size):
        out[b : b + batch_size] = predictor(windows[ii_t[b : b + batch_size], jj_t[b : b + batch_size]])
        if on_batch is not None:
            on_batch(min(batch_size, len(ii) - b))
    values = out.cpu().numpy()
    pred[:, ii, jj] = values.T
    return pred, values


def iter_predictions(image: Any, predictor: PatchPredictor, stride: int, fg: np.ndarray,
                     tile_size: int = DEFAULT_TILE, batch_size: int = 64, want_he: bool = False,
                     progress: bool = True, stats: RunStats | None = None) -> Iterator[TileResult]:
    """Predict every foreground block, one output tile at a time (see the module docstring).

    The next tile is read (:func:`read_tile`) in a background thread while this one is predicted
    (:func:`predict_tile`).
    """
    stride = check_stride(stride)
    _, h, w = image.shape
    hout, wout = output_shape(h, w, stride)
    if fg.shape != (hout, wout):
        raise ValueError(f"foreground grid shape {fg.shape} disagrees with the output grid {(hout, wout)}")
    if tile_size < 1 or batch_size < 1:
        raise ValueError(f"tile_size and batch_size must be positive, got {tile_size}, {batch_size}")
    P, s, M = predictor.patch_size, stride, predictor.num_markers
    tiles = tile_grid(hout, wout, tile_size)
    stats = stats if stats is not None else RunStats()

    def load(t: tuple[int, int, int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
        return read_tile(image, fg, t, s, P, want_he)

    columns = (TextColumn("ROSIE patches"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    start = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=False) as bar, ThreadPoolExecutor(max_workers=1) as pool:
        task = bar.add_task("predict", total=int(fg.sum()))
        future = pool.submit(load, tiles[0]) if tiles else None
        for k, (i0, i1, j0, j1) in enumerate(tiles):
            region, he = future.result()  # type: ignore[union-attr]
            future = pool.submit(load, tiles[k + 1]) if k + 1 < len(tiles) else None
            tfg = fg[i0:i1, j0:j1]
            pred = np.zeros((M, i1 - i0, j1 - j0), dtype=np.float32)
            values = np.zeros((0, M), dtype=np.float32)
            if region is not None:
                pred, values = predict_tile(region, tfg, predictor, s, batch_size,
                                            on_batch=lambda n: bar.advance(task, n))
                stats.n_patches += len(values)
            y0, y1, x0, x1 = i0 * s, min(i1 * s, h), j0 * s, min(j1 * s, w)
            yield TileResult(i0, j0, pred, tfg, values, he, (y0, y1, x0, x1))
    stats.seconds += time.perf_counter() - start
