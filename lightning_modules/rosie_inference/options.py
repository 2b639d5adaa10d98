"""Settings of one prediction run into a dataset folder, shared by the writer and the rerun check."""

from __future__ import annotations

import dataclasses

from datamodules.pyramids import MIN_TOP_SIDE
from lightning_modules.rosie_inference.tiles import DEFAULT_TILE


@dataclasses.dataclass
class PredictOptions:
    """How :func:`~lightning_modules.rosie_inference.dataset_prediction.predict_to_dataset` runs.

    ``stride``, ``blend`` and ``stitching`` also decide whether an earlier output still counts as
    complete (:func:`~lightning_modules.rosie_inference.records.is_complete`). ``stitching``:
    ``'grid'`` (this package: one prediction per block, white padding, optional blend) or
    ``'official'`` (the authors' script, :mod:`~lightning_modules.rosie_inference.official_stitching`).
    ``mode``: ``'exact'`` (every patch through the network) or ``'dense'`` (the dense approximation
    of :mod:`~lightning_modules.rosie_inference.dense`).
    """

    stride: int = 8
    batch_size: int = 64
    tile_size: int = DEFAULT_TILE
    foreground: str = "otsu"  # 'otsu' | 'all' | 'store' (use the dataset's tissue mask when present, else Otsu)
    blend: bool = False
    blend_kernel: float | None = None
    ome_tiff: bool = False
    overwrite: bool = False
    progress: bool = True
    qc_max_rows: int = 200_000
    stitching: str = "grid"
    mode: str = "exact"
    pyramid_min_side: int = MIN_TOP_SIDE  # NGFF / OME-TIFF levels halve until the longer side is at most this
