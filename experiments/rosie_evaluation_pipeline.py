"""The ROSIE evaluation end to end: read datasets, score every method, write tables and figures.

Why here, in ``experiments``: an evaluation combines the two lower layers — reading the prediction
and truth datasets (:mod:`datamodules.rosie_evaluation_data`) and the metric tables, baselines and
figures computed from arrays (:mod:`analysis.rosie_evaluation`, which documents every policy,
:mod:`analysis.rosie_baselines`, :mod:`analysis.rosie_figures`, :mod:`analysis.gradcam`) — and only
the top layer may import both (``experiments`` -> ``datamodules`` -> ``analysis``). What an
evaluation leaves behind is also decided here: the CSV tables, ``evaluation.json`` and
``evaluate.log`` (the loggers of every layer taking part, which only this layer can name). The CLI is
:mod:`experiments.rosie_evaluate`; :mod:`experiments.rosie_experiment` calls :func:`evaluate` after
training. A model enters only as a callable (``predict_fn``) or an ``nn.Module`` with its input
``prepare`` function, given by the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.gradcam import gradcam_figure
from analysis.outputs import atomic_output_dir, json_default
from analysis.rosie_baselines import cell_morphology_predictions, he_expression_baseline, he_expression_predictions
from analysis.rosie_evaluation import (
    IN_TISSUE_FRACTION,
    METHODS,
    MODEL_PATCH,
    EvaluationError,
    concat_tables,
    metric_tables,
)
from analysis.rosie_figures import plot_per_marker_methods, plot_per_marker_pearson, plot_rosie_percentile_samples
from analysis.rosie_metrics import SamplePatches
from analysis.rosie_patch_level import PredictFn, predict_patch_mean
from datamodules import layout, rosie_evaluation_data
from datamodules.markers import match_markers
from datamodules.provenance import PREDICTION, dataset_kind
from datamodules.rosie_evaluation_data import (
    MODALITY,
    cell_morphology_inputs,
    load_patch_level_truth,
    load_tissue,
    match_panel,
    percentile_loader,
    read_gradcam_patches,
    read_he,
    read_rgb_png,
)
from datamodules.store import DatasetStore, StoreError

log = logging.getLogger(__name__)

#: Loggers copied into ``evaluate.log``: the analysis layer, the dataset reading and this module.
LOGGERS: tuple[str, ...] = ("analysis", rosie_evaluation_data.__name__, __name__)
#: The tables written as ``<name>.csv``, in this order, when present.
OUTPUT_TABLES: tuple[str, ...] = ("summary", "per_marker", "per_sample", "per_sample_marker", "markers", "tissues", "skipped")


# ============================================================================================
# Arguments, log and output files of an evaluation
# ============================================================================================


def _check_methods(methods: Sequence[str]) -> list[str]:
    """The requested methods without repeats; unknown ones refused before any dataset is read."""
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EvaluationError(f"unknown method(s) {bad or methods}; choose from {list(METHODS)}")
    return methods


@contextlib.contextmanager
def _log_to(path: Path, loggers: Sequence[str] = LOGGERS) -> Iterator[None]:
    """Copy the named loggers (at INFO at least) into ``path`` while the evaluation runs."""
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


def _log_unmatched(table: pd.DataFrame, what_pred: str, what_truth: str) -> None:
    """Markers on only one side of :func:`match_panel`'s table are named in the log, never dropped silently."""
    n = int((table["status"] == "matched").sum())
    log.info("markers: %d matched between %s and %s", n, what_pred, what_truth)
    nm = table.loc[table["status"] == "not_measured", "predicted_channel"].tolist()
    npred = table.loc[table["status"] == "not_predicted", "measured_channel"].tolist()
    if nm:
        log.warning("%d predicted markers have no measured channel in %s (not evaluated): %s", len(nm), what_truth, ", ".join(nm))
    if npred:
        log.warning("%d measured markers are not predicted by %s (not evaluated): %s", len(npred), what_pred, ", ".join(npred))


def _log_summary(summary: pd.DataFrame) -> None:
    """One line per method in the log, so ``evaluate.log`` alone tells the result."""
    for _, r in summary.iterrows():
        log.info("%-16s Pearson %.4f  Spearman %.4f  C-index %.4f  patches %d", r["method"], r["pearson_r"],
                 r["spearman_r"], r["c_index"], int(r["n_patches"]))


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """Written under a temporary name and renamed: a reader never sees half a table."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def _write_json(obj: dict, path: Path) -> None:
    """As :func:`_write_csv`; numpy values through the project's one JSON encoder."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=json_default))
    tmp.replace(path)


def _write_outputs(folder: Path, result: dict[str, pd.DataFrame]) -> None:
    """Every table of :data:`OUTPUT_TABLES` that ``result`` holds, as ``<name>.csv``."""
    for key in OUTPUT_TABLES:
        if key in result:
            _write_csv(result[key], folder / f"{key}.csv")


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
    cells: str = "stored",
) -> dict[str, pd.DataFrame]:
    """Score the predicted tissues of ``pred_dir`` against ``truth_dir``; write tables and figures to ``out_dir``.

    ``cells``: where the cell-morphology baseline's cells come from — the stored masks, or the measured
    ``dapi`` segmented here as in the paper ("segmentation masks calculated from the DAPI channel").

    ``split``: evaluate only predicted tissues of this split of the truth dataset (None = every
    predicted tissue that has a measurement). Returns the tables (``summary``, ``per_marker``,
    ``per_sample``, ``per_sample_marker``, ``markers``, ``tissues``, ``skipped``), also written as
    CSV, with ``evaluation.json``, ``evaluate.log`` and the figures (``*.png``).
    """
    methods = _check_methods(methods)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite, command="rosie_evaluate") as tmp, _log_to(tmp / "evaluate.log"):
        pred, truth = DatasetStore(str(pred_dir)), DatasetStore(str(truth_dir))
        if Path(str(pred_dir)).is_dir() and dataset_kind(pred_dir) != PREDICTION:
            raise EvaluationError(f"--pred {pred_dir}: is a measured dataset, not an output of rosie_predict; scoring "
                                  "measured against measured would report a perfect model: give the prediction folder")
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
            split = layout.normalise_split(split)
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
            parts.append(metric_tables([t.sample() for t in tlist], markers, "rosie", "tissue_mask"))
        if "he_expression" in methods:
            if "he" not in truth.modalities():
                skipped.append(("he_expression", f"{truth.url} has no H&E modality"))
            else:
                try:
                    preds = [t.sample(he_expression_predictions(read_he(truth, t.tissue_id, t.truth_mpp), t)) for t in tlist]
                    parts.append(metric_tables(preds, markers, "he_expression", "tissue_mask"))
                except StoreError as exc:
                    skipped.append(("he_expression", f"H&E not readable at the truth resolution: {exc}"))
        if "cell_morphology" in methods:
            data, reason = cell_morphology_inputs(truth, tlist, match, ids, max_train_patches, seed, cells)
            if data is None:
                skipped.append(("cell_morphology", reason))
            else:
                got = cell_morphology_predictions(data, morphology_epochs, seed)
                parts.append(metric_tables([t.sample(got[t.tissue_id]) for t in tlist], markers, "cell_morphology", "tissue_mask"))
        for method, reason in skipped:
            log.warning("method %s skipped: %s", method, reason)
        result = concat_tables(parts)
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
                figs.append(plot_per_marker_pearson(rosie_pm, tmp / "per_marker_pearson_rosie.png",
                                                    title="ROSIE Pearson R per marker"))
            if "he" in truth.modalities():
                f = plot_rosie_percentile_samples(result["per_sample"], markers,
                                                  percentile_loader(pred, truth, tissues, match, pred_mpp),
                                                  tmp / "predicted_vs_measured.png")
                figs += [f] if f else []
        if gradcam_model is not None:
            patches = read_gradcam_patches(truth, tlist, gradcam_patches, seed)
            cam_markers = gradcam_model_markers or markers
            f = gradcam_figure(gradcam_model, gradcam_prepare or (lambda x: x.float() / 255.0),
                               cam_markers, gradcam_markers, patches, tmp / "gradcam.png",
                               mapping=match_markers(list(gradcam_markers), list(cam_markers)))
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


# ============================================================================================
# Patch-level mode (HEX-style folders)
# ============================================================================================


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
    """Patch-level ground truth: predict each patch (:func:`analysis.rosie_patch_level.predict_patch_mean`),
    then Pearson / Spearman across a slide's patches per marker (sample = slide), C-index across slides.

    No background patches exist in this layout, so nothing is excluded (the paper's background
    rule cannot apply; logged). ``cell_morphology`` needs cell masks and is skipped.
    """
    methods = _check_methods(methods)
    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite, command="rosie_evaluate") as tmp, _log_to(tmp / "evaluate.log"):
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
            parts.append(metric_tables(rosie, markers, "rosie", None))
        if he_base:
            parts.append(metric_tables(he_base, markers, "he_expression", None))
        if "cell_morphology" in methods:
            skipped.append(("cell_morphology", "patch-level ground truth has no cell masks"))
        for method, reason in skipped:
            log.warning("method %s skipped: %s", method, reason)
        result = concat_tables(parts)
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
                               gradcam_markers, np.stack([patches_for_cam[i] for i in pick]), tmp / "gradcam.png",
                               mapping=match_markers(list(gradcam_markers), list(model_markers)))
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
