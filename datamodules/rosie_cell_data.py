"""Per-cell tables for ROSIE's downstream science: measured, ROSIE-predicted and morphology inputs.

The paper (Methods, "Inference") gets cell-level predicted expression "by upsampling the predicted
image to the native resolution and then computing the average expression per cell based on the cell
segmentation mask"; measured cell expression is the mean of the measured CODEX channels over the
same mask; the morphology baseline's input is the 19 morphometry features + mean RGB of each cell
(:func:`analysis.rosie_baselines.cell_features`). This module reads all of it for one tissue from a
truth dataset and a ``rosie_predict`` output, block by block (bounded memory on slides), on one cell
mask: the truth dataset's (the paper segments the measured DAPI), else the one ``rosie_predict
--segment`` wrote beside the prediction.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from analysis.cell_segmentation import segment_cells_dapi, segment_cells_he
from analysis.rosie_baselines import cell_features
from datamodules.store import DatasetStore

log = logging.getLogger(__name__)

BLOCK_ROWS = 1024
MODALITY = "codex"


@dataclass
class SampleCells:
    """The cells of one tissue, aligned row by row (ids ascending)."""

    tissue_id: str
    cell_ids: np.ndarray  # (N,) instance ids of the mask
    xy_um: np.ndarray  # (N, 2) centroids (x, y) in µm
    features: np.ndarray  # (N, 22) morphometry + mean RGB: the morphology baseline's input
    measured: np.ndarray  # (N, M) mean measured expression per cell, markers in the order asked
    predicted: np.ndarray | None  # (N, M) mean ROSIE prediction per cell (None: not predicted)
    mask_source: str  # "truth" | "prediction" | "segmented (dapi|he)"
    labels: np.ndarray | None = None  # the user's own cell labels (cells.parquet), if asked for

    @property
    def n_cells(self) -> int:
        return int(len(self.cell_ids))


def per_cell_means(image, channels: Sequence[int], mask: np.ndarray, cell_ids: np.ndarray,  # type: ignore[no-untyped-def]
                   scale: int = 1) -> np.ndarray:
    """(N, len(channels)) mean of ``image`` channels over each cell of ``mask``.

    ``image`` is an ``ImageArray``-like (``shape``, ``read``); ``scale`` > 1 means the image is on a
    grid ``scale`` times coarser than the mask (a stride-``scale`` prediction), each image pixel
    standing for a ``scale``×``scale`` block of mask pixels (nearest-neighbour upsampling).
    """
    height, width = mask.shape
    index = np.zeros(int(mask.max()) + 1, dtype=np.int64) - 1
    index[cell_ids] = np.arange(len(cell_ids))
    sums = np.zeros((len(cell_ids), len(channels)), dtype=np.float64)
    counts = np.zeros(len(cell_ids), dtype=np.float64)
    _, img_h, img_w = image.shape
    step = max(scale, (BLOCK_ROWS // scale) * scale)
    for y in range(0, height, step):
        rows = min(step, height - y)
        labels = mask[y:y + rows]
        rows_img = slice(y // scale, min(img_h, -(-(y + rows) // scale)))
        block = image.read(rows_img.start, 0, rows_img.stop - rows_img.start, img_w, channels).astype(np.float64)
        if scale > 1:
            block = np.repeat(np.repeat(block, scale, axis=1), scale, axis=2)
            offset = y - rows_img.start * scale
            block = block[:, offset:offset + rows, :width]
        flat = index[labels.reshape(-1)]
        inside = flat >= 0
        cells = flat[inside]
        counts += np.bincount(cells, minlength=len(cell_ids))
        for j in range(len(channels)):
            sums[:, j] += np.bincount(cells, weights=block[j].reshape(-1)[inside], minlength=len(cell_ids))
    return sums / np.maximum(counts, 1)[:, None]


def cell_centroids_um(mask: np.ndarray, cell_ids: np.ndarray, mpp: float) -> np.ndarray:
    """(N, 2) centroids (x, y) in µm."""
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(mask, dtype=np.uint8), mask, cell_ids), dtype=np.float64)
    return centres[:, ::-1].copy() * mpp if len(centres) else np.zeros((0, 2))


#: Where cells come from: the stored masks, or the paper's segmentation of the measured DAPI (or of the H&E).
CELL_SOURCES = ("stored", "dapi", "he")


def segmented_cells(truth: DatasetStore, tissue_id: str, mpp: float, source: str) -> np.ndarray:
    """Cells segmented by :mod:`analysis.cell_segmentation`: ``dapi`` = the measured DAPI channel (the
    paper: "segmentation masks calculated from the DAPI channel"), ``he`` = the H&E's hematoxylin."""
    if source == "dapi":
        codex = truth.image(MODALITY, tissue_id, mpp)
        names = [n.lower() for n in codex.channel_names]
        if "dapi" not in names:
            raise ValueError(f"{codex.path}: no DAPI channel to segment (channels: {codex.channel_names[:6]}...); "
                             "use --cells he or stored masks")
        dapi = codex.read(0, 0, *codex.shape[1:], [names.index("dapi")])[0]
        return segment_cells_dapi(dapi, mpp).cells
    return segment_cells_he(truth.image("he", tissue_id, mpp).read_all(), mpp).cells


@functools.lru_cache(maxsize=8)
def _segmented_cached(url: str, tissue_id: str, mpp: float, source: str) -> np.ndarray:
    return segmented_cells(DatasetStore(url), tissue_id, mpp, source)


def cell_mask_for(truth: DatasetStore, tissue_id: str, mpp: float, cells: str = "stored") -> np.ndarray | None:
    """The cells of a tissue as an instance mask: the stored one (None when absent) or segmented here
    (cached, so the baselines and the tables of one run see the same cells)."""
    if cells not in CELL_SOURCES:
        raise ValueError(f"cells={cells!r}: choose from {CELL_SOURCES}")
    if cells == "stored":
        return truth.cell_mask(tissue_id, mpp)
    return _segmented_cached(truth.url, tissue_id, float(mpp), cells)


def _cell_mask(truth: DatasetStore, pred: DatasetStore | None, tissue_id: str, mpp: float,
               shape: tuple[int, int], source: str = "stored") -> tuple[np.ndarray | None, str]:
    if source != "stored":
        return cell_mask_for(truth, tissue_id, mpp, source), f"segmented ({source})"
    mask = truth.cell_mask(tissue_id, mpp)
    if mask is not None and mask.shape == shape:
        return mask, "truth"
    if pred is not None:
        for res in sorted({mpp, *pred.resolutions("he")} if "he" in pred.modalities() else {mpp}):
            found = pred.cell_mask(tissue_id, res)
            if found is not None and found.shape == shape:
                return found, "prediction"
    return None, ""


def read_sample_cells(truth: DatasetStore, tissue_id: str, truth_channels: Sequence[str],
                      pred: DatasetStore | None = None, pred_channels: Sequence[str] | None = None,
                      pred_mpp: float | None = None, label_column: str | None = None,
                      cells: str = "stored") -> SampleCells | None:
    """One tissue's cells; None (logged) when it has no cell mask on the measured grid.

    ``truth_channels`` / ``pred_channels``: the matched marker names in each dataset, same order
    (``datamodules.rosie_evaluation_data.match_panel``). ``pred`` None: measured and features only
    (training tissues of the morphology baseline). ``cells``: ``stored`` masks (the truth dataset's,
    else a ``rosie_predict --segment`` mask), or segment the measured ``dapi`` / the ``he`` here. User
    labels need stored masks (their ids are the mask's).
    """
    mpp = truth.resolutions(MODALITY)[0]
    codex = truth.image(MODALITY, tissue_id, mpp)
    shape = tuple(codex.shape[1:])
    mask, source = _cell_mask(truth, pred, tissue_id, mpp, shape, cells)
    if mask is None:
        log.warning("%s: no cell mask at %g µm/px in %s%s: its cells are left out (segment with rosie_predict "
                    "--segment, or ingest a --cell-mask)", tissue_id, mpp, truth.url, f" or {pred.url}" if pred else "")
        return None
    he = truth.image("he", tissue_id, mpp).read_all() if "he" in truth.modalities() else None
    cell_ids, features = cell_features(mask, he)
    if not len(cell_ids):
        return None
    names = list(codex.channel_names)
    measured = per_cell_means(codex, [names.index(c) for c in truth_channels], mask, cell_ids)
    predicted = None
    if pred is not None and pred_channels is not None:
        res = pred_mpp if pred_mpp is not None else max(pred.resolutions(MODALITY))
        image = pred.image(MODALITY, tissue_id, res)
        scale = int(round(res / mpp))
        if scale < 1 or abs(scale * mpp - res) > 1e-6 * res:
            raise ValueError(f"{image.path}: prediction at {res:g} µm/px is not a whole multiple of the measured "
                             f"{mpp:g} µm/px; predict at a stride that divides the grid")
        pnames = list(image.channel_names)
        predicted = per_cell_means(image, [pnames.index(c) for c in pred_channels], mask, cell_ids, scale)
    labels = None
    if label_column is not None:
        if cells != "stored":
            raise ValueError("--label-column needs the stored cell masks (the labels' cell ids are theirs); drop --cells")
        labels = _user_labels(truth, tissue_id, cell_ids, label_column)
    return SampleCells(tissue_id, cell_ids, cell_centroids_um(mask, cell_ids, mpp), features, measured, predicted,
                       source, labels)


def _user_labels(truth: DatasetStore, tissue_id: str, cell_ids: np.ndarray, column: str) -> np.ndarray:
    cells = truth.cells()
    if cells is None or column not in cells.columns:
        raise ValueError(f"{truth.url}: metadata/cells.parquet has no column {column!r} to take cell labels from")
    mine = cells[cells["tissue_id"].astype(str) == tissue_id].set_index("cell_id")[column]
    return mine.reindex(cell_ids).astype(object).to_numpy()
