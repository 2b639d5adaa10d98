"""Streaming prediction of one tissue into a dataset folder, with its QC and optional products.

Ties the pieces together in one process: the tissue's plan of chunk-aligned regions
(:mod:`~lightning_modules.rosie_inference.tile_plan`), each region read, predicted
(:mod:`~lightning_modules.rosie_inference.tiles`) and recorded in turn, then the outputs assembled
from the records (:mod:`~lightning_modules.rosie_inference.tissue_finish`). A Lightning run
(:mod:`experiments.rosie_predict`) does the same with the regions shared out over ranks. The output
folder is a dataset of kind ``prediction``: it reads like a measured dataset of the ``codex`` modality.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules import layout
from datamodules.provenance import PREDICTION, check_dataset_target
from datamodules.store import DatasetWriter, StoreError
from lightning_modules.rosie_inference.geometry import check_stride
from lightning_modules.rosie_inference.he_input import as_he_image
from lightning_modules.rosie_inference.official_stitching import official_grid_stride
from lightning_modules.rosie_inference.options import PredictOptions
from lightning_modules.rosie_inference.outputs import PREDICTED_MODALITY, fsspec_root
from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.tile_plan import PlanFiles, TissuePlan, prepare_tissue, remove_work
from lightning_modules.rosie_inference.tiles import predict_tile
from lightning_modules.rosie_inference.tissue_finish import channel_rows, finish_tissue

log = logging.getLogger(__name__)
TileFn = Callable[..., tuple[np.ndarray, np.ndarray]]


def predict_to_dataset(image: Any, predictor: PatchPredictor, out: str | os.PathLike, tissue_id: str, mpp: float,
                       options: PredictOptions | None = None, tissue_mask: np.ndarray | None = None,
                       cell_mask: Any = None, reference_hists: np.ndarray | None = None,
                       tissue_row: dict | None = None, channel_table: pd.DataFrame | None = None,
                       update_shared: bool = True, segmentation: dict | None = None) -> dict:
    """Predict one tissue and write it into the dataset folder ``out`` (created if absent).

    Writes ``codex/<mpp·s>mpp/images/<tissue_id>.ome.zarr`` (and, with blending or the authors'
    stitching, ``codex/<mpp>mpp/images/...`` at native resolution), ``codex/channels.parquet``, the
    foreground mask at the output grid, a ``metadata/tissues.parquet`` row, ``qc.json``/``qc.csv``,
    and optionally ``<tissue_id>.ome.tif`` and ``<tissue_id>.cells.h5ad`` at the dataset root. Every
    file appears complete or not at all. ``channel_table`` (a measured dataset's ``channels.parquet``)
    lends its UniProt ids to the predicted markers it names.

    The last file written is the tissue's completion record ``qc/tissues/<tissue_id>.json``
    (:func:`is_complete`). ``update_shared=False`` leaves the dataset-level tables (tissues,
    ``qc.json``, ``qc.csv``) alone (:func:`merge_records` folds them in later). ``segmentation``
    (how the cells were found) says that ``cell_mask`` was segmented for this prediction: the mask is
    then written into ``out`` (``segmentations/<mpp>mpp/cell_masks/instances/<tissue_id>.npz``) with
    the ``.h5ad``. This in-process path starts afresh and removes its work folder when it fails;
    :mod:`experiments.rosie_predict` resumes interrupted runs. Returns the tissue's QC entry.
    """
    opt = options or PredictOptions()
    image = as_he_image(image)
    plan = plan_tissue(image, predictor, out, tissue_id, mpp, opt, tissue_mask=tissue_mask, cell_mask=cell_mask,
                       reference_hists=reference_hists, tissue_row=tissue_row, channel_table=channel_table,
                       segmentation=segmentation, source={"kind": "memory"}, fresh=True)
    try:
        files = PlanFiles(plan)
        run_regions(files, image, predictor, opt.batch_size, progress=opt.progress)
        return finish_tissue(files, update_shared=update_shared)
    except BaseException:
        remove_work(out, tissue_id)
        raise


def predictor_meta(predictor: PatchPredictor, mode: str = "exact") -> dict:
    """What the outputs say about the model that made them."""
    meta = predictor.meta
    return {"checkpoint": meta.get("checkpoint"), "kind": meta.get("kind"), "rescaled": bool(meta.get("rescaled")),
            "checkpoint_sha256": meta.get("sha256"), "model_mpp": meta.get("model_mpp"), "device": str(predictor.device),
            "mode": mode}


def plan_tissue(image: Any, predictor: PatchPredictor, out: str | os.PathLike, tissue_id: str, mpp: float,
                options: PredictOptions, *, source: dict, fresh: bool, tissue_mask: np.ndarray | None = None,
                cell_mask: Any = None, reference_hists: np.ndarray | None = None, tissue_row: dict | None = None,
                channel_table: pd.DataFrame | None = None, segmentation: dict | None = None,
                identity: Any = None, meta: dict | None = None) -> TissuePlan:
    """Check one tissue's inputs and the output folder, then make (or resume) its plan."""
    stride = check_stride(options.stride)
    layout.check_tissue_id(tissue_id)
    names = list(predictor.marker_names)
    _, h, w = image.shape
    check_prediction_target(out)
    writer = DatasetWriter.open(out, kind=PREDICTION, written_by="rosie_predict")
    official = options.stitching == "official"
    grid_stride = official_grid_stride(stride) if official else stride
    rels = [] if official else [layout.image_path(PREDICTED_MODALITY, float(mpp) * grid_stride, tissue_id)]
    if official or options.blend:
        rels.append(layout.image_path(PREDICTED_MODALITY, float(mpp), tissue_id))
    for rel in rels:
        if writer.fs.exists(writer.target(rel)) and not options.overwrite:
            raise StoreError(f"{writer.target(rel)}: a prediction for tissue {tissue_id!r} already exists; "
                             "pass --overwrite to replace it")
    check_channels(writer, names)
    if segmentation is not None and cell_mask is None:
        raise ValueError("segmentation settings were given without the segmented cell mask")
    if cell_mask is not None and tuple(cell_mask.shape) != (h, w):
        raise ValueError(f"cell mask shape {tuple(cell_mask.shape)} disagrees with the H&E image's {(h, w)} "
                         "(it must be at the H&E resolution)")
    return prepare_tissue(out, tissue_id, image, mpp, options, names, meta or predictor_meta(predictor, options.mode),
                          source, tissue_mask=tissue_mask, cell_mask=cell_mask, segmentation=segmentation,
                          tissue_row=tissue_row, channel_rows=channel_rows(names, channel_table),
                          reference_hists=reference_hists, fresh=fresh, identity=identity)


def run_regions(files: PlanFiles, image: Any, predictor: PatchPredictor, batch_size: int, progress: bool = True,
                tile_fn: TileFn = predict_tile) -> int:
    """Predict and record every pending region of one plan in this process (the next region is
    read in a background thread while this one is predicted); returns the regions done."""
    plan = files.plan
    pending = files.pending()
    M = len(plan.names)

    def load(k: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        return files.read_inputs(image, k)

    columns = (TextColumn("ROSIE patches"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    total = int(sum(files.fg[i0:i1, j0:j1].sum() for i0, i1, j0, j1 in (plan.regions[k] for k in pending)))
    with Progress(*columns, disable=not progress, transient=False) as bar, ThreadPoolExecutor(max_workers=1) as pool:
        task = bar.add_task("predict", total=total)
        future = pool.submit(load, pending[0]) if pending else None
        for n, k in enumerate(pending):
            region, tfg, hist = future.result()  # type: ignore[union-attr]
            future = pool.submit(load, pending[n + 1]) if n + 1 < len(pending) else None
            start = time.perf_counter()
            pred = np.zeros((M,) + tfg.shape, dtype=np.float32)
            values = np.zeros((0, M), dtype=np.float32)
            if region is not None:
                pred, values = tile_fn(region, tfg, predictor, plan.grid_stride, batch_size,
                                       on_batch=lambda b: bar.advance(task, b))
            files.write_region(k, pred, values, hist, time.perf_counter() - start)
    return len(pending)


def check_prediction_target(out: str | os.PathLike) -> None:
    """``out`` must be new, empty or an earlier prediction folder: never a measured dataset or a file."""
    fs, root = fsspec_root(out)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        check_dataset_target(root, PREDICTION, "rosie_predict",
                             file_hint="--out is the prediction folder; pass --ome-tiff to also get <tissue>.ome.tif in it")


def check_channels(writer: DatasetWriter, names: Sequence[str]) -> None:
    """A prediction folder holds one marker panel: a model with other markers must write elsewhere."""
    old = writer.read_parquet(layout.channels_path(PREDICTED_MODALITY))
    if old is not None and [str(c) for c in old["channel_name"]] != list(names):
        raise StoreError(f"{writer.root}: its {PREDICTED_MODALITY} channels {list(old['channel_name'])[:5]}... differ from "
                         f"this model's markers {list(names)[:5]}...; write to a new output folder")
