"""One tissue's prediction cut into chunk-aligned regions, with a completion record per region.

Why regions
    A slide is too large for one process: its output grid is cut into square regions whose sides
    are whole chunks of the output OME-Zarr (:data:`~lightning_modules.rosie_inference.outputs.CHUNK`
    output px, or the tile side when ``--tile-size`` is smaller). A region therefore writes whole
    chunks that no other region touches, so any number of ranks (devices, nodes) can fill one
    image at once without locks, and each chunk is written exactly once.

Why records
    After its chunks are written, a region leaves a record (``tiles/<k>.npz`` in the tissue's work
    folder): how many patches it predicted, its share of the QC sample, its H&E histogram and its
    per-cell partial sums. A run killed at any moment resumes at the first region without a
    record; the tissue's outputs are assembled from the records in region order
    (:mod:`~lightning_modules.rosie_inference.tissue_finish`), so they do not depend on which rank
    computed which region, nor on how often the run was interrupted.

The work folder ``<out>/.rosie-work/<tissue_id>/`` holds the plan (``plan.json``, written last
when preparing, so a half-prepared folder is simply prepared again), the foreground grid, the
grid image being filled, an optional cell mask copy (memory-mapped by every rank) and the
records. It is removed once the tissue's outputs are in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from datamodules import layout
from datamodules.provenance import PREDICTION
from datamodules.pyramids import MIN_TOP_SIDE
from datamodules.store import DatasetWriter
from lightning_modules.rosie_inference.accumulators import cell_contribution, he_histogram_counts
from lightning_modules.rosie_inference.geometry import PATCH_SIZE, check_stride, foreground_grid, output_shape
from lightning_modules.rosie_inference.options import PredictOptions
from lightning_modules.rosie_inference.outputs import CHUNK, PREDICTED_MODALITY, create_zarr_image, open_zarr_image
from lightning_modules.rosie_inference.tiles import WHITE, read_tile, tile_grid

#: Work folders of unfinished tissues, inside the prediction folder.
WORK_DIR = ".rosie-work"
PLAN_VERSION = 1
#: Stitching modes: this package's grid (+ optional blend) or the authors' script (black padding,
#: patches every ``stride // 2`` px centred on the grid points, Gaussian splat at native resolution).
STITCHING = ("grid", "official")


def region_layout(tile_size: int) -> tuple[int, int]:
    """``(region side, chunk side)`` in output px: the region is a whole number of chunks."""
    if tile_size < 1:
        raise ValueError(f"tile size must be positive, got {tile_size}")
    if tile_size < CHUNK:
        return tile_size, tile_size
    return -(-tile_size // CHUNK) * CHUNK, CHUNK


@dataclasses.dataclass
class TissuePlan:
    """Everything a rank needs to predict, write and record any region of one tissue (JSON-able)."""

    out: str
    tissue_id: str
    he_shape: list[int]  # [H, W] of the image as predicted (after resampling)
    mpp: float  # µm/px of that image
    stride: int  # --stride
    grid_stride: int  # stride of the predicted grid (stride // 2 for the authors' stitching)
    centre: int | None  # patch-centre offset (None: block centre; 0: the authors' grid point)
    fill: int  # padding value outside the image
    chunk: int
    regions: list[list[int]]  # [i0, i1, j0, j1] per region, row-major
    fg_offsets: list[int]  # foreground blocks before each region
    n_fg: int
    qc_step: int
    names: list[str]
    grid_rel: str
    final_rel: str
    stitching: str
    blend: bool
    blend_kernel: float | None
    ome_tiff: bool
    has_cells: bool
    source: dict  # how a worker opens the H&E image (see datamodules.rosie_tiles.open_source)
    meta: dict  # checkpoint, kind, sha256, model µm/px, device, rescaled
    tissue_row: dict
    channel_rows: dict  # the predicted modality's channel table, as columns
    segmentation: dict | None
    fingerprint: str
    version: int = PLAN_VERSION
    pyramid_min_side: int = MIN_TOP_SIDE  # output pyramids: levels halve until the longer side is at most this

    @property
    def work(self) -> str:
        return f"{WORK_DIR}/{self.tissue_id}"

    def rel(self, name: str) -> str:
        return f"{self.work}/{name}"


def work_rel(tissue_id: str) -> str:
    return f"{WORK_DIR}/{tissue_id}"


def remove_work(out: str | os.PathLike, tissue_id: str) -> None:
    """Remove a tissue's work folder, and the work root when no other tissue is unfinished."""
    writer = _writer(out)
    writer.remove(work_rel(tissue_id))
    root = writer.target(WORK_DIR)
    if writer.fs.exists(root) and not writer.fs.ls(root, detail=False):
        writer.fs.rm(root, recursive=True)


def _writer(out: str | os.PathLike) -> DatasetWriter:
    return DatasetWriter.open(out, kind=PREDICTION, written_by="rosie_predict")


def fingerprint(settings: dict) -> str:
    """Hash of what decides the result: a work folder made with other settings is not resumed."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_plan(out: str | os.PathLike, tissue_id: str) -> TissuePlan | None:
    """The plan of an unfinished tissue, or None when it has none (never prepared, or finished)."""
    writer = _writer(out)
    path = writer.target(f"{work_rel(tissue_id)}/plan.json")
    if not writer.fs.exists(path):
        return None
    with writer.fs.open(path, "r") as f:
        data = json.load(f)
    if data.get("version") != PLAN_VERSION:
        return None
    return TissuePlan(**data)


def prepare_tissue(out: str | os.PathLike, tissue_id: str, image: Any, mpp: float, options: PredictOptions,
                   names: Sequence[str], meta: dict, source: dict, *, tissue_mask: np.ndarray | None = None,
                   cell_mask: Any = None, segmentation: dict | None = None, tissue_row: dict | None = None,
                   channel_rows: dict | None = None, reference_hists: np.ndarray | None = None,
                   fresh: bool = False, identity: Any = None) -> TissuePlan:
    """Make (or find, to resume) the work folder of one tissue; one process calls this per tissue.

    An existing plan with the same fingerprint (settings, checkpoint, source ``identity``) is
    resumed unless ``fresh``; anything else in the work folder is discarded first.
    """
    stride = check_stride(options.stride)
    stitching = getattr(options, "stitching", "grid")
    if stitching not in STITCHING:
        raise ValueError(f"stitching must be one of {STITCHING}, got {stitching!r}")
    official = stitching == "official"
    grid_stride = max(1, stride // 2) if official else stride
    region, chunk = region_layout(options.tile_size)
    _, h, w = image.shape
    settings = {"version": PLAN_VERSION, "tissue": tissue_id, "shape": [int(h), int(w)], "mpp": float(mpp),
                "stride": stride, "stitching": stitching, "blend": bool(options.blend), "kernel": options.blend_kernel,
                "foreground": options.foreground if isinstance(options.foreground, str) else "mask",
                "mask": None if tissue_mask is None else hashlib.sha256(np.packbits(np.asarray(tissue_mask, bool))).hexdigest(),
                "tile": region, "mode": getattr(options, "mode", "exact"), "names": list(names),
                "checkpoint": meta.get("checkpoint_sha256") or meta.get("checkpoint"), "rescaled": meta.get("rescaled"),
                "cells": cell_mask is not None, "ome_tiff": bool(options.ome_tiff), "source": identity or source}
    pyramid_side = int(getattr(options, "pyramid_min_side", MIN_TOP_SIDE))
    if pyramid_side != MIN_TOP_SIDE:  # the default leaves the fingerprints of earlier plans as they were
        settings["pyramid_min_side"] = pyramid_side
    fp = fingerprint(settings)
    old = None if fresh else load_plan(out, tissue_id)
    if old is not None and old.fingerprint == fp:
        return old
    writer = _writer(out)
    writer.remove(work_rel(tissue_id))

    method: str | np.ndarray = options.foreground
    if options.foreground == "store":
        method = tissue_mask if tissue_mask is not None else "otsu"
    fg = foreground_grid(image, grid_stride, method)
    if not fg.any():
        name = getattr(image, "name", None) or getattr(image, "path", None) or tissue_id
        raise ValueError(f"{name}: no tissue found in the H&E ({h}×{w} px): the foreground mask is empty, so the "
                         "output would be all background; pass --foreground all to predict every patch")
    hout, wout = fg.shape
    regions = [list(t) for t in tile_grid(hout, wout, region)]
    counts = [int(fg[i0:i1, j0:j1].sum()) for i0, i1, j0, j1 in regions]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist() if counts else []
    grid_mpp = float(mpp) * grid_stride
    # the authors' grid (patches centred on its points) is an intermediate, kept only in the work folder
    grid_rel = f"{work_rel(tissue_id)}/grid.zarr" if official else layout.image_path(PREDICTED_MODALITY, grid_mpp, tissue_id)
    native = official or options.blend
    plan = TissuePlan(
        out=str(out), tissue_id=tissue_id, he_shape=[int(h), int(w)], mpp=float(mpp), stride=stride,
        grid_stride=grid_stride, centre=0 if official else None, fill=0 if official else WHITE, chunk=chunk,
        regions=regions, fg_offsets=offsets, n_fg=int(fg.sum()),
        qc_step=max(1, -(-int(fg.sum()) // max(1, options.qc_max_rows))), names=list(names), grid_rel=grid_rel,
        final_rel=layout.image_path(PREDICTED_MODALITY, float(mpp), tissue_id) if native else grid_rel,
        stitching=stitching, blend=bool(options.blend) and not official, blend_kernel=options.blend_kernel,
        ome_tiff=bool(options.ome_tiff), has_cells=cell_mask is not None, source=dict(source), meta=dict(meta),
        tissue_row=dict(tissue_row or {}), channel_rows=dict(channel_rows or {}), segmentation=segmentation,
        fingerprint=fp, pyramid_min_side=pyramid_side)
    _save_npy(writer, plan.rel("foreground.npy"), fg)
    if cell_mask is not None:
        _copy_mask(writer, plan.rel("cells.npy"), cell_mask)
    if reference_hists is not None:
        _save_npy(writer, plan.rel("reference.npy"), np.asarray(reference_hists, dtype=np.float64))
    fs = writer.fs
    create_zarr_image(fs, writer.target(plan.rel("grid.zarr")), (len(names), hout, wout), grid_mpp, names, tissue_id,
                      chunk=chunk, provenance=_provenance(plan))
    writer.write_bytes(plan.rel("plan.json"), json.dumps(dataclasses.asdict(plan), indent=1, default=str).encode())
    return plan


def _provenance(plan: TissuePlan) -> dict:
    """What every output image carries besides its µm/px and marker names."""
    return {"checkpoint_sha256": plan.meta.get("checkpoint_sha256"), "model_mpp": plan.meta.get("model_mpp"),
            "stride": plan.stride, "stitching": plan.stitching}


def _save_npy(writer: DatasetWriter, rel: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    writer.write_bytes(rel, buf.getvalue())


def _copy_mask(writer: DatasetWriter, rel: str, mask: Any, band: int = 2048) -> None:
    """The cell mask as one ``.npy`` every rank can memory-map, copied in row bands (lazy masks stay lazy)."""
    h, w = (int(n) for n in mask.shape)
    dtype = np.dtype(mask.dtype)
    local = writer.fs.protocol in ("file", "local") or "file" in writer.fs.protocol
    if not local:
        _save_npy(writer, rel, np.asarray(mask[:, :]))
        return
    target = writer.target(rel)
    writer.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(h, w))
    for y in range(0, h, band):
        mm[y : y + band] = np.asarray(mask[y : y + band, :])
    mm.flush()
    del mm
    os.replace(tmp, target)


class PlanFiles:
    """A plan's arrays as one process sees them: foreground, grid image (read-write), cell mask."""

    def __init__(self, plan: TissuePlan):
        self.plan = plan
        self.writer = _writer(plan.out)
        self.fg = self._load("foreground.npy")
        self._grid: Any = None
        self._cells: Any = None

    def _load(self, name: str, mmap: bool = False) -> np.ndarray:
        target = self.writer.target(self.plan.rel(name))
        if mmap and os.path.exists(target):
            return np.load(target, mmap_mode="r")
        with self.writer.fs.open(target, "rb") as f:
            return np.load(io.BytesIO(f.read()))

    @property
    def grid(self) -> Any:
        if self._grid is None:
            self._grid = open_zarr_image(self.writer.fs, self.writer.target(self.plan.rel("grid.zarr")), read_only=False)
        return self._grid

    @property
    def cells(self) -> Any:
        if self._cells is None and self.plan.has_cells:
            self._cells = self._load("cells.npy", mmap=True)
        return self._cells

    def provenance(self) -> dict:
        return _provenance(self.plan)

    def release(self) -> None:
        """Drop the open grid and the memory-mapped mask (before the work folder is removed)."""
        self._grid = None
        self._cells = None

    def read_inputs(self, image: Any, k: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Region ``k``'s H&E window (None without foreground), its foreground and its H&E histogram."""
        plan = self.plan
        i0, i1, j0, j1 = plan.regions[k]
        region, he = read_tile(image, self.fg, (i0, i1, j0, j1), plan.grid_stride, PATCH_SIZE, want_he=True,
                               fill=plan.fill, centre=plan.centre)
        return region, self.fg[i0:i1, j0:j1], he_histogram_counts(he)

    def reference(self) -> np.ndarray | None:
        target = self.writer.target(self.plan.rel("reference.npy"))
        return self._load("reference.npy") if self.writer.fs.exists(target) else None

    def record_rel(self, k: int) -> str:
        return self.plan.rel(f"tiles/{k:06d}.npz")

    def pending(self) -> list[int]:
        """Regions without a record, in region order."""
        folder = self.writer.target(self.plan.rel("tiles"))
        done = set()
        if self.writer.fs.exists(folder):
            for p in self.writer.fs.ls(folder, detail=False):
                name = p.rsplit("/", 1)[-1]
                if name.endswith(".npz") and not name.startswith("."):
                    done.add(int(name[: -len(".npz")]))
        return [k for k in range(len(self.plan.regions)) if k not in done]

    def write_region(self, k: int, pred: np.ndarray, values: np.ndarray, hist: np.ndarray, seconds: float,
                     rank: int = 0) -> dict:
        """Write region ``k``'s predictions into its chunks, then its record (see the module docstring)."""
        plan = self.plan
        i0, i1, j0, j1 = plan.regions[k]
        self.grid[:, i0:i1, j0:j1] = pred
        step, offset = plan.qc_step, plan.fg_offsets[k]
        take = np.arange((-offset) % step, values.shape[0], step)
        record: dict[str, Any] = {
            "n_patches": np.int64(values.shape[0]), "seconds": np.float64(seconds), "rank": np.int64(rank),
            "hist": np.asarray(hist, dtype=np.int64), "qc_rows": np.ascontiguousarray(values[take], dtype=np.float32),
            "nonfinite": np.int64((~np.isfinite(values)).sum()), "chunks": np.asarray(self.chunk_keys(k), dtype=np.int64),
            "written_at": np.float64(time.time())}
        if plan.has_cells:
            s = plan.grid_stride
            h, w = plan.he_shape
            native = (i0 * s, min(i1 * s, h), j0 * s, min(j1 * s, w))
            part = cell_contribution(self.cells, s, native, self.fg[i0:i1, j0:j1], pred)
            if part is not None:
                record.update({f"cell_{key}": value for key, value in part.items()})
        buf = io.BytesIO()
        np.savez(buf, **record)
        self.writer.write_bytes(self.record_rel(k), buf.getvalue())
        return record

    def read_record(self, k: int) -> dict[str, np.ndarray]:
        with self.writer.fs.open(self.writer.target(self.record_rel(k)), "rb") as f:
            with np.load(io.BytesIO(f.read())) as data:
                return {key: data[key] for key in data.files}

    def chunk_keys(self, k: int) -> list[list[int]]:
        """The (row, column) chunk indices region ``k`` writes."""
        i0, i1, j0, j1 = self.plan.regions[k]
        c = self.plan.chunk
        hout, wout = self.fg.shape
        ch, cw = min(c, hout), min(c, wout)
        return [[a, b] for a in range(i0 // ch, -(-i1 // ch)) for b in range(j0 // cw, -(-j1 // cw))]
