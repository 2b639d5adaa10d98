"""Evaluate predicted multiplex images against measured CODEX with the ROSIE paper's metrics.

Two kinds of ground truth:

* **Dataset mode** (:func:`evaluate`): ``pred_dir`` is a dataset folder written by
  ``experiments.rosie_predict`` (modality ``codex``, one image per tissue id at ``H&E mpp x stride``,
  channel names = marker names) and ``truth_dir`` a dataset with measured ``codex`` (and ``he``,
  tissue masks, cell masks for the baselines).
* **Patch-level mode** (:func:`evaluate_patch_level`): ``truth_dir`` holds H&E patches with the
  mean CODEX intensity of each patch (the HEX sample-data layout: ``he_patches/<slide>/<slide>_<i>.png``,
  ``channel_registered/<slide>.csv``, ``markers.csv``); the model is run on each patch here.

Interpretation of the paper's Methods ("Expression metrics", "Baseline methods") — every choice is
also written into ``evaluation.json``:

* **Patches** are the prediction's pixels. A prediction at stride ``s`` (``s = pred mpp / truth
  mpp``, detected per tissue, any integer >= 1) has one pixel per ``s x s`` block of the H&E; its
  ground truth is the mean of the measured CODEX over that block
  (:func:`datamodules.sampling.block_means`). Both grids are cropped to their common extent (the
  prediction has ``ceil(H/s)`` rows, the block means ``floor(H/s)``).
* **Evaluated patches** are blocks that are at least half tissue (truth tissue mask, the same rule
  as the training examples) and that the prediction ran on (its stored foreground mask, when it
  wrote one: background blocks of a prediction are 0, not predictions).
* **Background noise** for the exclusion rule ("we exclude patches with a lower groundtruth
  expression value than the 90th percentile value of background noise for each biomarker"): the
  block means of blocks entirely outside the truth tissue mask of the same tissue, per marker
  (pooled over tissues when a tissue has fewer than 10 such blocks). Without a stored tissue mask,
  an Otsu mask of the truth H&E is used; without either, nothing is excluded (logged).
* **Metrics** come from :mod:`analysis.rosie_metrics` (``evaluate_samples``): Pearson and Spearman
  R per tissue and marker across the kept patches, averaged over tissues (per marker) and markers
  (summary); C-index per marker across tissues on each tissue's 75th percentile (lifelines).
* **Baselines** are scored on exactly the same patches (same truth, same exclusion):
  *H&E expression* = mean RGB intensity (> 50) over the block; *cell morphology* = 19 morphometry
  features + mean RGB of the cells covering the block, MLP (3 x 100, ReLU, Adam 1e-4, MSE, 50
  epochs, best validation epoch) trained on the truth dataset's ``train`` tissues (validated on its
  ``val`` tissues), see :mod:`analysis.rosie_baselines`. Targets are z-scored per marker with
  training statistics for the MLP (MSE would otherwise be dominated by bright markers) and mapped
  back; correlations and C-index are invariant to that per-marker affine map.
* **Markers** are matched by name through the alias table (:mod:`datamodules.markers`); markers
  on only one side are listed in ``markers.csv`` and the log, never dropped silently.

Layering: plain numpy/pandas/torch plus the dataset store (``datamodules.store``/``sampling``/
``markers``, none of which imports Lightning). A model enters only as a callable
(``predict_fn``) or an ``nn.Module`` with its input ``prepare`` function, given by the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.rosie_metrics import METRIC_COLUMNS, SamplePatches, evaluate_samples
from datamodules.markers import canonical_marker, match_markers
from datamodules.sampling import block_means, read_padded, tissue_fraction_grid
from datamodules.store import DatasetStore, StoreError
from analysis.outputs import atomic_output_dir

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("rosie", "he_expression", "cell_morphology")
PER_MARKER_COLUMNS = ["method", "marker", "pearson_r", "spearman_r", "c_index", "n_patches"]
PER_SAMPLE_COLUMNS = ["method", "tissue_id", "pearson_r", "spearman_r", "n_patches"]
SUMMARY_COLUMNS = list(METRIC_COLUMNS)  # method, pearson_r, spearman_r, c_index, n_patches
MODALITY = "codex"
#: A block is evaluated when at least this fraction of it is tissue (as for ROSIE's training blocks).
IN_TISSUE_FRACTION = 0.5
MODEL_PATCH = 128

PredictFn = Callable[[Any], Any]  # uint8 torch (B,3,P,P) -> (B,M) tensor/array


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the file or argument and the fix."""


# ============================================================================================
# Markers, strides
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


def _log_unmatched(table: pd.DataFrame, what_pred: str, what_truth: str) -> None:
    n = int((table["status"] == "matched").sum())
    log.info("markers: %d matched between %s and %s", n, what_pred, what_truth)
    nm = table.loc[table["status"] == "not_measured", "predicted_channel"].tolist()
    npred = table.loc[table["status"] == "not_predicted", "measured_channel"].tolist()
    if nm:
        log.warning("%d predicted markers have no measured channel in %s (not evaluated): %s", len(nm), what_truth, ", ".join(nm))
    if npred:
        log.warning("%d measured markers are not predicted by %s (not evaluated): %s", len(npred), what_pred, ", ".join(npred))


def detect_stride(pred_mpp: float, truth_mpp: float, name: str = "prediction") -> int:
    """``s = pred_mpp / truth_mpp``, which must be a whole number >= 1 (within 1 %)."""
    ratio = float(pred_mpp) / float(truth_mpp)
    s = int(round(ratio))
    if s < 1 or abs(ratio - s) > 0.01 * s:
        raise EvaluationError(f"{name}: {pred_mpp:g} µm/px is not a whole multiple of the measured CODEX's {truth_mpp:g} µm/px "
                              f"(ratio {ratio:.4g}); predict from the H&E of the truth dataset (same resolution)")
    return s


# ============================================================================================
# Atomic output, logging
# ============================================================================================



@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copy the ``analysis`` loggers (this module, metrics, baselines) into ``path``."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("analysis")
    old_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


# ============================================================================================
# Dataset mode: loading one tissue
# ============================================================================================


@dataclass
class TissuePatches:
    """A tissue's patches in the prediction's grid; row ``i`` of every array is block ``index[i]``.

    Kept rows are the evaluated blocks (``in_tissue``) and the background blocks (entirely outside
    the tissue) whose truth gives the noise threshold; other blocks are dropped.
    """

    tissue_id: str
    split: str | None
    stride: int
    pred_mpp: float
    truth_mpp: float
    grid_shape: tuple[int, int]
    index: np.ndarray  # (N, 2) block (row, col)
    in_tissue: np.ndarray  # (N,) bool
    truth: np.ndarray  # (N, M) float32
    pred: np.ndarray  # (N, M) float32
    present: np.ndarray  # (M,) bool
    background_source: str = "tissue_mask"
    extras: dict = field(default_factory=dict)

    @property
    def origins(self) -> np.ndarray:
        """(N, 2) top-left pixel of each block at the truth resolution."""
        return self.index * self.stride

    def sample(self, pred: np.ndarray | None = None) -> SamplePatches:
        return SamplePatches(self.tissue_id, self.truth, self.pred if pred is None else pred, self.in_tissue, self.present)


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
            from datamodules.preprocess import otsu_tissue_mask

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
# Baselines on the same patches
# ============================================================================================


def he_expression_predictions(truth: DatasetStore, tp: TissuePatches) -> np.ndarray:
    """(N, M) H&E expression baseline on ``tp``'s blocks (truth H&E at the truth resolution)."""
    from analysis.rosie_baselines import he_expression_baseline

    he = truth.image("he", tp.tissue_id, tp.truth_mpp).read_all()
    return he_expression_baseline(he, tp.origins, tp.truth.shape[1], patch=tp.stride).astype(np.float32)


def _morph_features(truth: DatasetStore, tissue_id: str, mpp: float, origins: np.ndarray, s: int) -> np.ndarray | None:
    from analysis.rosie_baselines import patch_morphology_features

    mask = truth.cell_mask(tissue_id, mpp)
    if mask is None:
        return None
    he = truth.image("he", tissue_id, mpp).read_all()
    if mask.shape != he.shape[1:]:
        raise EvaluationError(f"{truth.url}: cell mask of {tissue_id!r} {mask.shape} is not at the H&E resolution {he.shape[1:]}")
    return patch_morphology_features(mask, he, origins, s)


def _training_patches(truth: DatasetStore, tissue_id: str, match: pd.DataFrame, mpp: float, s: int,
                      max_patches: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Features, targets and presence of a (train/val) tissue's in-tissue blocks; None without a cell mask."""
    m = match[match["status"] == "matched"]
    if truth.cell_mask(tissue_id, mpp) is None:
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
    x = _morph_features(truth, tissue_id, mpp, index * s, s)
    y = tb[:, index[:, 0], index[:, 1]].T
    present = np.broadcast_to(_present(truth, tissue_id, m["measured_channel"].tolist()), y.shape)
    return x, y, present


def cell_morphology_predictions(truth: DatasetStore, tissues: Sequence[TissuePatches], match: pd.DataFrame,
                                evaluated_ids: Sequence[str], epochs: int = 50, max_train_patches: int = 200_000,
                                seed: int = 0) -> tuple[dict[str, np.ndarray] | None, str]:
    """Train the morphology MLP on the truth dataset's train tissues; predict the evaluated tissues.

    Returns ({tissue_id: (N, M) predictions}, "") or (None, reason) when it cannot run.
    """
    from analysis.rosie_baselines import MorphologyBaseline

    if not tissues:
        return None, "no evaluated tissue"
    mpp, s = tissues[0].truth_mpp, tissues[0].stride
    if any(t.stride != s or t.truth_mpp != mpp for t in tissues):
        return None, "evaluated tissues were predicted at different strides; the MLP's patch size must be one"
    missing = [t.tissue_id for t in tissues if truth.cell_mask(t.tissue_id, mpp) is None]
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
                got = _training_patches(truth, tid, match, mpp, s, per, rng)
                if got is not None and len(got[0]):
                    parts.append(got)
        if not parts:
            return None
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    train = gather(train_ids)
    if train is None:
        return None, "no 'train' tissue of the truth dataset has measured CODEX, H&E and a cell mask at the evaluated resolution"
    val = gather(val_ids) if val_ids else None
    x, y, p = train
    y = np.where(p, y, np.nan).astype(np.float64)
    mu = np.nanmean(y, 0)
    sd = np.nanstd(y, 0)
    mu, sd = np.nan_to_num(mu), np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    model = MorphologyBaseline(num_markers=y.shape[1], epochs=epochs, seed=seed)
    kwargs = {}
    if val is not None:
        kwargs = {"x_val": val[0], "y_val": (np.where(val[2], val[1], np.nan) - mu) / sd, "present_val": val[2]}
    log.info("cell_morphology: training on %d patches of %d train tissues (%s validation patches), %d epochs",
             len(x), len(train_ids), len(val[0]) if val is not None else "no val tissue: train", epochs)
    model.fit(x, (y - mu) / sd, p, **kwargs)
    out = {}
    for t in tissues:
        feats = _morph_features(truth, t.tissue_id, mpp, t.origins, s)
        out[t.tissue_id] = (model.predict(feats) * sd + mu).astype(np.float32)
    return out, ""


# ============================================================================================
# Tables
# ============================================================================================


def _tables(samples: Sequence[SamplePatches], markers: Sequence[str], method: str, background: Any) -> dict[str, pd.DataFrame]:
    res = evaluate_samples(samples, markers, method=method, background=background)
    per_marker = res.per_marker[PER_MARKER_COLUMNS].copy()
    per_sample = res.per_sample.rename(columns={"sample_id": "tissue_id"})[PER_SAMPLE_COLUMNS].copy()
    psm = res.per_sample_marker.rename(columns={"sample_id": "tissue_id"})[
        ["method", "tissue_id", "marker", "pearson_r", "spearman_r", "n_patches"]].copy()
    summary = res.summary[SUMMARY_COLUMNS].copy()
    return {"per_marker": per_marker, "per_sample": per_sample, "per_sample_marker": psm, "summary": summary}


def _concat(parts: list[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    keys = ["per_marker", "per_sample", "per_sample_marker", "summary"]
    cols = {"per_marker": PER_MARKER_COLUMNS, "per_sample": PER_SAMPLE_COLUMNS, "summary": SUMMARY_COLUMNS,
            "per_sample_marker": ["method", "tissue_id", "marker", "pearson_r", "spearman_r", "n_patches"]}
    return {k: (pd.concat([p[k] for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=cols[k])) for k in keys}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EvaluationError(f"unknown method(s) {bad or methods}; choose from {list(METHODS)}")
    return methods


# ============================================================================================
# Figures
# ============================================================================================


def plot_per_marker_methods(per_marker: pd.DataFrame, path: Path, order_by: str = "rosie") -> Path:
    """Grouped bars: Pearson R per marker (sorted by ``order_by``'s R), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = per_marker.pivot_table(index="marker", columns="method", values="pearson_r", aggfunc="first", dropna=False)
    methods = [m for m in METHODS if m in wide.columns] + [m for m in wide.columns if m not in METHODS]
    key = order_by if order_by in wide.columns else methods[0]
    wide = wide.loc[wide[key].sort_values(ascending=False, na_position="last").index, methods]
    n, k = len(wide), len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * n * max(1, k) / 2 + 2), 3.4))
    width = 0.8 / k
    x = np.arange(n)
    for i, m in enumerate(methods):
        vals = wide[m].to_numpy(dtype=float)
        ax.bar(x + (i - (k - 1) / 2) * width, np.nan_to_num(vals), width, label=f"{m} (mean {np.nanmean(vals):.3f})"
               if np.isfinite(vals).any() else m)
    ax.set_xticks(x)
    ax.set_xticklabels(wide.index, rotation=90, fontsize=7)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("Pearson R (mean over samples)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Pearson R per marker")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _display_factor(shape: Sequence[int], max_px: int = 768) -> int:
    return max(1, math.ceil(max(shape) / max_px))


def _percentile_figure(truth: DatasetStore, pred: DatasetStore, tissues: dict[str, TissuePatches], match: pd.DataFrame,
                       per_sample: pd.DataFrame, pred_mpp: float | None, path: Path) -> Path | None:
    from analysis.rosie_figures import plot_percentile_samples

    rows = per_sample[per_sample["method"] == "rosie"]
    if rows.empty or not rows["pearson_r"].notna().any():
        log.info("predicted-vs-measured figure skipped: no ROSIE per-sample Pearson R")
        return None
    names = match.loc[match["status"] == "matched", "marker"].tolist()

    def load(tid: str):
        t = tissues[tid]
        full = load_tissue(pred, truth, tid, match, t.split, pred_mpp, keep_grids=True, verbose=False)
        tg, pg = full.extras["truth_grid"], full.extras["pred_grid"]
        f = _display_factor(tg.shape[1:])
        try:
            he = truth.image("he", tid, t.truth_mpp)
            fh = _display_factor(he.shape[1:])
            he_img = he.read_all()[:, ::fh, ::fh]
        except StoreError:
            he_img = np.full((3, 8, 8), 255, np.uint8)
        return he_img, tg[:, ::f, ::f], pg[:, ::f, ::f]

    return plot_percentile_samples(rows.rename(columns={"tissue_id": "sample_id"}), load, names, path)


def gradcam_figure(model: Any, prepare: Callable[[Any], Any], model_markers: Sequence[str], markers: Sequence[str],
                   patches_uint8: np.ndarray, path: Path) -> Path | None:
    """Grad-CAM of ``model`` (input = ``prepare(uint8 patches)``) for the requested markers (aliases ok)."""
    import torch

    from analysis.gradcam import gradcam, plot_gradcam

    mapping = match_markers(list(markers), list(model_markers))
    missing = [m for m in markers if m not in mapping]
    if missing:
        log.warning("Grad-CAM: markers %s are not among the model's outputs; skipped", missing)
    if not mapping or len(patches_uint8) == 0:
        log.warning("Grad-CAM figure skipped: %s", "no requested marker is predicted by the model" if not mapping else "no patch")
        return None
    names = list(mapping)
    idx = [list(model_markers).index(mapping[m]) for m in names]
    x = prepare(torch.from_numpy(np.ascontiguousarray(patches_uint8)))
    heat = gradcam(model, x, idx)
    return plot_gradcam(patches_uint8, heat, names, path)


def _gradcam_patches(truth: DatasetStore, tissues: Sequence[TissuePatches], n: int, seed: int) -> np.ndarray:
    """``n`` random evaluated (foreground) blocks' 128 px H&E patches, centred like the model's input."""
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
# Dataset mode: the evaluation
# ============================================================================================


def evaluate(
    pred_dir: str | Path,
    truth_dir: str | Path,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    split: str | None = None,
    overwrite: bool = False,
    pred_mpp: float | None = None,
    morphology_epochs: int = 50,
    max_train_patches: int = 200_000,
    figures: bool = True,
    gradcam_model: Any = None,
    gradcam_prepare: Callable[[Any], Any] | None = None,
    gradcam_model_markers: Sequence[str] | None = None,
    gradcam_markers: Sequence[str] = ("CD45", "PanCK"),
    gradcam_patches: int = 4,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Score the predicted tissues of ``pred_dir`` against ``truth_dir``; write tables and figures to ``out_dir``.

    ``split``: evaluate only predicted tissues of this split of the truth dataset (None = every
    predicted tissue that has a measurement). Returns the tables (``summary``, ``per_marker``,
    ``per_sample``, ``per_sample_marker``, ``markers``, ``tissues``, ``skipped``), also written as
    CSV, with ``evaluation.json``, ``evaluate.log`` and the figures (``*.png``).
    """
    methods = _check_methods(methods)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as tmp, _log_to(tmp / "evaluate.log"):
        pred, truth = DatasetStore(str(pred_dir)), DatasetStore(str(truth_dir))
        for store, what in ((pred, "--pred"), (truth, "--truth")):
            if MODALITY not in store.modalities():
                raise EvaluationError(f"{what} {store.url}: no '{MODALITY}' modality (has {store.modalities()})")
        match = match_panel(pred.channels(MODALITY)["channel_name"].tolist(), truth.channels(MODALITY)["channel_name"].tolist())
        _log_unmatched(match, f"the prediction {pred.url}", f"the truth {truth.url}")
        matched = match[match["status"] == "matched"]
        if matched.empty:
            raise EvaluationError(f"no predicted marker of {pred.url} matches a measured {MODALITY} channel of {truth.url}; "
                                  "check the channel names (alias table: datamodules/markers.py)")
        markers = matched["marker"].tolist()

        table = truth.tissues()
        splits = dict(zip(table["tissue_id"].astype(str), table["split"].astype(str))) if "split" in table.columns else {}
        pred_ids = sorted({t for r in pred.resolutions(MODALITY) for t in pred.image_ids(MODALITY, r)})
        truth_ids = {t for r in truth.resolutions(MODALITY) for t in truth.image_ids(MODALITY, r)}
        no_truth = [t for t in pred_ids if t not in truth_ids]
        if no_truth:
            log.warning("%d predicted tissues have no measured %s in %s (not evaluated): %s", len(no_truth), MODALITY, truth.url, no_truth)
        ids = [t for t in pred_ids if t in truth_ids]
        if split is not None:
            if not splits:
                raise EvaluationError(f"{truth.url}: --split {split} given but metadata/tissues.parquet has no 'split' column")
            other = [t for t in ids if splits.get(t) != split]
            if other:
                log.info("%d predicted tissues are not in split %r and are not evaluated: %s", len(other), split, other)
            ids = [t for t in ids if splits.get(t) == split]
        if not ids:
            raise EvaluationError(f"no predicted tissue of {pred.url} (ids {pred_ids[:6]}...) has a measurement in {truth.url}"
                                  + (f" in split {split!r}" if split else ""))
        in_train = [t for t in ids if splits.get(t) == "train"]
        if in_train:
            log.warning("evaluating tissues of the truth dataset's train split: %s", in_train)

        tissues = {tid: load_tissue(pred, truth, tid, match, splits.get(tid), pred_mpp) for tid in ids}
        tlist = list(tissues.values())

        parts, skipped = [], []
        if "rosie" in methods:
            parts.append(_tables([t.sample() for t in tlist], markers, "rosie", "tissue_mask"))
        if "he_expression" in methods:
            if "he" not in truth.modalities():
                skipped.append(("he_expression", f"{truth.url} has no H&E modality"))
            else:
                try:
                    preds = [t.sample(he_expression_predictions(truth, t)) for t in tlist]
                    parts.append(_tables(preds, markers, "he_expression", "tissue_mask"))
                except StoreError as exc:
                    skipped.append(("he_expression", f"H&E not readable at the truth resolution: {exc}"))
        if "cell_morphology" in methods:
            got, reason = cell_morphology_predictions(truth, tlist, match, ids, morphology_epochs, max_train_patches, seed)
            if got is None:
                skipped.append(("cell_morphology", reason))
            else:
                parts.append(_tables([t.sample(got[t.tissue_id]) for t in tlist], markers, "cell_morphology", "tissue_mask"))
        for method, reason in skipped:
            log.warning("method %s skipped: %s", method, reason)
        result = _concat(parts)
        result["markers"] = match
        result["tissues"] = pd.DataFrame([{
            "tissue_id": t.tissue_id, "split": t.split, "stride": t.stride, "pred_mpp": t.pred_mpp, "truth_mpp": t.truth_mpp,
            "grid_rows": t.grid_shape[0], "grid_cols": t.grid_shape[1], "n_evaluated_blocks": int(t.in_tissue.sum()),
            "n_background_blocks": int((~t.in_tissue).sum()), "background_source": t.background_source,
            "n_markers_present": int(t.present.sum())} for t in tlist])
        result["skipped"] = pd.DataFrame(skipped, columns=["method", "reason"])

        figs = []
        if figures and not result["per_marker"].empty:
            figs.append(plot_per_marker_methods(result["per_marker"], tmp / "per_marker_pearson.png"))
            rosie_pm = result["per_marker"][result["per_marker"]["method"] == "rosie"]
            if rosie_pm["pearson_r"].notna().any():
                from analysis.rosie_figures import plot_per_marker_pearson

                figs.append(plot_per_marker_pearson(rosie_pm, tmp / "per_marker_pearson_rosie.png",
                                                    title="ROSIE Pearson R per marker"))
            if "he" in truth.modalities():
                f = _percentile_figure(truth, pred, tissues, match, result["per_sample"], pred_mpp,
                                       tmp / "predicted_vs_measured.png")
                figs += [f] if f else []
        if gradcam_model is not None:
            patches = _gradcam_patches(truth, tlist, gradcam_patches, seed)
            f = gradcam_figure(gradcam_model, gradcam_prepare or (lambda x: x.float() / 255.0),
                               gradcam_model_markers or markers, gradcam_markers, patches, tmp / "gradcam.png")
            figs += [f] if f else []

        _write_outputs(tmp, result)
        _write_json({
            "mode": "dataset", "pred": str(pred_dir), "truth": str(truth_dir), "split": split, "methods": methods,
            "skipped_methods": dict(skipped), "tissues": ids, "tissues_without_truth": no_truth,
            "strides": sorted({t.stride for t in tlist}),
            "markers_matched": markers,
            "markers_not_measured": match.loc[match["status"] == "not_measured", "predicted_channel"].tolist(),
            "markers_not_predicted": match.loc[match["status"] == "not_predicted", "measured_channel"].tolist(),
            "figures": [str(Path(f).relative_to(tmp)) for f in figs],
            "policy": {
                "patches": "prediction pixels; truth = mean measured CODEX over the stride x stride block",
                "evaluated": f"blocks with tissue fraction >= {IN_TISSUE_FRACTION} (truth tissue mask) that the prediction ran on",
                "background": "blocks entirely outside the truth tissue mask (per tissue; pooled if < 10); exclude truth < p90",
                "c_index": "lifelines concordance_index across tissues on each tissue's 75th percentile (kept patches)",
            },
            "seconds": round(time.perf_counter() - t0, 2),
        }, tmp / "evaluation.json")
        _log_summary(result["summary"])
    return result


def _write_outputs(folder: Path, result: dict[str, pd.DataFrame]) -> None:
    for key in ("summary", "per_marker", "per_sample", "per_sample_marker", "markers", "tissues", "skipped"):
        if key in result:
            _write_csv(result[key], folder / f"{key}.csv")


def _log_summary(summary: pd.DataFrame) -> None:
    for _, r in summary.iterrows():
        log.info("%-16s Pearson %.4f  Spearman %.4f  C-index %.4f  patches %d", r["method"], r["pearson_r"],
                 r["spearman_r"], r["c_index"], int(r["n_patches"]))


# ============================================================================================
# Patch-level mode (HEX-style folders)
# ============================================================================================


def is_patch_level_truth(path: str | Path) -> bool:
    p = Path(path)
    return (p / "markers.csv").is_file() and (p / "channel_registered").is_dir() and (p / "he_patches").is_dir()


@dataclass
class PatchLevelTruth:
    markers: list[str]
    slides: dict[str, tuple[list[Path], np.ndarray]]  # slide -> (patch PNG paths, (n_patches, K) mean intensities)


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
    from skimage.io import imread

    a = np.asarray(imread(path))
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise EvaluationError(f"{path}: expected an RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise EvaluationError(f"{path}: expected 8-bit RGB, got {a.dtype}")
    return np.ascontiguousarray(np.moveaxis(a[..., :3], -1, 0))


def predict_patch_mean(predict_fn: PredictFn, patch: np.ndarray, stride: int = 8, window: int = MODEL_PATCH,
                       pad_mode: str = "reflect", batch_size: int = 256) -> np.ndarray:
    """(M,) predicted mean expression over a whole H&E patch (e.g. HEX's 224 px).

    Policy ("predict each block and average"): the patch is cut into ``stride`` x ``stride``
    blocks; each block is predicted from the ``window`` px input centred on it, exactly as in
    whole-slide inference, and the block predictions are averaged, which estimates the mean
    intensity over the whole patch (what the CSV holds). Window pixels beyond the patch are filled
    by mirror reflection of the patch (``pad_mode``; the real neighbouring tissue is not available,
    and reflected tissue is closer to it than white glass). ``stride=8`` is ROSIE's block size.
    """
    import torch

    _, H, W = patch.shape
    half = window // 2
    padded = np.pad(patch, ((0, 0), (half, half), (half, half)), mode=pad_mode)
    cy = np.arange(H // stride) * stride + stride // 2
    cx = np.arange(W // stride) * stride + stride // 2
    if len(cy) == 0 or len(cx) == 0:
        raise EvaluationError(f"patch of {H}x{W} px is smaller than one {stride} px block")
    t = torch.from_numpy(np.ascontiguousarray(padded))
    wins = [t[:, y : y + window, x : x + window] for y in cy for x in cx]  # centre (y,x) -> padded top-left (y,x)
    outs = []
    for s in range(0, len(wins), batch_size):
        with torch.no_grad():
            o = predict_fn(torch.stack(wins[s : s + batch_size]))
        outs.append(o.detach().float().cpu().numpy() if hasattr(o, "detach") else np.asarray(o, dtype=np.float32))
    return np.concatenate(outs).astype(np.float64).mean(0)


def evaluate_patch_level(
    truth_dir: str | Path,
    predict_fn: PredictFn,
    model_markers: Sequence[str],
    out_dir: str | Path,
    methods: Sequence[str] = ("rosie", "he_expression"),
    overwrite: bool = False,
    stride: int = 8,
    figures: bool = True,
    gradcam_model: Any = None,
    gradcam_prepare: Callable[[Any], Any] | None = None,
    gradcam_markers: Sequence[str] = ("CD45", "PanCK"),
    gradcam_patches: int = 4,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Patch-level ground truth: predict each patch (:func:`predict_patch_mean`), then Pearson /
    Spearman across a slide's patches per marker (sample = slide), C-index across slides.

    No background patches exist in this layout, so nothing is excluded (the paper's background
    rule cannot apply; logged). ``cell_morphology`` needs cell masks and is skipped.
    """
    methods = _check_methods(methods)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as tmp, _log_to(tmp / "evaluate.log"):
        gt = load_patch_level_truth(truth_dir)
        match = match_panel(list(model_markers), gt.markers)
        _log_unmatched(match, "the model", f"the truth {truth_dir}")
        matched = match[match["status"] == "matched"]
        if matched.empty:
            raise EvaluationError(f"no model marker matches a marker of {truth_dir}/markers.csv")
        markers = matched["marker"].tolist()
        mi = [list(model_markers).index(p) for p in matched["predicted_channel"]]
        ti = [gt.markers.index(m) for m in matched["measured_channel"]]
        log.info("no background patches in patch-level ground truth: the 90th-percentile background exclusion is not applied")

        rosie, he_base, patches_for_cam = [], [], []
        for slide, (paths, values) in gt.slides.items():
            imgs = [read_rgb_png(p) for p in paths]
            truth = values[:, ti]
            if "rosie" in methods:
                pred = np.stack([predict_patch_mean(predict_fn, im, stride) for im in imgs])[:, mi]
                rosie.append(SamplePatches(slide, truth, pred))
            if "he_expression" in methods:
                from analysis.rosie_baselines import he_expression_baseline

                hb = np.concatenate([he_expression_baseline(im, np.zeros((1, 2), int), len(markers), patch=min(im.shape[1:]))
                                     for im in imgs])
                he_base.append(SamplePatches(slide, truth, hb))
            for im in imgs:
                c0, c1 = (im.shape[1] - MODEL_PATCH) // 2, (im.shape[2] - MODEL_PATCH) // 2
                if c0 >= 0 and c1 >= 0:
                    patches_for_cam.append(im[:, c0 : c0 + MODEL_PATCH, c1 : c1 + MODEL_PATCH])
            log.info("slide %s: %d patches", slide, len(paths))

        parts, skipped = [], []
        if rosie:
            parts.append(_tables(rosie, markers, "rosie", None))
        if he_base:
            parts.append(_tables(he_base, markers, "he_expression", None))
        if "cell_morphology" in methods:
            skipped.append(("cell_morphology", "patch-level ground truth has no cell masks"))
        for method, reason in skipped:
            log.warning("method %s skipped: %s", method, reason)
        result = _concat(parts)
        result["markers"] = match
        result["tissues"] = pd.DataFrame([{"tissue_id": s, "n_patches": len(v[0])} for s, v in gt.slides.items()])
        result["skipped"] = pd.DataFrame(skipped, columns=["method", "reason"])

        figs = []
        if figures and not result["per_marker"].empty and result["per_marker"]["pearson_r"].notna().any():
            figs.append(plot_per_marker_methods(result["per_marker"], tmp / "per_marker_pearson.png"))
        if gradcam_model is not None and patches_for_cam:
            rng = np.random.default_rng(seed)
            pick = rng.choice(len(patches_for_cam), min(gradcam_patches, len(patches_for_cam)), replace=False)
            f = gradcam_figure(gradcam_model, gradcam_prepare or (lambda x: x.float() / 255.0), model_markers,
                               gradcam_markers, np.stack([patches_for_cam[i] for i in pick]), tmp / "gradcam.png")
            figs += [f] if f else []
        _write_outputs(tmp, result)
        _write_json({
            "mode": "patch_level", "truth": str(truth_dir), "methods": methods, "skipped_methods": dict(skipped),
            "slides": list(gt.slides), "stride": stride, "markers_matched": markers, "n_markers_matched": len(markers),
            "markers_not_measured": match.loc[match["status"] == "not_measured", "predicted_channel"].tolist(),
            "markers_not_predicted": match.loc[match["status"] == "not_predicted", "measured_channel"].tolist(),
            "figures": [str(Path(f).relative_to(tmp)) for f in figs],
            "policy": {"prediction": f"mean of the {MODEL_PATCH} px model's predictions for every {stride} px block of the "
                                     "patch (window centred on the block, mirror padding)",
                       "background": "none (no background patches in patch-level truth)",
                       "sample": "slide"},
            "seconds": round(time.perf_counter() - t0, 2),
        }, tmp / "evaluation.json")
        _log_summary(result["summary"])
    return result
