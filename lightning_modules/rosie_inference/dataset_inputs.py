"""What a prediction reads besides H&E pixels: what a dataset knows about a tissue, and QC references.

A dataset folder lends the tissue's stored tissue and cell masks, its tissues-table row and its
measured channel table (for UniProt ids); the training-set H&E histograms (a file or the
checkpoint's) are the reference of the W1 colour-shift QC.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules.store import DatasetStore
from lightning_modules.rosie_inference.he_input import check_store_he
from lightning_modules.rosie_inference.outputs import PREDICTED_MODALITY
from lightning_modules.rosie_inference.predictor import PatchPredictor


def store_tissue_inputs(root: str, tissue_id: str, mpp: float | None = None) -> tuple[Any, float, np.ndarray | None, Any, dict]:
    """A dataset's H&E image of a tissue with what else the store knows about it."""
    store = DatasetStore(root)
    img = store.image("he", tissue_id, mpp)
    check_store_he(img, img.path)
    tissue_mask = store.tissue_mask(tissue_id, img.mpp)
    cell_mask = store.cell_mask(tissue_id, img.mpp)
    row: dict = {}
    tissues = store.tissues()
    match = tissues[tissues["tissue_id"].astype(str) == tissue_id]
    if len(match):
        for key in ("patient_id", "split"):
            if key in match.columns:
                row[key] = match.iloc[0][key]
    row["source"] = store.url
    return img, img.mpp, tissue_mask, cell_mask, row


def store_channel_table(root: str, modality: str = PREDICTED_MODALITY) -> pd.DataFrame | None:
    """The measured channels table of a dataset (for UniProt ids), if it has that modality."""
    store = DatasetStore(root)
    return store.channels(modality) if modality in store.modalities() else None


def load_reference_hists(path: str | os.PathLike | None, predictor: PatchPredictor | None = None) -> np.ndarray | None:
    """Training-set H&E histograms: a file (``.npy`` or ``.npz``, shape (R,3,256)), else the checkpoint's."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference histogram file not found: {path}")
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            data = data[data.files[0]]
        ref = np.asarray(data, dtype=np.float64)
    elif predictor is not None and predictor.meta.get("reference_he_histograms") is not None:
        ref = np.asarray(predictor.meta["reference_he_histograms"], dtype=np.float64)
    else:
        return None
    if ref.ndim == 2 and ref.shape == (3, 256):
        ref = ref[None]
    if ref.ndim != 3 or ref.shape[1:] != (3, 256):
        raise ValueError(f"reference H&E histograms must have shape (R, 3, 256) (RGB, 256 bins), got {ref.shape}")
    return ref
