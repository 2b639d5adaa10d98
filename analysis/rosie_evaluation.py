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
has one job — the evaluation's metric tables from arrays already in memory (:class:`TissuePatches`
in, ``summary``/``per_marker``/``per_sample``/``per_sample_marker`` out), with the constants and the
stride rule the other parts share. It imports no ``datamodules``, ``lightning_modules`` or
``experiments`` and no Lightning, so the metrics can be reused on data from anywhere. The other
parts: the baselines on the same patches in :mod:`analysis.rosie_baselines`, the figures in
:mod:`analysis.rosie_figures` and :mod:`analysis.gradcam`, the per-patch prediction policy of
patch-level truth in :mod:`analysis.rosie_patch_level`; reading the prediction and truth datasets in
:mod:`datamodules.rosie_evaluation_data`; the orchestration, output files and log in
:mod:`experiments.rosie_evaluation_pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.rosie_metrics import METRIC_COLUMNS, SamplePatches, evaluate_samples

METHODS: tuple[str, ...] = ("rosie", "he_expression", "cell_morphology")
PER_MARKER_COLUMNS = ["method", "marker", "pearson_r", "spearman_r", "c_index", "n_patches"]
PER_SAMPLE_COLUMNS = ["method", "tissue_id", "pearson_r", "spearman_r", "n_patches"]
PER_SAMPLE_MARKER_COLUMNS = ["method", "tissue_id", "marker", "pearson_r", "spearman_r", "n_patches"]
SUMMARY_COLUMNS = list(METRIC_COLUMNS)  # method, pearson_r, spearman_r, c_index, n_patches
#: The metric tables of one evaluation and their columns.
TABLE_COLUMNS: dict[str, list[str]] = {"per_marker": PER_MARKER_COLUMNS, "per_sample": PER_SAMPLE_COLUMNS,
                                       "per_sample_marker": PER_SAMPLE_MARKER_COLUMNS, "summary": SUMMARY_COLUMNS}
#: A block is evaluated when at least this fraction of it is tissue (as for ROSIE's training blocks).
IN_TISSUE_FRACTION = 0.5
#: The model's input patch (px): Grad-CAM patches and the window of the per-patch prediction.
MODEL_PATCH = 128


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the file or argument and the fix."""


def detect_stride(pred_mpp: float, truth_mpp: float, name: str = "prediction") -> int:
    """``s = pred_mpp / truth_mpp``, which must be a whole number >= 1 (within 1 %)."""
    ratio = float(pred_mpp) / float(truth_mpp)
    s = int(round(ratio))
    if s < 1 or abs(ratio - s) > 0.01 * s:
        raise EvaluationError(f"{name}: {pred_mpp:g} µm/px is not a whole multiple of the measured CODEX's {truth_mpp:g} µm/px "
                              f"(ratio {ratio:.4g}); predict from the H&E of the truth dataset (same resolution)")
    return s


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
        """The tissue as :func:`analysis.rosie_metrics.evaluate_samples` input, scoring ``pred`` (default: ROSIE's)."""
        return SamplePatches(self.tissue_id, self.truth, self.pred if pred is None else pred, self.in_tissue, self.present)


def metric_tables(samples: Sequence[SamplePatches], markers: Sequence[str], method: str,
                  background: Any) -> dict[str, pd.DataFrame]:
    """One method's tables (``per_marker``, ``per_sample``, ``per_sample_marker``, ``summary``) in the
    evaluation's column layout: samples are tissues (``tissue_id``). ``background`` as in
    :func:`analysis.rosie_metrics.evaluate_samples` (``"tissue_mask"``, an array, or None)."""
    res = evaluate_samples(samples, markers, method=method, background=background)
    per_marker = res.per_marker[PER_MARKER_COLUMNS].copy()
    per_sample = res.per_sample.rename(columns={"sample_id": "tissue_id"})[PER_SAMPLE_COLUMNS].copy()
    psm = res.per_sample_marker.rename(columns={"sample_id": "tissue_id"})[PER_SAMPLE_MARKER_COLUMNS].copy()
    summary = res.summary[SUMMARY_COLUMNS].copy()
    return {"per_marker": per_marker, "per_sample": per_sample, "per_sample_marker": psm, "summary": summary}


def concat_tables(parts: list[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """The methods' :func:`metric_tables` stacked into one set of tables (empty tables, with their
    columns, when no method ran)."""
    return {k: (pd.concat([p[k] for p in parts], ignore_index=True) if parts else pd.DataFrame(columns=cols))
            for k, cols in TABLE_COLUMNS.items()}
