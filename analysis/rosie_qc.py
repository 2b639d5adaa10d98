"""The ROSIE paper's quality-control filters and what they do to the evaluation (Methods "Quality
control", Supplementary Fig. 6).

Two metrics need no measured CODEX, so a lab can apply them to any new slide:

* **W1 to the training H&E**: the mean 1-D Wasserstein distance between the slide's 256-bin
  intensity histogram and each training slide's (the training histograms travel in the checkpoint;
  computed by ``rosie_predict`` per tissue). A large W1 means the slide is out of distribution.
* **Dynamic range** of a predicted marker: 99th minus 1st percentile of its predicted values. The
  paper excludes biomarkers below a threshold from evaluation; it gives no value, so here the
  threshold is an argument, and the sample-level filter uses each sample's median over markers.

The filter analysis asks whether the metrics pick out the samples where ROSIE does well: mean
Pearson R over all samples, over samples with W1 at or below the median, over samples with median
dynamic range at or above the median, and over samples passing both. With the marker-level
threshold, (sample, marker) pairs below it are dropped before the per-sample means.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FILTERS = ("all samples", "W1 <= median", "dynamic range >= median", "both")


def per_sample_quality(per_sample_marker: pd.DataFrame, qc: pd.DataFrame, method: str = "rosie",
                       dynamic_range_threshold: float | None = None) -> pd.DataFrame:
    """One row per sample: mean Pearson R over its markers, its W1 and median dynamic range.

    ``per_sample_marker``: the evaluation's ``per_sample_marker.csv`` (method, tissue_id, marker,
    pearson_r, ...); ``qc``: ``rosie_predict``'s ``qc.csv`` (tissue_id, marker, dynamic_range,
    w1_to_training_he). ``dynamic_range_threshold``: drop (sample, marker) pairs whose predicted
    dynamic range is below it (the paper's marker exclusion), before averaging.
    """
    scores = per_sample_marker[per_sample_marker["method"] == method][["tissue_id", "marker", "pearson_r"]]
    merged = scores.merge(qc[["tissue_id", "marker", "dynamic_range", "w1_to_training_he"]], on=["tissue_id", "marker"],
                          how="inner")
    if merged.empty:
        raise ValueError("no (tissue, marker) pair is both evaluated and in the prediction QC table; check that the "
                         "evaluation and qc.csv come from the same prediction folder")
    kept = merged if dynamic_range_threshold is None else merged[merged["dynamic_range"] >= dynamic_range_threshold]
    rows = []
    for tid, group in merged.groupby("tissue_id", sort=True):
        mine = kept[kept["tissue_id"] == tid]
        rows.append({"tissue_id": tid, "pearson_r": float(np.nanmean(mine["pearson_r"])) if len(mine) else np.nan,
                     "n_markers": int(mine["pearson_r"].notna().sum()),
                     "w1_to_training_he": float(group["w1_to_training_he"].iloc[0]),
                     "median_dynamic_range": float(np.nanmedian(group["dynamic_range"]))})
    return pd.DataFrame(rows)


def filter_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std) Pearson R of the samples each filter keeps (Supplementary Fig. 6)."""
    w1_ok = samples["w1_to_training_he"] <= samples["w1_to_training_he"].median()
    dr_ok = samples["median_dynamic_range"] >= samples["median_dynamic_range"].median()
    if samples["w1_to_training_he"].isna().all():
        w1_ok = pd.Series(False, index=samples.index)
    keep = {"all samples": pd.Series(True, index=samples.index), "W1 <= median": w1_ok,
            "dynamic range >= median": dr_ok, "both": w1_ok & dr_ok}
    rows = []
    for name in FILTERS:
        r = samples.loc[keep[name], "pearson_r"].dropna()
        rows.append({"filter": name, "n_samples": int(len(r)), "mean_pearson_r": float(r.mean()) if len(r) else np.nan,
                     "std_pearson_r": float(r.std(ddof=1)) if len(r) > 1 else np.nan})
    return pd.DataFrame(rows)


def plot_quality(samples: pd.DataFrame, path: str) -> str:
    """Per-sample Pearson R against W1 and against median dynamic range, medians dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, column, label in ((axes[0], "w1_to_training_he", "W1 to training H&E (intensity units)"),
                              (axes[1], "median_dynamic_range", "median predicted dynamic range")):
        ax.scatter(samples[column], samples["pearson_r"], s=18, color="#3465a4")
        for _, row in samples.iterrows():
            ax.annotate(str(row["tissue_id"])[-6:], (row[column], row["pearson_r"]), fontsize=5, alpha=0.7)
        if samples[column].notna().any():
            ax.axvline(samples[column].median(), ls="--", color="0.5", lw=0.8)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("mean Pearson R (ROSIE)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_title("out of distribution?", fontsize=9)
    axes[1].set_title("weak prediction?", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
