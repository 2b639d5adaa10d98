"""H&E intensity histograms of the training tissues, computed once and carried in the checkpoint.

Why: the ROSIE paper's first quality-control metric (Methods, "Quality control") is the mean W1
distance between a new slide's 256-bin intensity histogram and those of the training slides. If the
histograms travel inside the model checkpoint, any lab can score a new slide without the training
data. They are counted block by block (bounded memory on slides), inside the tissue mask when the
dataset has one, and normalised per channel, as :func:`analysis.rosie_metrics.he_histograms` does
for one image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datamodules.store import DatasetStore

#: Rows of H&E read at once (3 × rows × width bytes).
BLOCK_ROWS = 1024


def tissue_he_histogram(store: DatasetStore, tissue_id: str) -> np.ndarray:
    """(3, 256) normalised histogram of one tissue's H&E (inside its tissue mask when stored)."""
    image = store.image("he", tissue_id)
    mask = store.tissue_mask(tissue_id, image.mpp)
    _, height, width = image.shape
    if mask is not None and mask.shape != (height, width):
        mask = None  # a mask on another grid cannot select pixels here; count the whole image
    counts = np.zeros((3, 256), dtype=np.int64)
    for y in range(0, height, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, height - y)
        block = image.read(y, 0, rows, width)
        keep = mask[y:y + rows].reshape(-1) if mask is not None else None
        for c in range(3):
            values = block[c].reshape(-1)
            counts[c] += np.bincount(values if keep is None else values[keep], minlength=256)
    totals = counts.sum(1, keepdims=True)
    return counts / np.maximum(totals, 1)


def training_he_histograms(data_dirs: Sequence[str], split: str = "train") -> np.ndarray:
    """(R, 3, 256) histograms of every ``split`` tissue with an H&E image in ``data_dirs``."""
    hists = []
    for root in data_dirs:
        store = DatasetStore(root)
        he_ids = set(store.image_ids("he")) if "he" in store.modalities() else set()
        hists += [tissue_he_histogram(store, tid) for tid in store.tissue_ids(split) if tid in he_ids]
    if not hists:
        raise ValueError(f"{list(data_dirs)}: no {split} tissue with an H&E image to take histograms from")
    return np.stack(hists).astype(np.float32)
