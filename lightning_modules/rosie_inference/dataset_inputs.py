"""What a prediction reads besides H&E pixels: what a dataset knows about a tissue, and QC references.

A dataset folder lends the tissue's stored tissue and cell masks, its tissues-table row, its
measured channel table (for UniProt ids) and, for ``--segment dapi``, its measured DAPI channel on
the H&E's pixel grid; the training-set H&E histograms (a file or the checkpoint's) are the
reference of the W1 colour-shift QC.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules import layout
from datamodules.markers import match_markers
from datamodules.store import DatasetStore, StoreError
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


class ChannelPlane:
    """One channel of a lazy ``(C, H, W)`` store image as a sliceable 2-D array, read region by region."""

    def __init__(self, image: Any, channel: int, name: str):
        self.image, self.channel, self.name = image, channel, name
        self.shape = tuple(int(n) for n in image.shape[1:])
        self.dtype = np.dtype(image.dtype)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        return self.image.read(y0, x0, y1 - y0, x1 - x0, channels=[self.channel])[0]


def store_has_cell_mask(root: str, tissue_id: str, mpp: float) -> bool:
    """Whether the dataset stores a cell mask of the tissue at ``mpp`` (checked without reading it)."""
    return DatasetStore(root).exists(layout.cell_mask_path(mpp, tissue_id))


def store_dapi_plane(root: str, tissue_id: str, mpp: float, shape: tuple[int, int]) -> ChannelPlane:
    """The tissue's measured DAPI channel at the H&E resolution ``mpp`` (any modality but ``he``), lazily.

    Its pixel grid must be the H&E's (``shape``): ingest writes H&E and CODEX on one grid, so a
    DAPI of another shape was not co-registered and its nuclei would not fall on the H&E cells.
    """
    store = DatasetStore(root)
    for modality in store.modalities():
        if modality == "he" or not store.exists(layout.image_path(modality, mpp, tissue_id)):
            continue
        image = store.image(modality, tissue_id, mpp)
        found = match_markers(["DAPI"], image.channel_names)
        if not found:
            continue
        if tuple(image.shape[1:]) != tuple(shape):
            raise StoreError(f"{image.path}: its DAPI plane is {tuple(image.shape[1:])} px but the H&E is {tuple(shape)}; "
                             "--segment dapi needs both on one pixel grid (ingest with --register-to-dapi)")
        return ChannelPlane(image, list(image.channel_names).index(found["DAPI"]), f"{image.path} DAPI")
    raise StoreError(f"{root}: tissue {tissue_id!r} has no DAPI channel at {mpp} µm/px in any modality; "
                     "use --segment he to segment the H&E itself")


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
