"""Evaluate predicted multiplex images against measured CODEX with the ROSIE paper's metrics.

Two kinds of ground truth:

* **Dataset mode** (:func:`experiments.rosie_evaluation_pipeline.evaluate`): ``pred_dir`` is a
  dataset folder written by ``experiments.rosie_predict`` (modality ``codex``, one image per tissue
  id at ``H&E mpp x stride``, channel names = marker names) and ``truth_dir`` a dataset with
  measured ``codex`` (and ``he``, tissue masks, cell masks for the baselines).
* **Patch-level mode** (:func:`experiments.rosie_evaluation_pipeline.evaluate_patch_level`):
  ``truth_dir`` holds H&E patches with the mean CODEX intensity of each patch (the HEX sample-data
  layout: ``he_patches/<slide>/<slide>_<i>.png``, ``channel_registered/<slide>.csv``,
  ``markers.csv``); the model is run on each patch.

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

Layering (``experiments`` -> ``datamodules`` -> ``analysis``): this module is the bottom layer and
works only on arrays and tables already in memory — metric tables, CSV/JSON writers, figures, the
cell-morphology MLP fitted on feature arrays, the per-patch prediction policy. It imports no
``datamodules``, ``lightning_modules`` or ``experiments`` and no Lightning, so the metrics can be
reused on data from anywhere. Reading the prediction and truth datasets (marker matching against a
dataset, cutting tissues into patches, masks, H&E, patch-level folders) lives in
:mod:`datamodules.rosie_evaluation_data`; the orchestrators that combine both live in
:mod:`experiments.rosie_evaluation_pipeline`. A model enters only as a callable (``predict_fn``) or
an ``nn.Module`` with its input ``prepare`` function, given by the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.outputs import json_default
from analysis.rosie_metrics import METRIC_COLUMNS, SamplePatches, evaluate_samples

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("rosie", "he_expression", "cell_morphology")
PER_MARKER_COLUMNS = ["method", "marker", "pearson_r", "spearman_r", "c_index", "n_patches"]
PER_SAMPLE_COLUMNS = ["method", "tissue_id", "pearson_r", "spearman_r", "n_patches"]
SUMMARY_COLUMNS = list(METRIC_COLUMNS)  # method, pearson_r, spearman_r, c_index, n_patches
#: A block is evaluated when at least this fraction of it is tissue (as for ROSIE's training blocks).
IN_TISSUE_FRACTION = 0.5
MODEL_PATCH = 128

PredictFn = Callable[[Any], Any]  # uint8 torch (B,3,P,P) -> (B,M) tensor/array
#: ``load(sample_id) -> (he (3,h,w), truth (M,h',w'), pred (M,h',w'))`` display-sized images for one sample.
SampleLoader = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the file or argument and the fix."""


# ============================================================================================
# Markers, strides
# ============================================================================================


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
# Logging into the output folder
# ============================================================================================


@contextlib.contextmanager
def _log_to(path: Path, loggers: Sequence[str] = ("analysis",)) -> Iterator[None]:
    """Copy the named loggers (default: the ``analysis`` ones — this module, metrics, baselines) into ``path``.

    The caller names the loggers of the other layers taking part (dataset reading, orchestration):
    this module cannot know them without importing upwards.
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    roots = [logging.getLogger(name) for name in dict.fromkeys(loggers)]
    old_levels = [root.level for root in roots]
    for root in roots:
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        root.addHandler(handler)
    try:
        yield
    finally:
        for root, old_level in zip(roots, old_levels):
            root.removeHandler(handler)
            root.setLevel(old_level)
        handler.close()


# ============================================================================================
# Patches of one tissue / one patch-level folder, as arrays
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


@dataclass
class PatchLevelTruth:
    markers: list[str]
    slides: dict[str, tuple[list[Path], np.ndarray]]  # slide -> (patch PNG paths, (n_patches, K) mean intensities)


# ============================================================================================
# Baselines on the same patches (from arrays)
# ============================================================================================


def he_expression_predictions(he: np.ndarray, tp: TissuePatches) -> np.ndarray:
    """(N, M) H&E expression baseline on ``tp``'s blocks; ``he`` is the truth H&E (3, H, W) at the truth resolution."""
    from analysis.rosie_baselines import he_expression_baseline

    return he_expression_baseline(he, tp.origins, tp.truth.shape[1], patch=tp.stride).astype(np.float32)


@dataclass
class MorphologyData:
    """Everything the cell-morphology baseline needs, already read from the truth dataset.

    ``train``/``val`` are (features (N, F), targets (N, M), presence (N, M)) of the in-tissue blocks
    of the truth dataset's ``train``/``val`` tissues (``val`` None without usable val tissues);
    ``features`` maps each evaluated tissue id to the (N, F) features of its ``TissuePatches`` rows.
    ``n_train_tissues`` is the number of ``train`` tissues in the tissues table (for the log).
    """

    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    features: dict[str, np.ndarray]
    n_train_tissues: int


def cell_morphology_predictions(data: MorphologyData, epochs: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Train the morphology MLP on ``data.train`` (validated on ``data.val``); predict the evaluated tissues.

    Returns {tissue_id: (N, M) predictions}. Whether the baseline can run at all (cell masks, H&E,
    a ``split`` column) is decided where the data is read,
    :func:`datamodules.rosie_evaluation_data.cell_morphology_inputs`.
    """
    from analysis.rosie_baselines import MorphologyBaseline

    val = data.val
    x, y, p = data.train
    y = np.where(p, y, np.nan).astype(np.float64)
    mu = np.nanmean(y, 0)
    sd = np.nanstd(y, 0)
    mu, sd = np.nan_to_num(mu), np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    model = MorphologyBaseline(num_markers=y.shape[1], epochs=epochs, seed=seed)
    kwargs = {}
    if val is not None:
        kwargs = {"x_val": val[0], "y_val": (np.where(val[2], val[1], np.nan) - mu) / sd, "present_val": val[2]}
    log.info("cell_morphology: training on %d patches of %d train tissues (%s validation patches), %d epochs",
             len(x), data.n_train_tissues, len(val[0]) if val is not None else "no val tissue: train", epochs)
    model.fit(x, (y - mu) / sd, p, **kwargs)
    out = {}
    for tissue_id, feats in data.features.items():
        out[tissue_id] = (model.predict(feats) * sd + mu).astype(np.float32)
    return out


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
    tmp.write_text(json.dumps(obj, indent=2, default=json_default))
    tmp.replace(path)




def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EvaluationError(f"unknown method(s) {bad or methods}; choose from {list(METHODS)}")
    return methods


def _write_outputs(folder: Path, result: dict[str, pd.DataFrame]) -> None:
    for key in ("summary", "per_marker", "per_sample", "per_sample_marker", "markers", "tissues", "skipped"):
        if key in result:
            _write_csv(result[key], folder / f"{key}.csv")


def _log_summary(summary: pd.DataFrame) -> None:
    for _, r in summary.iterrows():
        log.info("%-16s Pearson %.4f  Spearman %.4f  C-index %.4f  patches %d", r["method"], r["pearson_r"],
                 r["spearman_r"], r["c_index"], int(r["n_patches"]))


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


def _percentile_figure(per_sample: pd.DataFrame, names: Sequence[str], load: SampleLoader, path: Path) -> Path | None:
    """Predicted vs measured for the tissues at ROSIE's per-sample Pearson R percentiles.

    ``load`` gives the display-sized images of one tissue (read by the caller, e.g.
    :func:`datamodules.rosie_evaluation_data.percentile_loader`); it is called only for the
    tissues picked, so whole images are never all held at once.
    """
    from analysis.rosie_figures import plot_percentile_samples

    rows = per_sample[per_sample["method"] == "rosie"]
    if rows.empty or not rows["pearson_r"].notna().any():
        log.info("predicted-vs-measured figure skipped: no ROSIE per-sample Pearson R")
        return None
    return plot_percentile_samples(rows.rename(columns={"tissue_id": "sample_id"}), load, list(names), path)


def gradcam_figure(model: Any, prepare: Callable[[Any], Any], model_markers: Sequence[str], markers: Sequence[str],
                   patches_uint8: np.ndarray, path: Path, mapping: Mapping[str, str]) -> Path | None:
    """Grad-CAM of ``model`` (input = ``prepare(uint8 patches)``) for the requested markers.

    ``mapping`` takes each requested marker to its name among ``model_markers`` (aliases resolved by
    the caller with :func:`datamodules.markers.match_markers`; requested markers left out of it are
    reported and skipped).
    """
    import torch

    from analysis.gradcam import gradcam, plot_gradcam

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


# ============================================================================================
# Patch-level mode: one patch's prediction
# ============================================================================================


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
