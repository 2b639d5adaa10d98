"""In-memory prediction of a small image (tests, benchmarks, notebooks): the result as arrays.

The same tiled loop as the streaming writer
(:func:`~lightning_modules.rosie_inference.dataset_prediction.predict_to_dataset`), with the
output grid held in memory instead of written to a dataset folder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lightning_modules.rosie_inference.accumulators import CellAccumulator
from lightning_modules.rosie_inference.blend import blend_region
from lightning_modules.rosie_inference.geometry import check_stride, foreground_grid
from lightning_modules.rosie_inference.he_input import as_he_image
from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.tiles import DEFAULT_TILE, RunStats, iter_predictions


@dataclasses.dataclass
class Prediction:
    """What :func:`predict_image` returns: the image asked for, its stride grid and the foreground."""

    image: np.ndarray  # (M, Hout, Wout) float32, or (M, H, W) when blended
    grid: np.ndarray  # (M, Hout, Wout) stride-grid prediction
    foreground: np.ndarray  # (Hout, Wout) bool
    stats: RunStats
    marker_names: list[str]
    cells: Any = None  # AnnData when a cell mask was given


def predict_image(image: Any, predictor: PatchPredictor, stride: int = 8, foreground: str | np.ndarray = "otsu",
                  batch_size: int = 64, tile_size: int = DEFAULT_TILE, blend: bool = False,
                  blend_kernel: float | None = None, cell_mask: Any = None, tissue_id: str = "tissue",
                  progress: bool = False) -> Prediction:
    """Predict a whole image held in memory at the output size (the streaming writer is
    :func:`predict_to_dataset`). ``image``: an :class:`ArrayHE`, a store image, or an RGB uint8
    array ``(H,W,3)``/``(3,H,W)``."""
    image = as_he_image(image)
    stride = check_stride(stride)
    fg = foreground_grid(image, stride, foreground)
    grid = np.zeros((predictor.num_markers,) + fg.shape, dtype=np.float32)
    stats = RunStats()
    cells = CellAccumulator(cell_mask, stride, predictor.num_markers) if cell_mask is not None else None
    if cells is not None and tuple(cell_mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"cell mask shape {tuple(cell_mask.shape)} disagrees with the H&E image's {tuple(image.shape[1:])}")
    for t in iter_predictions(image, predictor, stride, fg, tile_size, batch_size, progress=progress, stats=stats):
        grid[:, t.i0 : t.i0 + t.pred.shape[1], t.j0 : t.j0 + t.pred.shape[2]] = t.pred
        if cells is not None:
            cells.add(t)
    out = grid
    if blend:
        _, h, w = image.shape
        out = blend_region(grid, fg, 0, 0, h, w, stride, blend_kernel)
    adata = cells.to_anndata(predictor.marker_names, tissue_id) if cells is not None else None
    return Prediction(out, grid, fg, stats, list(predictor.marker_names), adata)
