"""Run a trained VirTues encoder over whole tissues to get cell, niche and tissue tokens.

The aggregation rules live in :mod:`analysis.virtues_tokens`; this module owns the encoder side:
cutting crops (zero-padded raw pixels, then the same preprocessing as training), encoding them
unmasked in chunks (bf16 autocast on CUDA, like the official fp16 path), and feeding the PS grids to
the aggregators. Pixels come from any reader with ``read(y, x, h, w, channels)`` and ``shape``
(a store image, or an in-memory array wrapped by :class:`ArrayReader`), so slides are read crop by
crop and never whole.

Padding follows the authors' notebook: the image and the cell mask are zero-padded by 120 px on
every side before the stride-42 crop grid is laid (so border cells are seen in as many crops as
central ones); padding is applied to raw intensities and then preprocessed, exactly as a
zero-valued measured pixel would be.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from analysis.virtues_tokens import (
    CELL_CROP,
    CELL_STRIDE,
    MIN_TISSUE_FRACTION,
    NICHE_CROP,
    CellTokenAccumulator,
    cell_crop_corners,
    crop_tissue_fractions,
    niche_crop_corners,
    niche_token,
    tissue_token,
)

#: Official notebook practice: zero-pad by 120 px before laying the cell-token crop grid.
CELL_PAD = 120


class ArrayReader:
    """An in-memory (C, H, W) array with the store image's `read` interface."""

    def __init__(self, array: np.ndarray):
        if array.ndim != 3:
            raise ValueError(f"expected a (C, H, W) image, got shape {array.shape}")
        self.array = array

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        out = self.array[:, y : y + h, x : x + w]
        return out if channels is None else out[list(channels)]


def read_zero_padded(image: Any, y: int, x: int, size: int, channels: Sequence[int] | None) -> np.ndarray:
    """`size`² crop at (y, x) in image coordinates; parts outside the image are 0 (raw units)."""
    c, height, width = image.shape
    n = c if channels is None else len(channels)
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, height), min(x + size, width)
    out = None
    if y1 > y0 and x1 > x0:
        part = np.asarray(image.read(y0, x0, y1 - y0, x1 - x0, channels))
        out = np.zeros((n, size, size), dtype=part.dtype)
        out[:, y0 - y : y1 - y, x0 - x : x1 - x] = part
    return out if out is not None else np.zeros((n, size, size), dtype=np.float32)


def pad_mask_crop(mask: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    height, width = mask.shape
    out = np.zeros((size, size), dtype=mask.dtype)
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, height), min(x + size, width)
    if y1 > y0 and x1 > x0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = mask[y0:y1, x0:x1]
    return out


class CropEncoder:
    """Preprocessed (C, 128, 128) crops → PS grids (h, w, d), encoded unmasked in chunks."""

    def __init__(self, model: torch.nn.Module, marker_ids: Tensor, device: str | torch.device = "cpu",
                 chunk_size: int = 32, amp: bool = True):
        self.model = model.eval()
        self.device = torch.device(device)
        self.marker_ids = marker_ids.to(torch.long)
        self.chunk_size = chunk_size
        self._amp_requested = amp
        self.to(self.device)

    def to(self, device: str | torch.device) -> "CropEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.marker_ids = self.marker_ids.to(self.device)
        self.amp = self._amp_requested and self.device.type == "cuda"
        return self

    @torch.inference_mode()
    def __call__(self, crops: Sequence[Tensor]) -> list[Tensor]:
        grids: list[Tensor] = []
        for start in range(0, len(crops), self.chunk_size):
            chunk = [c.to(self.device, torch.float32) for c in crops[start : start + self.chunk_size]]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                enc = self.model.encode(chunk, [self.marker_ids] * len(chunk))
            grids.extend(g.float().cpu() for g in enc.patch_summary)
        return grids


@dataclass
class TissueTokens:
    cell_ids: np.ndarray  # (N,)
    cell_tokens: np.ndarray  # (N, d) float32
    cell_weights: np.ndarray  # (N,) total overlap pixels over all crops
    niche_corners: np.ndarray  # (K, 2) kept crops (y, x)
    niche_tokens: np.ndarray  # (K, d)
    niche_tissue_fraction: np.ndarray  # (K,)
    tissue_token: np.ndarray | None  # (d,), None when no crop reaches the tissue threshold
    n_cell_crops: int
    patch_tokens: np.ndarray  # (K, h, w, d) PS grids of the kept niche crops: the instances of tissue-level MIL


def _batches(corners: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(corners), size):
        yield corners[start : start + size]


def extract_tissue_tokens(image: Any, channels: Sequence[int] | None, preprocess: Callable[[np.ndarray], Tensor],
                          encoder: CropEncoder, cell_mask: np.ndarray | None, tissue_mask: np.ndarray | None,
                          pad: int = CELL_PAD, stride: int = CELL_STRIDE,
                          min_tissue_fraction: float = MIN_TISSUE_FRACTION, progress: Any = None) -> TissueTokens:
    """Cell tokens (if a cell mask is given), niche tokens and the tissue token of one image.

    ``preprocess`` maps a raw (C, 128, 128) crop to the model's input (clip/log/standardise/blur
    as in training). ``progress`` is an optional callable ``progress(n_done_crops)``.
    """
    _, height, width = image.shape
    cell_ids = np.empty(0, np.int64)
    cell_tokens = np.empty((0, 0), np.float32)
    cell_weights = np.empty(0)
    n_cell_crops = 0
    if cell_mask is not None:
        mask = np.asarray(cell_mask)
        if mask.shape != (height, width):
            raise ValueError(f"cell mask {mask.shape} does not match the image {(height, width)}")
        corners = cell_crop_corners(height + 2 * pad, width + 2 * pad, CELL_CROP, stride) - pad
        accumulator: CellTokenAccumulator | None = None
        for batch in _batches(corners, encoder.chunk_size):
            crops = [preprocess(read_zero_padded(image, int(y), int(x), CELL_CROP, channels)) for y, x in batch]
            for (y, x), grid in zip(batch, encoder(crops)):
                if accumulator is None:
                    accumulator = CellTokenAccumulator(np.unique(mask), grid.shape[-1])
                accumulator.add(grid, pad_mask_crop(mask, int(y), int(x), CELL_CROP))
            n_cell_crops += len(batch)
            if progress is not None:
                progress(len(batch))
        if accumulator is not None:
            cell_ids, cell_tokens, cell_weights = accumulator.result()

    corners = niche_crop_corners(height, width, NICHE_CROP)
    fractions = (crop_tissue_fractions(tissue_mask, corners, NICHE_CROP) if tissue_mask is not None
                 else np.ones(len(corners)))
    keep = fractions >= min_tissue_fraction
    kept = corners[keep]
    grids: list[Tensor] = []
    for batch in _batches(kept, encoder.chunk_size):
        grids.extend(encoder([preprocess(read_zero_padded(image, int(y), int(x), NICHE_CROP, channels)) for y, x in batch]))
        if progress is not None:
            progress(len(batch))
    niche = torch.stack([niche_token(g) for g in grids]).numpy() if grids else np.empty((0, cell_tokens.shape[-1]), np.float32)
    patch = torch.stack(grids).numpy() if grids else np.empty((0, 0, 0, niche.shape[-1]), np.float32)
    return TissueTokens(cell_ids, cell_tokens, cell_weights, kept, niche, fractions[keep],
                        tissue_token(grids).numpy() if grids else None, n_cell_crops, patch)
