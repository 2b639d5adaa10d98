"""Streaming prediction of one tissue into a dataset folder, with its QC and optional products.

Ties the pieces together: the H&E image and foreground
(:mod:`~lightning_modules.rosie_inference.geometry`), the tiled loop
(:mod:`~lightning_modules.rosie_inference.tiles`), the tile consumers
(:mod:`~lightning_modules.rosie_inference.accumulators`), the blend and the output files
(:mod:`~lightning_modules.rosie_inference.outputs`), and finally the tissue's completion record
(:mod:`~lightning_modules.rosie_inference.records`). The output folder is a dataset of kind
``prediction``: it reads like a measured dataset of the ``codex`` modality.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.rosie_metrics import w1_to_reference
from datamodules import layout
from datamodules.markers import match_markers
from datamodules.provenance import PREDICTION, check_dataset_target
from datamodules.store import DatasetWriter, StoreError
from lightning_modules.rosie_inference.accumulators import CellAccumulator, QCSample, he_histogram_counts
from lightning_modules.rosie_inference.blend import blend_region
from lightning_modules.rosie_inference.geometry import check_stride, foreground_grid
from lightning_modules.rosie_inference.he_input import as_he_image
from lightning_modules.rosie_inference.options import PredictOptions
from lightning_modules.rosie_inference.outputs import (CHUNK, PREDICTED_MODALITY, create_zarr_image, fsspec_root,
                                                       local_output, open_zarr_image, write_ome_tiff)
from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.records import merge_records, write_record
from lightning_modules.rosie_inference.tiles import RunStats, iter_predictions

log = logging.getLogger(__name__)


def predict_to_dataset(image: Any, predictor: PatchPredictor, out: str | os.PathLike, tissue_id: str, mpp: float,
                       options: PredictOptions | None = None, tissue_mask: np.ndarray | None = None,
                       cell_mask: Any = None, reference_hists: np.ndarray | None = None,
                       tissue_row: dict | None = None, channel_table: pd.DataFrame | None = None,
                       update_shared: bool = True, segmentation: dict | None = None) -> dict:
    """Predict one tissue and write it into the dataset folder ``out`` (created if absent).

    Writes ``codex/<mpp·s>mpp/images/<tissue_id>.ome.zarr`` (and, with blending,
    ``codex/<mpp>mpp/images/...`` at native resolution), ``codex/channels.parquet``, the foreground
    mask at the output grid, a ``metadata/tissues.parquet`` row, ``qc.json``/``qc.csv``, and
    optionally ``<tissue_id>.ome.tif`` and ``<tissue_id>.cells.h5ad`` at the dataset root. Every
    file is written under a temporary name and renamed. ``channel_table`` (a measured dataset's
    ``channels.parquet``) lends its UniProt ids to the predicted markers it names.

    The last file written is the tissue's completion record ``qc/tissues/<tissue_id>.json``
    (:func:`is_complete`). ``update_shared=False`` leaves the dataset-level tables (tissues,
    ``qc.json``, ``qc.csv``) alone, for distributed runs where one rank folds every record in
    afterwards (:func:`merge_records`). ``segmentation`` (how the cells were found) says that
    ``cell_mask`` was segmented for this prediction: the mask is then written into ``out``
    (``segmentations/<mpp>mpp/cell_masks/instances/<tissue_id>.npz``, at the H&E resolution) with the
    ``.h5ad``, and the settings are kept in the QC entry. Returns the tissue's QC entry.
    """
    opt = options or PredictOptions()
    stride = check_stride(opt.stride)
    layout.check_tissue_id(tissue_id)
    image = as_he_image(image)
    names = list(predictor.marker_names)
    M = len(names)
    _, h, w = image.shape
    out_mpp = float(mpp) * stride
    check_prediction_target(out)
    writer = DatasetWriter.open(out, kind=PREDICTION, written_by="rosie_predict")
    grid_rel = layout.image_path(PREDICTED_MODALITY, out_mpp, tissue_id)
    blend_rel = layout.image_path(PREDICTED_MODALITY, float(mpp), tissue_id) if opt.blend else None
    for rel in filter(None, (grid_rel, blend_rel)):
        if writer.fs.exists(writer.target(rel)) and not opt.overwrite:
            raise StoreError(f"{writer.target(rel)}: a prediction for tissue {tissue_id!r} already exists; "
                             "pass --overwrite to replace it")
    _check_channels(writer, names)
    if segmentation is not None and cell_mask is None:
        raise ValueError("segmentation settings were given without the segmented cell mask")
    if cell_mask is not None and tuple(cell_mask.shape) != (h, w):
        raise ValueError(f"cell mask shape {tuple(cell_mask.shape)} disagrees with the H&E image's {(h, w)} "
                         "(it must be at the H&E resolution)")

    method: str | np.ndarray = opt.foreground
    if opt.foreground == "store":
        method = tissue_mask if tissue_mask is not None else "otsu"
    fg = foreground_grid(image, stride, method)
    if not fg.any():
        source = getattr(image, "name", None) or getattr(image, "path", None) or tissue_id
        raise ValueError(f"{source}: no tissue found in the H&E ({h}×{w} px): the foreground mask is empty, so the "
                         "output would be all background; pass --foreground all to predict every patch")
    hout, wout = fg.shape
    qc_sample = QCSample(int(fg.sum()), opt.qc_max_rows)
    cells = CellAccumulator(cell_mask, stride, M) if cell_mask is not None else None
    hist = np.zeros((3, 256), dtype=np.int64)
    stats = RunStats()

    with writer.atomic_path(grid_rel) as tmp:
        arr = create_zarr_image(writer.fs, tmp, (M, hout, wout), out_mpp, names, tissue_id)
        for t in iter_predictions(image, predictor, stride, fg, opt.tile_size, opt.batch_size, want_he=True,
                                  progress=opt.progress, stats=stats):
            arr[:, t.i0 : t.i0 + t.pred.shape[1], t.j0 : t.j0 + t.pred.shape[2]] = t.pred
            qc_sample.add(t.fg_values)
            hist += he_histogram_counts(t.he)
            if cells is not None:
                cells.add(t)
    print(stats.line(), flush=True)
    log.info("%s: %s", tissue_id, stats.line())

    final_rel = grid_rel
    if blend_rel is not None:  # set exactly when opt.blend
        _write_blend(writer, grid_rel, blend_rel, fg, (M, h, w), float(mpp), names, tissue_id, stride, opt.blend_kernel)
        final_rel = blend_rel

    writer.write_channels(PREDICTED_MODALITY, _channel_rows(names, channel_table))
    writer.write_tissue_mask(tissue_id, out_mpp, fg)
    row = {"tissue_id": tissue_id, **(tissue_row or {})}

    # ---- QC
    dr = qc_sample.dynamic_range(M)
    he_hist = hist / max(1, hist[0].sum())
    w1 = None
    if reference_hists is not None:
        ref = np.asarray(reference_hists, dtype=np.float64)
        w1 = w1_to_reference(he_hist, ref if ref.ndim == 3 else ref[None]) if ref.ndim in (2, 3) else None
    if qc_sample.nonfinite:
        log.warning("%s: the model produced %d non-finite values", tissue_id, qc_sample.nonfinite)
    entry = {
        "tissue_id": tissue_id, "he_shape": [int(h), int(w)], "he_mpp": float(mpp), "stride": stride,
        "output_shape": [M, hout, wout] if not opt.blend else [M, int(h), int(w)],
        "output_mpp": out_mpp if not opt.blend else float(mpp), "image": final_rel, "grid_image": grid_rel,
        "blend": bool(opt.blend), "foreground_blocks": int(fg.sum()), "foreground_fraction": float(fg.mean()),
        "n_patches": stats.n_patches, "seconds": round(stats.seconds, 3), "patches_per_s": _nan_to_none(stats.patches_per_s),
        "throughput": stats.line(), "device": str(predictor.device), "checkpoint": predictor.meta.get("checkpoint"),
        "checkpoint_kind": predictor.meta.get("kind"), "rescaled_to_measured_units": bool(predictor.meta.get("rescaled")),
        "dynamic_range": {n: _nan_to_none(v) for n, v in zip(names, dr)},
        "dynamic_range_of": "stride-grid predictions of the foreground blocks",
        "dynamic_range_sampled_every": qc_sample.step, "nonfinite_values": qc_sample.nonfinite,
        "w1_to_training_he": _nan_to_none(w1) if w1 is not None else None,
        "he_histogram": he_hist.round(8).tolist(),
    }

    # ---- optional products
    if opt.ome_tiff:
        target = writer.target(f"{tissue_id}.ome.tif")
        write_ome_tiff(writer.fs, target, open_zarr_image(writer.fs, writer.target(final_rel)), names, entry["output_mpp"])
        entry["ome_tiff"] = f"{tissue_id}.ome.tif"
    if segmentation is not None:
        writer.write_cell_mask(tissue_id, float(mpp), np.asarray(cell_mask))
        entry["cell_mask"] = layout.cell_mask_path(float(mpp), tissue_id)
        entry["cell_segmentation"] = dict(segmentation)
    if cells is not None:
        uns = {"stride": stride, "he_mpp": float(mpp), "image": grid_rel}
        if segmentation is not None:
            uns.update(cell_mask=entry["cell_mask"], cell_segmentation=dict(segmentation))
        adata = cells.to_anndata(names, tissue_id, uns=uns)
        target = writer.target(f"{tissue_id}.cells.h5ad")
        with local_output(writer.fs, target, ".h5ad") as tmp:
            adata.write_h5ad(tmp)
        entry["cells_h5ad"] = f"{tissue_id}.cells.h5ad"
        entry["n_cells"] = int(adata.n_obs)
    per_marker = pd.DataFrame({"tissue_id": tissue_id, "marker": names, "dynamic_range": dr,
                               "w1_to_training_he": np.nan if w1 is None else w1})
    write_record(writer, tissue_id, entry, per_marker, row)
    if update_shared:
        merge_records(out, [tissue_id])
    return entry


def _write_blend(writer: DatasetWriter, grid_rel: str, blend_rel: str, fg: np.ndarray, shape: tuple[int, int, int],
                 mpp: float, names: Sequence[str], tissue_id: str, stride: int, kernel: float | None) -> None:
    """The native-resolution blend of the written grid image, computed and written one chunk at a time."""
    _, h, w = shape
    grid = open_zarr_image(writer.fs, writer.target(grid_rel))
    with writer.atomic_path(blend_rel) as tmp:
        barr = create_zarr_image(writer.fs, tmp, shape, mpp, names, tissue_id)
        step = CHUNK  # (M, 256, 256) per step: the blend's gathers stay ~50 MB at 50 markers
        for y in range(0, h, step):
            for x in range(0, w, step):
                bh, bw = min(step, h - y), min(step, w - x)
                barr[:, y : y + bh, x : x + bw] = blend_region(grid, fg, y, x, bh, bw, stride, kernel)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _channel_rows(names: Sequence[str], table: pd.DataFrame | None) -> pd.DataFrame:
    """The predicted modality's channel table: UniProt ids and nuclear flags borrowed from ``table`` by name."""
    uniprot: dict[str, str | None] = {}
    nuclear: dict[str, bool] = {}
    if table is not None and "channel_name" in table.columns:
        by_name = table.set_index(table["channel_name"].astype(str))
        for marker, name in match_markers(names, by_name.index).items():
            uid = by_name.loc[name].get("uniprot_id") if "uniprot_id" in by_name.columns else None
            uniprot[marker] = uid if isinstance(uid, str) and uid else None
            if "is_nuclear_marker" in by_name.columns:
                nuclear[marker] = bool(by_name.loc[name, "is_nuclear_marker"])
    return pd.DataFrame({
        "channel_name": list(names), "uniprot_id": [uniprot.get(n) for n in names],
        "is_nuclear_marker": [nuclear.get(n, n == "DAPI") for n in names], "qc_pass": [True] * len(names)})


def check_prediction_target(out: str | os.PathLike) -> None:
    """``out`` must be new, empty or an earlier prediction folder: never a measured dataset or a file."""
    fs, root = fsspec_root(out)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        check_dataset_target(root, PREDICTION, "rosie_predict",
                             file_hint="--out is the prediction folder; pass --ome-tiff to also get <tissue>.ome.tif in it")


def _check_channels(writer: DatasetWriter, names: Sequence[str]) -> None:
    """A prediction folder holds one marker panel: a model with other markers must write elsewhere."""
    old = writer.read_parquet(layout.channels_path(PREDICTED_MODALITY))
    if old is not None and [str(c) for c in old["channel_name"]] != list(names):
        raise StoreError(f"{writer.root}: its {PREDICTED_MODALITY} channels {list(old['channel_name'])[:5]}... differ from "
                         f"this model's markers {list(names)[:5]}...; write to a new output folder")
