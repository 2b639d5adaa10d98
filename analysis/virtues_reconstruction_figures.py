"""Figures of the VirTues reconstruction evaluation, after the paper's Fig. 2a–d and 2h.

* ``pearson_by_strategy.png`` (Fig. 2d): per masking strategy, the per-marker Pearson r (and F1) of
  VirTues and of the strategy's baseline as box plots with the markers as points, mean marked.
* ``per_marker_scatter.png`` (Fig. 2h-like): per strategy, each marker's baseline r (x) against
  VirTues r (y); markers unseen during pretraining drawn as crosses, seen ones as dots.
* ``examples_<strategy>_<dataset>.png`` (Fig. 2a–c): for a few markers of one crop, masked input /
  VirTues reconstruction / ground truth, displayed like the paper (standardisation and log undone,
  divided by the tissue's 99th percentile, so [0, 1]); masked tokens are grey in the input.

matplotlib with the Agg backend; every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

STRATEGIES = ("independent", "marker", "niche")
LABELS = {"virtues": "VirTues", "visible_mean": "visible mean", "most_correlated": "most correlated marker"}
COLOURS = {"virtues": "#1f77b4", "visible_mean": "#bbbbbb", "most_correlated": "#555555"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    tmp.replace(path)
    return path


def plot_by_strategy(per_marker: pd.DataFrame, path: Path) -> Path:
    """Boxes of per-marker Pearson r and F1 per strategy, VirTues beside its baseline."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    strategies = [s for s in STRATEGIES if s in set(per_marker["strategy"])]
    for ax, metric in zip(axes, ("pearson_r", "f1")):
        ticks, labels = [], []
        for si, strategy in enumerate(strategies):
            sub = per_marker[per_marker["strategy"] == strategy]
            methods = [m for m in LABELS if m in set(sub["method"])]
            for mi, method in enumerate(methods):
                vals = sub.loc[sub["method"] == method, metric].dropna().to_numpy()
                x = si * 3 + mi * 0.9
                if len(vals):
                    bp = ax.boxplot(vals, positions=[x], widths=0.7, patch_artist=True, showfliers=False)
                    for patch in bp["boxes"]:
                        patch.set_facecolor(COLOURS[method])
                        patch.set_alpha(0.6)
                    jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(vals))
                    ax.scatter(x + jitter, vals, s=6, color="k", alpha=0.5, zorder=3)
                    ax.scatter([x], [vals.mean()], marker="D", s=30, color="red", zorder=4)
            ticks.append(si * 3 + 0.45 * (len(methods) - 1))
            labels.append(strategy)
        ax.set_xticks(ticks, labels)
        ax.set_ylabel("Pearson r (masked pixels)" if metric == "pearson_r" else "F1 (positivity at marker mean)")
        ax.axhline(0, color="k", lw=0.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[m], alpha=0.6) for m in LABELS]
    handles.append(plt.Line2D([], [], marker="D", color="red", ls=""))
    fig.legend(handles, [*LABELS.values(), "mean over markers"], loc="upper center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, path)


def plot_marker_scatter(per_marker: pd.DataFrame, path: Path) -> Path:
    """VirTues r against the baseline r per marker, one panel per strategy."""
    plt = _plt()
    strategies = [s for s in STRATEGIES if s in set(per_marker["strategy"])]
    fig, axes = plt.subplots(1, max(1, len(strategies)), figsize=(3.6 * max(1, len(strategies)), 3.6), squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        sub = per_marker[per_marker["strategy"] == strategy]
        base = [m for m in sub["method"].unique() if m != "virtues"]
        if not base:
            continue
        wide = sub.pivot_table(index=["dataset", "marker", "seen"], columns="method", values="pearson_r",
                               dropna=False).reset_index()
        if base[0] not in wide or "virtues" not in wide or wide[[base[0], "virtues"]].isna().all().any():
            ax.set_title(f"{strategy} masking (r undefined)")  # e.g. one crop: the visible mean is constant
            continue
        for seen_flag, marker in ((True, "o"), (False, "x")):
            part = wide[wide["seen"] == seen_flag]
            if len(part):
                ax.scatter(part[base[0]], part["virtues"], marker=marker, s=18,
                           label="seen" if seen_flag else "unseen (zero-shot)", color=COLOURS["virtues"])
        lo = np.nanmin([wide[base[0]].min(), wide["virtues"].min(), 0.0])
        ax.plot([lo, 1], [lo, 1], color="k", lw=0.7, ls="--")
        ax.set(xlabel=f"{LABELS.get(base[0], base[0])} r", ylabel="VirTues r", title=f"{strategy} masking")
        top = wide.assign(gain=wide["virtues"] - wide[base[0]]).nlargest(3, "gain")
        for row in top.itertuples():
            ax.annotate(row.marker, (getattr(row, base[0]), row.virtues), fontsize=6)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _display(x: np.ndarray, preprocessor: Any, ref: np.ndarray) -> np.ndarray:
    if preprocessor is None:  # no statistics: min-max of the truth (``ref``) per channel, shared by all panels
        lo, hi = ref.min(axis=(1, 2), keepdims=True), ref.max(axis=(1, 2), keepdims=True)
        return np.clip((x - lo) / np.where(hi > lo, hi - lo, 1), 0, 1)
    nan = np.isnan(x)
    out = preprocessor.invert(np.nan_to_num(x), scale_to_unit=True)
    out[nan] = np.nan
    return out


def plot_example(example: dict, path: Path, n_markers: int = 4) -> Path:
    """Rows = markers with the most structure in the crop; columns = masked input, reconstruction, truth."""
    plt = _plt()
    truth = example["truth"]
    order = np.argsort(-truth.reshape(truth.shape[0], -1).std(1))[:n_markers]
    order = sorted(order)
    pre = example["preprocessor"]
    pre = pre.subset(order) if pre is not None and hasattr(pre, "subset") else pre
    ref = example["truth"][order]
    t, rec, inp = (_display(example[k][order], pre, ref) for k in ("truth", "recon", "input"))
    fig, axes = plt.subplots(len(order), 3, figsize=(6.6, 2.2 * len(order)), squeeze=False)
    cmap = plt.get_cmap("magma").with_extremes(bad="#7f7f7f")
    for r, ch in enumerate(order):
        for c, (img, title) in enumerate(((inp[r], "masked input"), (rec[r], "VirTues"), (t[r], "ground truth"))):
            ax = axes[r, c]
            ax.imshow(np.ma.masked_invalid(img), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(example["markers"][ch], fontsize=9)
    fig.suptitle(f"{example['strategy']} masking — {example['dataset']} {example['tissue_id']} "
                 f"@({example['y']},{example['x']})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_all(result: Any, out_dir: Path) -> list[Path]:
    """Every figure of a :class:`analysis.virtues_reconstruction.ReconstructionResult`."""
    out_dir = Path(out_dir)
    paths: list[Path] = []
    pm = result.per_marker
    if pm.empty:
        log.warning("no per-marker results: no figures")
        return paths
    paths.append(plot_by_strategy(pm, out_dir / "pearson_by_strategy.png"))
    paths.append(plot_marker_scatter(pm, out_dir / "per_marker_scatter.png"))
    for ex in result.examples:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"examples_{ex['strategy']}_{ex['dataset']}")
        paths.append(plot_example(ex, out_dir / f"{name}.png"))
    return paths
