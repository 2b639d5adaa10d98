"""Consumers of predicted tiles: a bounded QC sample, the H&E histogram and per-cell sums.

Each is fed one :class:`~lightning_modules.rosie_inference.tiles.TileResult` at a time and keeps
only what it needs, so whole-slide statistics cost memory in proportion to the result (rows of
the QC sample, one row per cell), never to the slide.

Cells
    Per-cell expression follows the paper: the stride-grid prediction is upsampled to native
    resolution by nearest neighbour (each block -> ``s``×``s`` px) and averaged over each cell of
    the segmentation mask; background blocks contribute their 0. Sums and pixel counts per cell id
    are accumulated tile by tile, so the mask may be a lazy array too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from analysis.rosie_metrics import dynamic_range
from lightning_modules.rosie_inference.tiles import TileResult


class QCSample:
    """A deterministic, bounded sample of foreground predictions for the dynamic range (p99 - p1).

    Every ``step``-th foreground block (row-major over tiles) is kept, ``step`` chosen from the known
    foreground count so at most ``max_rows`` rows are held; exact when the image has fewer blocks.
    """

    def __init__(self, n_foreground: int, max_rows: int = 200_000):
        self.step = max(1, math.ceil(n_foreground / max(1, max_rows)))
        self.seen = 0
        self.rows: list[np.ndarray] = []
        self.nonfinite = 0

    def add(self, values: np.ndarray) -> None:
        """Keep this tile's share of the sample and count its non-finite values (all of them, not sampled)."""
        n = values.shape[0]
        take = np.arange((-self.seen) % self.step, n, self.step)
        self.seen += n
        self.nonfinite += int((~np.isfinite(values)).sum())
        if take.size:
            self.rows.append(values[take])

    def dynamic_range(self, n_markers: int) -> np.ndarray:
        """Per-marker dynamic range of the sample; NaN for every marker when nothing was predicted."""
        if not self.rows:
            return np.full(n_markers, np.nan)
        sample = np.concatenate(self.rows)  # (K, M)
        return dynamic_range(sample.T[:, :, None])


class CellAccumulator:
    """Per-cell sums of the nearest-upsampled prediction, fed tile by tile (:func:`cell_contribution`)."""

    def __init__(self, mask: Any, stride: int, n_markers: int):
        if len(mask.shape) != 2:
            raise ValueError(f"cell mask must be 2-D (instance ids), got shape {tuple(mask.shape)}")
        if not np.issubdtype(np.dtype(mask.dtype), np.integer):
            raise ValueError(f"cell mask must hold integer instance ids, got {mask.dtype}")
        self.mask = mask
        self.stride = stride
        self.M = n_markers
        self.sums = np.zeros((n_markers, 1), dtype=np.float64)
        self.count = np.zeros(1, dtype=np.int64)
        self.fg_count = np.zeros(1, dtype=np.int64)
        self.sum_y = np.zeros(1, dtype=np.float64)
        self.sum_x = np.zeros(1, dtype=np.float64)

    def _grow(self, max_id: int) -> None:
        n = self.count.shape[0]
        if max_id < n:
            return
        new = max(max_id + 1, 2 * n)
        self.sums = np.pad(self.sums, ((0, 0), (0, new - n)))
        for name in ("count", "fg_count", "sum_y", "sum_x"):
            setattr(self, name, np.pad(getattr(self, name), (0, new - n)))

    def add(self, tile: TileResult) -> None:
        """Add the tile's native pixels of every cell (its mask region is read here, lazily)."""
        self.add_contribution(cell_contribution(self.mask, self.stride, tile.native, tile.fg, tile.pred))

    def add_contribution(self, part: dict[str, np.ndarray] | None) -> None:
        """Add one tile's per-cell partial sums (:func:`cell_contribution`); tiles added in the same
        order give the same float64 sums whichever process computed each part."""
        if part is None:
            return
        cells = part["cells"]
        self._grow(int(cells[-1]))
        self.sums[:, cells] += part["sums"]
        self.count[cells] += part["count"]
        self.fg_count[cells] += part["fg_count"]
        self.sum_y[cells] += part["sum_y"]
        self.sum_x[cells] += part["sum_x"]

    def to_anndata(self, marker_names: Sequence[str], tissue_id: str, uns: dict | None = None) -> Any:
        """Cells x markers mean expression, with pixel counts, foreground fraction and centroids (x, y)."""
        ids = np.flatnonzero(self.count)
        n = self.count[ids].astype(np.float64)
        obs = pd.DataFrame({
            "cell_id": ids.astype(np.int64),
            "tissue_id": pd.Categorical([tissue_id] * len(ids)),
            "n_pixels": self.count[ids],
            "fg_fraction": (self.fg_count[ids] / n).astype(np.float32),
        }, index=pd.Index([str(i) for i in ids], name="cell"))
        adata = ad.AnnData(X=(self.sums[:, ids] / n).T.astype(np.float32), obs=obs,
                           var=pd.DataFrame(index=pd.Index([str(m) for m in marker_names], name="marker")))
        adata.obsm["spatial"] = np.stack([self.sum_x[ids] / n, self.sum_y[ids] / n], axis=1)
        adata.uns["rosie"] = dict(uns or {})
        return adata


def he_histogram_counts(he: np.ndarray) -> np.ndarray:
    """(3, 256) pixel counts of a (3, h, w) uint8 region."""
    return np.stack([np.bincount(he[c].reshape(-1), minlength=256) for c in range(3)]).astype(np.int64)


def cell_contribution(mask: Any, stride: int, native: tuple[int, int, int, int], fg: np.ndarray,
                      pred: np.ndarray) -> dict[str, np.ndarray] | None:
    """One tile's per-cell partial sums: ``cells`` (sorted ids) with their marker sums ``(M, n)``,
    pixel and foreground-pixel counts and coordinate sums; None when the tile holds no cell pixel.

    For each tile the (cell id, block) pairs of its native pixels are counted once (``np.unique``),
    so the work is one sort of the tile's cell pixels plus a gather of ``M × pairs`` values.
    """
    y0, y1, x0, x1 = native
    labels = np.asarray(mask[y0:y1, x0:x1])
    if labels.size and labels.min() < 0:
        raise ValueError("cell mask has negative ids; use 0 for background and positive instance ids")
    flat = labels.reshape(-1)
    sel = np.flatnonzero(flat)
    if sel.size == 0:
        return None
    ids = flat[sel].astype(np.int64)
    w = x1 - x0
    ry, rx = np.divmod(sel, w)
    th, tw = fg.shape
    nb = th * tw
    blk = (ry // stride) * tw + (rx // stride)
    key = ids * nb + blk
    uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    cell, block = uk // nb, uk % nb
    starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    vals = pred.reshape(pred.shape[0], -1)[:, block].astype(np.float64) * cnt
    pair_y = np.bincount(inv.reshape(-1), weights=ry + y0, minlength=uk.size)
    pair_x = np.bincount(inv.reshape(-1), weights=rx + x0, minlength=uk.size)
    return {"cells": cell[starts], "sums": np.add.reduceat(vals, starts, axis=1), "count": np.add.reduceat(cnt, starts),
            "fg_count": np.add.reduceat(fg.reshape(-1)[block] * cnt, starts),
            "sum_y": np.add.reduceat(pair_y, starts), "sum_x": np.add.reduceat(pair_x, starts)}
