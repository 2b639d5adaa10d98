"""A tissue's outputs assembled from its region records: image, native image, QC, cells, record.

Runs once per tissue, in one process, after every region of the tissue has its record
(:mod:`~lightning_modules.rosie_inference.tile_plan`). Records are read in region order, so the
QC sample, the H&E histogram and the float64 per-cell sums are the same whether one process or
many predicted the regions. The grid image gets its NGFF pyramid (levels halving down to
``plan.pyramid_min_side`` px) and is moved out of the work folder into place; the
native-resolution image (``--blend`` or ``--stitching official``) is computed from it one chunk at
a time, and gets its pyramid before it is renamed into place; the tissue's completion record is
written last and the work folder removed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.rosie_metrics import w1_to_reference
from datamodules import layout
from datamodules.markers import match_markers
from lightning_modules.rosie_inference.accumulators import CellAccumulator, QCSample
from lightning_modules.rosie_inference.blend import blend_region
from lightning_modules.rosie_inference.official_stitching import official_region
from lightning_modules.rosie_inference.outputs import (CHUNK, MIN_TOP_SIDE, PREDICTED_MODALITY, add_ngff_pyramid,
                                                       create_zarr_image, local_output, open_zarr_image, write_ome_tiff)
from lightning_modules.rosie_inference.records import merge_records, write_record
from lightning_modules.rosie_inference.tile_plan import PlanFiles, TissuePlan, remove_work
from lightning_modules.rosie_inference.tiles import RunStats

log = logging.getLogger(__name__)
#: Which rank predicted which region, when, and the chunks it wrote (one CSV per tissue).
REGION_LOG = "qc/regions"
CELL_KEYS = ("cells", "sums", "count", "fg_count", "sum_y", "sum_x")


def describe(plan: TissuePlan) -> str:
    """One line of provenance for files that carry free text (OME-TIFF description)."""
    return (f"virtuplex rosie_predict; markers {', '.join(plan.names)}; checkpoint sha256 "
            f"{plan.meta.get('checkpoint_sha256')}; model µm/px {plan.meta.get('model_mpp')}; stride {plan.stride}; "
            f"stitching {plan.stitching}")


def finish_tissue(files: PlanFiles, update_shared: bool = True, quiet: bool = False) -> dict:
    """Assemble, write and record the tissue of ``files``; returns its QC entry."""
    plan, writer = files.plan, files.writer
    names, M = plan.names, len(plan.names)
    tid, s = plan.tissue_id, plan.grid_stride
    h, w = plan.he_shape
    fg = files.fg
    qc = QCSample(plan.n_fg, 1)
    qc.step = plan.qc_step
    cells = CellAccumulator(files.cells, s, M) if plan.has_cells else None
    hist = np.zeros((3, 256), dtype=np.int64)
    stats = RunStats()
    log_rows = []
    for k in range(len(plan.regions)):
        rec = files.read_record(k)
        log_rows.append({"region": k, "rank": int(rec["rank"]), "n_patches": int(rec["n_patches"]),
                         "seconds": float(rec["seconds"]), "written_at": float(rec["written_at"]),
                         "chunks": " ".join(f"{a}.{b}" for a, b in rec["chunks"].tolist())})
        if len(rec["qc_rows"]):
            qc.rows.append(rec["qc_rows"])
        qc.nonfinite += int(rec["nonfinite"])
        hist += rec["hist"]
        stats.n_patches += int(rec["n_patches"])
        stats.seconds += float(rec["seconds"])
        if cells is not None and "cell_cells" in rec:
            cells.add_contribution({key: rec[f"cell_{key}"] for key in CELL_KEYS})
    if not quiet:
        print(stats.line(), flush=True)
    log.info("%s: %s", tid, stats.line())

    # the grid image: out of the work folder, into place
    fs, target = writer.fs, writer.target(plan.grid_rel)
    if plan.grid_rel != plan.rel("grid.zarr"):
        pyramid_side = getattr(plan, "pyramid_min_side", MIN_TOP_SIDE)
        add_ngff_pyramid(fs, writer.target(plan.rel("grid.zarr")), pyramid_side)  # before the move: placed complete
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if fs.exists(target):
            fs.rm(target, recursive=True)
        fs.mv(writer.target(plan.rel("grid.zarr")), target, recursive=True)
    grid_mpp = plan.mpp * s
    native = plan.final_rel != plan.grid_rel
    if native:
        _write_native(files, fg, (M, h, w))

    writer.write_channels(PREDICTED_MODALITY, pd.DataFrame(plan.channel_rows))
    writer.write_tissue_mask(tid, grid_mpp, fg)
    dr = qc.dynamic_range(M)
    he_hist = hist / max(1, hist[0].sum())
    ref, w1 = files.reference(), None
    if ref is not None:
        w1 = w1_to_reference(he_hist, ref if ref.ndim == 3 else ref[None]) if ref.ndim in (2, 3) else None
    if qc.nonfinite:
        log.warning("%s: the model produced %d non-finite values", tid, qc.nonfinite)
    hout, wout = fg.shape
    entry = {
        "tissue_id": tid, "he_shape": [int(h), int(w)], "he_mpp": plan.mpp, "stride": plan.stride,
        "output_shape": [M, hout, wout] if not native else [M, int(h), int(w)],
        "output_mpp": grid_mpp if not native else plan.mpp, "image": plan.final_rel,
        "grid_image": plan.grid_rel if plan.stitching == "grid" else None,
        "blend": plan.blend, "foreground_blocks": plan.n_fg, "foreground_fraction": float(fg.mean()),
        "n_patches": stats.n_patches, "seconds": round(stats.seconds, 3), "patches_per_s": nan_to_none(stats.patches_per_s),
        "throughput": stats.line(), "device": plan.meta.get("device"), "checkpoint": plan.meta.get("checkpoint"),
        "checkpoint_kind": plan.meta.get("kind"), "rescaled_to_measured_units": bool(plan.meta.get("rescaled")),
        "dynamic_range": {n: nan_to_none(v) for n, v in zip(names, dr)},
        "dynamic_range_of": "stride-grid predictions of the foreground blocks",
        "dynamic_range_sampled_every": qc.step, "nonfinite_values": qc.nonfinite,
        "w1_to_training_he": nan_to_none(w1) if w1 is not None else None,
        "he_histogram": he_hist.round(8).tolist(),
        "stitching": plan.stitching, "grid_stride": s, "regions": len(plan.regions),
        "checkpoint_sha256": plan.meta.get("checkpoint_sha256"), "model_mpp": plan.meta.get("model_mpp"),
        "source_mpp": plan.meta.get("source_mpp"), "mode": plan.meta.get("mode", "exact"),
    }
    if plan.ome_tiff:
        out_tif = writer.target(f"{tid}.ome.tif")
        levels = write_ome_tiff(fs, out_tif, open_zarr_image(fs, writer.target(plan.final_rel)), names, entry["output_mpp"],
                                description=describe(plan), min_top_side=getattr(plan, "pyramid_min_side", MIN_TOP_SIDE))
        entry["ome_tiff"] = f"{tid}.ome.tif"
        entry["ome_tiff_levels"] = levels
    if plan.segmentation is not None:
        writer.write_cell_mask(tid, plan.mpp, np.asarray(files.cells))
        entry["cell_mask"] = layout.cell_mask_path(plan.mpp, tid)
        entry["cell_segmentation"] = dict(plan.segmentation)
    if cells is not None:
        uns = {"stride": plan.stride, "he_mpp": plan.mpp, "image": entry["grid_image"] or plan.final_rel,
               "checkpoint_sha256": plan.meta.get("checkpoint_sha256"), "model_mpp": plan.meta.get("model_mpp"),
               "output_mpp": grid_mpp}
        if plan.segmentation is not None:
            uns.update(cell_mask=entry["cell_mask"], cell_segmentation=dict(plan.segmentation))
        adata = cells.to_anndata(names, tid, uns=uns)
        target_h5 = writer.target(f"{tid}.cells.h5ad")
        with local_output(fs, target_h5, ".h5ad") as tmp:
            adata.write_h5ad(tmp)
        entry["cells_h5ad"] = f"{tid}.cells.h5ad"
        entry["n_cells"] = int(adata.n_obs)
    regions = pd.DataFrame(log_rows)
    entry["region_ranks"] = {str(r): int(n) for r, n in regions["rank"].value_counts().sort_index().items()}
    entry["region_log"] = f"{REGION_LOG}/{tid}.csv"
    writer.write_bytes(entry["region_log"], regions.to_csv(index=False).encode())
    per_marker = pd.DataFrame({"tissue_id": tid, "marker": names, "dynamic_range": dr,
                               "w1_to_training_he": np.nan if w1 is None else w1})
    write_record(writer, tid, entry, per_marker, {"tissue_id": tid, **plan.tissue_row})
    if update_shared:
        merge_records(plan.out, [tid])
    files.release()
    remove_work(plan.out, tid)
    return entry


def _write_native(files: PlanFiles, fg: np.ndarray, shape: tuple[int, int, int]) -> None:
    """The native-resolution image (blend or the authors' splat) of the placed grid, one chunk at a time."""
    plan, writer = files.plan, files.writer
    _, h, w = shape
    grid = open_zarr_image(writer.fs, writer.target(plan.grid_rel))
    with writer.atomic_path(plan.final_rel) as tmp:
        out = create_zarr_image(writer.fs, tmp, shape, plan.mpp, plan.names, plan.tissue_id,
                                provenance=files.provenance())
        for y in range(0, h, CHUNK):  # (M, 256, 256) per step: the gathers stay ~50 MB at 50 markers
            for x in range(0, w, CHUNK):
                bh, bw = min(CHUNK, h - y), min(CHUNK, w - x)
                if plan.stitching == "official":
                    out[:, y : y + bh, x : x + bw] = official_region(grid, fg, y, x, bh, bw, plan.stride)
                else:
                    out[:, y : y + bh, x : x + bw] = blend_region(grid, fg, y, x, bh, bw, plan.stride, plan.blend_kernel)
        add_ngff_pyramid(writer.fs, tmp, getattr(plan, "pyramid_min_side", MIN_TOP_SIDE))


def nan_to_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def channel_rows(names: Sequence[str], table: pd.DataFrame | None) -> dict:
    """The predicted modality's channel table as columns (kept in the plan)."""
    uniprot: dict[str, str | None] = {}
    nuclear: dict[str, bool] = {}
    if table is not None and "channel_name" in table.columns:
        by_name = table.set_index(table["channel_name"].astype(str))
        for marker, name in match_markers(names, by_name.index).items():
            uid = by_name.loc[name].get("uniprot_id") if "uniprot_id" in by_name.columns else None
            uniprot[marker] = uid if isinstance(uid, str) and uid else None
            if "is_nuclear_marker" in by_name.columns:
                nuclear[marker] = bool(by_name.loc[name, "is_nuclear_marker"])
    return {"channel_name": list(names), "uniprot_id": [uniprot.get(n) for n in names],
            "is_nuclear_marker": [nuclear.get(n, n == "DAPI") for n in names], "qc_pass": [True] * len(names)}
