"""Read what the ROSIE evaluation needs from prediction and truth datasets, as arrays.

Why a module of its own: the metrics, tables, baselines and figures (:mod:`analysis.rosie_evaluation`,
:mod:`analysis.rosie_baselines`, :mod:`analysis.rosie_figures`) are the bottom layer and must not
import the dataset store; the reading lives here, one layer up (``experiments`` -> ``datamodules``
-> ``analysis``), and hands them plain arrays and tables. The orchestration that combines both is
:mod:`experiments.rosie_evaluation_pipeline`. The evaluation policies (patches, evaluated and
background blocks, baselines) are documented in :mod:`analysis.rosie_evaluation`.

What is read here:

* marker matching of a prediction against a dataset (:func:`match_panel`, alias table of
  :mod:`datamodules.markers`);
* one tissue cut into the prediction's patches (:func:`load_tissue`: resolutions, stride, block
  means of the measured CODEX, truth tissue fraction, prediction foreground, per-tissue presence);
* the truth H&E and cell masks for the baselines (:func:`read_he`,
  :func:`read_morphometry_inputs`, :func:`cell_morphology_inputs`), the H&E patches of the
  Grad-CAM figure (:func:`read_gradcam_patches`) and the images of the predicted-vs-measured
  figure (:func:`percentile_loader`);
* patch-level ground-truth folders (:func:`is_patch_level_truth`, :func:`load_patch_level_truth`,
  :func:`read_rgb_png`).

No Lightning here: ``datamodules.store``/``sampling``/``markers``/``preprocess`` and ``analysis`` only.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.io import imread

from analysis.rosie_baselines import MorphologyData, patch_morphology_features
from analysis.rosie_evaluation import IN_TISSUE_FRACTION, MODEL_PATCH, EvaluationError, TissuePatches, detect_stride
from analysis.rosie_figures import SampleLoader, display_factor
from analysis.rosie_patch_level import PatchLevelTruth
from datamodules.markers import canonical_marker, match_markers
from datamodules.preprocess import otsu_tissue_mask
from datamodules.rosie_cell_data import cell_mask_for
from datamodules.sampling import block_means, read_padded, tissue_fraction_grid
from datamodules.store import DatasetStore, StoreError

log = logging.getLogger(__name__)

MODALITY = "codex"


# ============================================================================================
# Markers, resolutions
# ============================================================================================


def match_panel(predicted: Sequence[str], measured: Sequence[str]) -> pd.DataFrame:
    """One row per marker: ``marker`` (canonical name), ``predicted_channel``, ``measured_channel``,
    ``status`` in {matched, not_measured (predicted only), not_predicted (measured only)}."""
    predicted, measured = [str(p) for p in predicted], [str(m) for m in measured]
    mapping = match_markers(predicted, measured)
    rows, used, seen = [], set(), {}
    for p in predicted:
        canon = canonical_marker(p)
        if canon in seen:
            log.warning("predicted channels %r and %r are the same marker %s; only the first is evaluated", seen[canon], p, canon)
            rows.append({"marker": canon, "predicted_channel": p, "measured_channel": None, "status": "duplicate"})
            continue
        seen[canon] = p
        if p in mapping:
            used.add(mapping[p])
            rows.append({"marker": canon, "predicted_channel": p, "measured_channel": mapping[p], "status": "matched"})
        else:
            rows.append({"marker": canon, "predicted_channel": p, "measured_channel": None, "status": "not_measured"})
    for m in measured:
        if m not in used:
            rows.append({"marker": canonical_marker(m), "predicted_channel": None, "measured_channel": m, "status": "not_predicted"})
    return pd.DataFrame(rows, columns=["marker", "predicted_channel", "measured_channel", "status"])


def _channel_index(image_names: Sequence[str], wanted: Sequence[str], path: str) -> list[int]:
    names = [str(n) for n in image_names]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise EvaluationError(f"{path}: channels {missing} listed in channels.parquet are not in the image's channel names "
                              f"{names[:8]}...; rewrite the image or its channels table")
    return [names.index(w) for w in wanted]


def _truth_tissue_fraction(truth: DatasetStore, tissue_id: str, mpp: float, shape: tuple[int, int], s: int) -> tuple[np.ndarray | None, str]:
    """Tissue fraction per s x s block from the stored mask, else an Otsu mask of the H&E, else None."""
    mask = truth.tissue_mask(tissue_id, mpp)
    source = "tissue_mask"
    if mask is None:
        with contextlib.suppress(StoreError):
            he = truth.image("he", tissue_id, mpp)
            mask = otsu_tissue_mask(he.read_all(), "he")
            source = "otsu_he"
            log.info("%s: no stored tissue mask at %g µm/px; using an Otsu mask of its H&E", tissue_id, mpp)
    if mask is None:
        log.warning("%s: no tissue mask and no H&E at %g µm/px: every block is evaluated, background from other tissues only",
                    tissue_id, mpp)
        return None, "none"
    if mask.shape != tuple(shape):
        raise EvaluationError(f"{truth.url}: tissue mask of {tissue_id!r} at {mpp:g} µm/px has shape {mask.shape}, "
                              f"the measured CODEX {tuple(shape)}; rewrite the mask at the image's resolution")
    return tissue_fraction_grid(mask, s), source


def _present(truth: DatasetStore, tissue_id: str, measured: Sequence[str]) -> np.ndarray:
    per = truth.channels_per_tissue(MODALITY)
    present = np.ones(len(measured), dtype=bool)
    if per is not None:
        if "tissue_id" in per.columns:
            per = per.set_index("tissue_id")
        if tissue_id in per.index:
            for k, m in enumerate(measured):
                if m in per.columns:
                    present[k] = bool(per.loc[tissue_id, m])
    return present


def _pred_resolution(pred: DatasetStore, tissue_id: str, pred_mpp: float | None) -> float:
    if pred_mpp is not None:
        return float(pred_mpp)
    have = [r for r in pred.resolutions(MODALITY) if tissue_id in pred.image_ids(MODALITY, r)]
    if not have:
        raise EvaluationError(f"{pred.url}: no {MODALITY} image for tissue {tissue_id!r}")
    if len(have) > 1:
        log.info("%s: prediction at %s µm/px; evaluating the coarsest (%g, the stride grid)", tissue_id, have, max(have))
    return max(have)


def _truth_resolution(truth: DatasetStore, pred_mpp: float) -> float:
    """The measured CODEX resolution to compare with: the H&E's when CODEX has it, else the finest that divides."""
    res = truth.resolutions(MODALITY)
    if not res:
        raise EvaluationError(f"{truth.url}: no measured {MODALITY} images")
    he_res = truth.resolutions("he") if "he" in truth.modalities() else []
    order = [r for r in he_res if r in res] + sorted(res)
    for r in order:
        with contextlib.suppress(EvaluationError):
            detect_stride(pred_mpp, r)
            return r
    raise EvaluationError(f"{truth.url}: prediction at {pred_mpp:g} µm/px is not a whole multiple of any measured "
                          f"{MODALITY} resolution {res}")


# ============================================================================================
# Dataset mode: loading one tissue
# ============================================================================================


def load_tissue(pred: DatasetStore, truth: DatasetStore, tissue_id: str, match: pd.DataFrame,
                split: str | None = None, pred_mpp: float | None = None, keep_grids: bool = False,
                verbose: bool = True) -> TissuePatches:
    """Read one tissue's prediction and measurement and cut them into the prediction's patches."""
    pmpp = _pred_resolution(pred, tissue_id, pred_mpp)
    tmpp = _truth_resolution(truth, pmpp)
    s = detect_stride(pmpp, tmpp, f"{pred.url} tissue {tissue_id!r}")
    m = match[match["status"] == "matched"]
    pimg = pred.image(MODALITY, tissue_id, pmpp)
    timg = truth.image(MODALITY, tissue_id, tmpp)
    pidx = _channel_index(pimg.channel_names, m["predicted_channel"].tolist(), pimg.path)
    tidx = _channel_index(timg.channel_names, m["measured_channel"].tolist(), timg.path)
    _, H, W = timg.shape
    tb = block_means(timg, s)[tidx]
    pv = pimg.read_all()[pidx].astype(np.float32)
    hb, wb = min(pv.shape[1], tb.shape[1]), min(pv.shape[2], tb.shape[2])
    expected = (math.ceil(H / s), math.ceil(W / s))
    if pv.shape[1:] != expected:
        log.warning("%s: prediction grid %s differs from the %s expected for a %dx%d image at stride %d; "
                    "comparing the common top-left %dx%d blocks", tissue_id, pv.shape[1:], expected, H, W, s, hb, wb)
    if hb == 0 or wb == 0:
        raise EvaluationError(f"{tissue_id}: no common block between prediction {pv.shape[1:]} and truth {tb.shape[1:]}")
    tb, pv = tb[:, :hb, :wb], pv[:, :hb, :wb]

    frac, bg_source = _truth_tissue_fraction(truth, tissue_id, tmpp, (H, W), s)
    frac = np.ones((hb, wb), np.float32) if frac is None else frac[:hb, :wb]
    fg = pred.tissue_mask(tissue_id, pmpp)
    if fg is None:
        fg = np.ones((hb, wb), bool)
    else:
        if fg.shape[0] < hb or fg.shape[1] < wb:
            raise EvaluationError(f"{pred.url}: foreground mask of {tissue_id!r} {fg.shape} is smaller than its image grid")
        fg = fg[:hb, :wb]
    evaluated = (frac >= IN_TISSUE_FRACTION) & fg
    background = frac <= 0.0 if bg_source != "none" else np.zeros_like(evaluated)
    keep = evaluated | background
    index = np.argwhere(keep)
    rows, cols = index[:, 0], index[:, 1]
    tp = TissuePatches(
        tissue_id=tissue_id, split=split, stride=s, pred_mpp=pmpp, truth_mpp=tmpp, grid_shape=(hb, wb), index=index,
        in_tissue=evaluated[rows, cols], truth=tb[:, rows, cols].T.copy(), pred=pv[:, rows, cols].T.copy(),
        present=_present(truth, tissue_id, m["measured_channel"].tolist()), background_source=bg_source,
    )
    if keep_grids:
        tp.extras["truth_grid"], tp.extras["pred_grid"] = tb, pv
    (log.info if verbose else log.debug)("%s: stride %d (prediction %g µm/px, truth %g µm/px), grid %dx%d, %d evaluated + %d background blocks",
             tissue_id, s, pmpp, tmpp, hb, wb, int(tp.in_tissue.sum()), int((~tp.in_tissue).sum()))
    return tp


# ============================================================================================
# Inputs of the baselines
# ============================================================================================


def read_he(truth: DatasetStore, tissue_id: str, mpp: float) -> np.ndarray:
    """(3, H, W) uint8 truth H&E of ``tissue_id`` at ``mpp`` (raises ``StoreError`` when absent)."""
    return truth.image("he", tissue_id, mpp).read_all()


def read_morphometry_inputs(truth: DatasetStore, tissue_id: str, mpp: float,
                            cells: str = "stored") -> tuple[np.ndarray, np.ndarray] | None:
    """(cell mask (H, W), H&E (3, H, W)) at ``mpp``, the inputs of the morphometry features; None without a
    cell mask. ``cells``: the stored masks, or segment the measured ``dapi`` (the paper) / the ``he``."""
    mask = cell_mask_for(truth, tissue_id, mpp, cells)
    if mask is None:
        return None
    he = read_he(truth, tissue_id, mpp)
    if mask.shape != he.shape[1:]:
        raise EvaluationError(f"{truth.url}: cell mask of {tissue_id!r} {mask.shape} is not at the H&E resolution {he.shape[1:]}")
    return mask, he


def _morph_features(truth: DatasetStore, tissue_id: str, mpp: float, origins: np.ndarray, s: int,
                    cells: str = "stored") -> np.ndarray | None:
    inputs = read_morphometry_inputs(truth, tissue_id, mpp, cells)
    if inputs is None:
        return None
    mask, he = inputs
    return patch_morphology_features(mask, he, origins, s)


def _training_patches(truth: DatasetStore, tissue_id: str, match: pd.DataFrame, mpp: float, s: int,
                      max_patches: int, rng: np.random.Generator,
                      cells: str = "stored") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Features, targets and presence of a (train/val) tissue's in-tissue blocks; None without a cell mask."""
    m = match[match["status"] == "matched"]
    if cells == "stored" and truth.cell_mask(tissue_id, mpp) is None:
        log.warning("cell_morphology: %s has no cell mask at %g µm/px; not used for training", tissue_id, mpp)
        return None
    timg = truth.image(MODALITY, tissue_id, mpp)
    tidx = _channel_index(timg.channel_names, m["measured_channel"].tolist(), timg.path)
    tb = block_means(timg, s)[tidx]
    frac, _ = _truth_tissue_fraction(truth, tissue_id, mpp, timg.shape[1:], s)
    sel = np.ones(tb.shape[1:], bool) if frac is None else frac >= IN_TISSUE_FRACTION
    index = np.argwhere(sel)
    if len(index) > max_patches:
        index = index[np.sort(rng.choice(len(index), max_patches, replace=False))]
    x = _morph_features(truth, tissue_id, mpp, index * s, s, cells)
    y = tb[:, index[:, 0], index[:, 1]].T
    present = np.broadcast_to(_present(truth, tissue_id, m["measured_channel"].tolist()), y.shape)
    return x, y, present


def cell_morphology_inputs(truth: DatasetStore, tissues: Sequence[TissuePatches], match: pd.DataFrame,
                           evaluated_ids: Sequence[str], max_train_patches: int = 200_000,
                           seed: int = 0, cells: str = "stored") -> tuple[MorphologyData | None, str]:
    """Read the morphology baseline's training data (the truth dataset's train/val tissues) and the
    features of the evaluated tissues' blocks, for :func:`analysis.rosie_baselines.cell_morphology_predictions`.

    Returns (data, "") or (None, reason) when the baseline cannot run on this dataset.
    """
    if not tissues:
        return None, "no evaluated tissue"
    mpp, s = tissues[0].truth_mpp, tissues[0].stride
    if any(t.stride != s or t.truth_mpp != mpp for t in tissues):
        return None, "evaluated tissues were predicted at different strides; the MLP's patch size must be one"
    missing = [t.tissue_id for t in tissues if cells == "stored" and truth.cell_mask(t.tissue_id, mpp) is None]
    if missing:
        return None, (f"no cell mask at {mpp:g} µm/px (segmentations/{mpp:g} µm/px/cell_masks) for evaluated tissue(s) "
                      f"{missing}; segment the H&E/DAPI first")
    if "he" not in truth.modalities():
        return None, "the truth dataset has no H&E (mean RGB features)"
    table = truth.tissues()
    if "split" not in table.columns:
        return None, "the truth dataset's tissues table has no 'split' column to pick training tissues"
    train_ids = [str(t) for t in table.loc[table["split"] == "train", "tissue_id"]]
    val_ids = [str(t) for t in table.loc[table["split"] == "val", "tissue_id"]]
    leak = sorted(set(train_ids) & set(evaluated_ids))
    if leak:
        log.warning("cell_morphology: evaluated tissues %s are also its training tissues (split 'train')", leak)
    rng = np.random.default_rng(seed)

    def gather(ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        parts = []
        per = max(1, max_train_patches // max(1, len(ids)))
        for tid in ids:
            with contextlib.suppress(StoreError):
                got = _training_patches(truth, tid, match, mpp, s, per, rng, cells)
                if got is not None and len(got[0]):
                    parts.append(got)
        if not parts:
            return None
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    train = gather(train_ids)
    if train is None:
        return None, "no 'train' tissue of the truth dataset has measured CODEX, H&E and a cell mask at the evaluated resolution"
    val = gather(val_ids) if val_ids else None
    features = {t.tissue_id: _morph_features(truth, t.tissue_id, mpp, t.origins, s, cells) for t in tissues}
    return MorphologyData(train=train, val=val, features=features, n_train_tissues=len(train_ids)), ""


# ============================================================================================
# Images for the figures
# ============================================================================================


def percentile_loader(pred: DatasetStore, truth: DatasetStore, tissues: dict[str, TissuePatches], match: pd.DataFrame,
                      pred_mpp: float | None) -> SampleLoader:
    """``load(tissue_id) -> (H&E, truth grid, prediction grid)`` downsampled for display, read on demand
    (the predicted-vs-measured figure needs only a few tissues; a blank H&E when it is not readable)."""

    def load(tid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = tissues[tid]
        full = load_tissue(pred, truth, tid, match, t.split, pred_mpp, keep_grids=True, verbose=False)
        tg, pg = full.extras["truth_grid"], full.extras["pred_grid"]
        f = display_factor(tg.shape[1:])
        try:
            he = truth.image("he", tid, t.truth_mpp)
            fh = display_factor(he.shape[1:])
            he_img = he.read_all()[:, ::fh, ::fh]
        except StoreError:
            he_img = np.full((3, 8, 8), 255, np.uint8)
        return he_img, tg[:, ::f, ::f], pg[:, ::f, ::f]

    return load


def read_gradcam_patches(truth: DatasetStore, tissues: Sequence[TissuePatches], n: int, seed: int) -> np.ndarray:
    """(n, 3, 128, 128) uint8: the truth H&E around ``n`` random evaluated (foreground) blocks, centred
    like the model's input, for :func:`analysis.gradcam.gradcam_figure` (white beyond the image)."""
    rng = np.random.default_rng(seed)
    cand = [(t, i) for t in tissues for i in np.flatnonzero(t.in_tissue)]
    if not cand:
        return np.zeros((0, 3, MODEL_PATCH, MODEL_PATCH), np.uint8)
    pick = rng.choice(len(cand), min(n, len(cand)), replace=False)
    out = []
    half = MODEL_PATCH // 2
    for k in pick:
        t, i = cand[k]
        he = truth.image("he", t.tissue_id, t.truth_mpp)
        y, x = t.origins[i] + t.stride // 2
        out.append(read_padded(he, int(y) - half, int(x) - half, MODEL_PATCH, MODEL_PATCH, fill=255))
    return np.stack(out)


# ============================================================================================
# Patch-level mode (HEX-style folders)
# ============================================================================================


def is_patch_level_truth(path: str | Path) -> bool:
    p = Path(path)
    return (p / "markers.csv").is_file() and (p / "channel_registered").is_dir() and (p / "he_patches").is_dir()


def load_patch_level_truth(root: str | Path) -> PatchLevelTruth:
    """Read ``markers.csv`` (channel_index, marker) and ``channel_registered/<slide>.csv`` (slide,
    index, x, y, mean_intensity_channel<k>...); patch ``i`` of a slide is ``he_patches/<slide>/<slide>_<i>.png``."""
    root = Path(root)
    mpath = root / "markers.csv"
    mk = pd.read_csv(mpath)
    if not {"channel_index", "marker"} <= set(mk.columns):
        raise EvaluationError(f"{mpath}: needs columns channel_index, marker (got {list(mk.columns)})")
    cols = [f"mean_intensity_channel{int(i)}" for i in mk["channel_index"]]
    slides: dict[str, tuple[list[Path], np.ndarray]] = {}
    for csv in sorted((root / "channel_registered").glob("*.csv")):
        df = pd.read_csv(csv)
        miss = [c for c in ["index", *cols] if c not in df.columns]
        if miss:
            raise EvaluationError(f"{csv}: columns {miss[:5]} are missing (markers.csv lists {len(cols)} channels)")
        slide = csv.stem
        paths = [root / "he_patches" / slide / f"{slide}_{int(i)}.png" for i in df["index"]]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise EvaluationError(f"{csv}: H&E patches {absent[:3]} listed by its 'index' column do not exist")
        slides[slide] = (paths, df[cols].to_numpy(dtype=np.float64))
    if not slides:
        raise EvaluationError(f"{root}/channel_registered: no <slide>.csv")
    return PatchLevelTruth([str(m) for m in mk["marker"]], slides)


def read_rgb_png(path: Path) -> np.ndarray:
    """(3, H, W) uint8 RGB (alpha dropped, grey expanded)."""
    a = np.asarray(imread(path))
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise EvaluationError(f"{path}: expected an RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise EvaluationError(f"{path}: expected 8-bit RGB, got {a.dtype}")
    return np.ascontiguousarray(np.moveaxis(a[..., :3], -1, 0))
