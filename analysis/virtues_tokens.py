"""Cell, niche and tissue summary tokens from VirTues patch-summary grids (paper Methods,
"Aggregation into cell-, niche- and tissue-level representations"; official
`virtues/utils/cell_tokens.py` for the cell tokens).

The encoder turns each 128×128 crop into a 16×16 grid of patch-summary (PS) tokens, one per 8×8
patch. What a lab wants is one vector per cell, per niche and per tissue:

* **cell token** — the image is covered by overlapping 128-px crops at stride 42 (plus the last
  row/column so the border is covered); every (crop, patch, cell) triple contributes the patch's PS
  token weighted by the number of the cell's pixels inside that patch; the cell token is the
  weighted mean. Cells near crop centres are seen in several crops, so context from every side is
  averaged in, which is why the stride is much smaller than the crop.
* **niche token** — the mean of the 256 PS tokens of one crop of a non-overlapping 128-px grid;
  crops with < 30 % tissue are dropped.
* **tissue token** — the mean of all PS tokens of the kept niche crops (the unsupervised,
  task-agnostic aggregation; the supervised one is a gated ABMIL over the same tokens).

Everything here works on arrays already in memory (no file access, no Lightning), so the same code
serves the CLI, notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: Official defaults (code and Methods).
CELL_CROP = 128
CELL_STRIDE = 42
NICHE_CROP = 128
MIN_TISSUE_FRACTION = 0.3


def _axis_starts(length: int, tile: int, stride: int) -> list[int]:
    if length < tile:
        raise ValueError(f"image side {length} px is smaller than the {tile}-px crop; pad the image first")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)  # the last row / column, so the far border is covered too
    return starts


def cell_crop_corners(height: int, width: int, tile: int = CELL_CROP, stride: int = CELL_STRIDE) -> np.ndarray:
    """(K, 2) top-left corners of the overlapping crops, as the official `compute_cell_tokens`:
    0, stride, 2·stride, ... plus the last row/column (H − tile, W − tile), de-duplicated, sorted."""
    ys, xs = _axis_starts(height, tile, stride), _axis_starts(width, tile, stride)
    return np.array([(y, x) for y in ys for x in xs], dtype=np.int64)


def niche_crop_corners(height: int, width: int, tile: int = NICHE_CROP) -> np.ndarray:
    """(K, 2) corners of the non-overlapping crop grid (a remainder narrower than a crop is left out)."""
    return np.array([(y, x) for y in range(0, height - tile + 1, tile) for x in range(0, width - tile + 1, tile)],
                    dtype=np.int64).reshape(-1, 2)


def crop_tissue_fractions(tissue_mask: np.ndarray, corners: np.ndarray, tile: int = NICHE_CROP) -> np.ndarray:
    mask = np.asarray(tissue_mask, dtype=bool)
    return np.array([mask[y : y + tile, x : x + tile].mean() for y, x in corners], dtype=np.float64)


class CellTokenAccumulator:
    """Running overlap-weighted sums of PS tokens per cell, over any number of crops.

    ``cell_ids`` are all ids that can appear (e.g. ``np.unique(mask)`` without 0); a cell that no
    crop covers ends with weight 0 and is reported by :meth:`result` as missing.
    """

    def __init__(self, cell_ids: Sequence[int] | np.ndarray, dim: int, patch_size: int = 8):
        ids = np.unique(np.asarray(cell_ids, dtype=np.int64))
        ids = ids[ids > 0]
        self.cell_ids = ids
        self.patch_size = patch_size
        self.sums = torch.zeros(len(ids), dim, dtype=torch.float64)
        self.weights = torch.zeros(len(ids), dtype=torch.float64)

    def add(self, ps_grid: Tensor, mask_crop: np.ndarray) -> None:
        """``ps_grid`` (h, w, d) for a crop whose cell-mask pixels are ``mask_crop`` (h·p, w·p)."""
        h, w, d = ps_grid.shape
        p = self.patch_size
        mask_crop = np.asarray(mask_crop)
        if mask_crop.shape != (h * p, w * p):
            raise ValueError(f"mask crop {mask_crop.shape} does not match a {h}×{w} grid of {p}-px patches")
        ys, xs = np.nonzero(mask_crop)
        if len(ys) == 0:
            return
        cells = mask_crop[ys, xs].astype(np.int64)
        patch = (ys // p) * w + xs // p
        # one row per (cell, patch) pair with its pixel count
        pairs, counts = np.unique(np.stack([cells, patch], axis=1), axis=0, return_counts=True)
        rows = np.searchsorted(self.cell_ids, pairs[:, 0])
        known = (rows < len(self.cell_ids)) & (self.cell_ids[np.minimum(rows, len(self.cell_ids) - 1)] == pairs[:, 0])
        if not known.all():
            unknown = sorted(set(pairs[~known, 0].tolist()))[:5]
            raise ValueError(f"cell ids {unknown} are in the mask crop but not among the accumulator's cell ids")
        tokens = ps_grid.reshape(h * w, d).detach().to("cpu", torch.float64)[torch.from_numpy(pairs[:, 1])]
        weight = torch.from_numpy(counts.astype(np.float64))
        index = torch.from_numpy(rows)
        self.sums.index_add_(0, index, tokens * weight[:, None])
        self.weights.index_add_(0, index, weight)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cell ids, tokens (N, d) float32, total overlap weight (N,)) for the covered cells, by id."""
        covered = self.weights > 0
        tokens = (self.sums[covered] / self.weights[covered, None]).to(torch.float32).numpy()
        return self.cell_ids[covered.numpy()], tokens, self.weights[covered].numpy()


def niche_token(ps_grid: Tensor) -> Tensor:
    """Mean of a crop's PS tokens: (h, w, d) → (d,)."""
    return ps_grid.reshape(-1, ps_grid.shape[-1]).float().mean(0)


def tissue_token(ps_grids: Sequence[Tensor]) -> Tensor:
    """Mean over all PS tokens of all kept crops (equal crop sizes: the mean of niche tokens)."""
    if not ps_grids:
        raise ValueError("no crop reaches the tissue threshold: the tissue has no tissue token")
    return torch.cat([g.reshape(-1, g.shape[-1]).float() for g in ps_grids]).mean(0)
