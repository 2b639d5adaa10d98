"""Figures of the ROSIE paper: per-marker Pearson R bars (Fig. 2B) and predicted-vs-measured
panels for the samples at the 99th/75th/50th/25th percentile of Pearson R (Fig. 2A), plus the
evaluation's comparison of methods per marker (:func:`plot_per_marker_methods`).

The images of the predicted-vs-measured figure come from a :data:`SampleLoader` given by the caller
(:func:`datamodules.rosie_evaluation_data.percentile_loader` reads them from datasets), so only
the few samples picked are ever read. The Grad-CAM figure is in :mod:`analysis.gradcam`.

matplotlib with the Agg backend; images are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.rosie_evaluation import METHODS

log = logging.getLogger(__name__)

#: ``load(sample_id) -> (he (3,h,w), truth (M,h',w'), pred (M,h',w'))`` display-sized images for one sample.
SampleLoader = Callable[[str], tuple[np.ndarray, np.ndarray, np.ndarray]]

#: The paper's two display panels (Fig. 2A).
STRUCTURAL_PANEL: tuple[str, ...] = ("Keratin8/18", "EpCAM", "Vimentin", "ECad", "aSMA", "CD31", "PanCK")
IMMUNE_PANEL: tuple[str, ...] = ("HLA-E", "Gal3", "CD45", "CD21", "LAG3", "CD66", "CD68")
PANEL_COLOURS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.4, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.5, 0.0),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    tmp.replace(path)
    return path


def plot_per_marker_pearson(
    per_marker: pd.DataFrame | Mapping[str, float],
    path: str | Path,
    highlight: Sequence[str] = (*STRUCTURAL_PANEL, *IMMUNE_PANEL),
    title: str = "Pearson R per marker",
) -> Path:
    """Bar chart of Pearson R per marker, sorted high to low; ``highlight`` markers coloured.

    ``per_marker``: the ``per_marker`` table of ``rosie_metrics.evaluate_samples`` (columns
    ``marker``, ``pearson_r``) or a mapping marker -> R.
    """
    if isinstance(per_marker, pd.DataFrame):
        s = per_marker.set_index("marker")["pearson_r"]
    else:
        s = pd.Series(dict(per_marker), dtype=float)
    s = s.dropna().sort_values(ascending=False)
    if s.empty:
        raise ValueError("plot_per_marker_pearson: no finite Pearson R to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(s) + 1.5), 3.2))
    hl = set(highlight)
    colours = ["tab:red" if m in hl else "tab:gray" for m in s.index]
    ax.bar(np.arange(len(s)), s.to_numpy(), color=colours)
    ax.set_xticks(np.arange(len(s)))
    ax.set_xticklabels(s.index, rotation=90, fontsize=7)
    ax.set_ylabel("Pearson R")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(f"{title} (mean {s.mean():.3f})")
    return _save(fig, path)


def select_percentile_samples(scores: pd.Series | Mapping[str, float], percentiles: Sequence[float] = (99, 75, 50, 25)) -> list[tuple[float, str]]:
    """[(percentile, sample_id)]: the sample whose score is nearest each percentile of the scores."""
    s = pd.Series(dict(scores) if not isinstance(scores, pd.Series) else scores, dtype=float).dropna()
    if s.empty:
        raise ValueError("select_percentile_samples: no finite sample score")
    out = []
    for q in percentiles:
        target = np.percentile(s.to_numpy(), q)
        out.append((float(q), str((s - target).abs().idxmin())))
    return out


def composite_rgb(
    image: np.ndarray,
    marker_names: Sequence[str],
    markers: Sequence[str],
    colours: Sequence[tuple[float, float, float]] = PANEL_COLOURS,
    clip_percentile: float = 99.0,
    scale: Mapping[str, float] | None = None,
) -> np.ndarray:
    """(h,w,3) colour composite of chosen markers of an (M,h,w) image, in [0,1].

    Each marker is divided by its ``clip_percentile`` (or by ``scale[marker]`` — pass the measured
    image's scales to draw prediction and measurement on the same scale); the colours are combined
    by per-pixel maximum (as in a max-projection overlay), because with seven markers an additive
    blend saturates to white/yellow wherever several are expressed. Missing markers are skipped.
    """
    img = np.asarray(image, dtype=np.float64)
    index = {m: i for i, m in enumerate(marker_names)}
    rgb = np.zeros((*img.shape[1:], 3))
    for k, m in enumerate(markers):
        if m not in index:
            log.warning("composite_rgb: marker %s not in the panel; skipped", m)
            continue
        ch = np.nan_to_num(img[index[m]])
        hi = scale[m] if scale is not None and m in scale else np.percentile(ch, clip_percentile)
        ch = np.clip(ch / hi, 0, 1) if hi > 0 else np.zeros_like(ch)
        rgb = np.maximum(rgb, ch[..., None] * np.asarray(colours[k % len(colours)])[None, None])
    return np.clip(rgb, 0, 1)


def marker_scales(image: np.ndarray, marker_names: Sequence[str], markers: Sequence[str], q: float = 99.0) -> dict[str, float]:
    index = {m: i for i, m in enumerate(marker_names)}
    return {m: float(np.percentile(np.nan_to_num(image[index[m]]), q)) for m in markers if m in index}


@dataclass
class SamplePanel:
    """What one row of the predicted-vs-measured figure needs."""

    sample_id: str
    he: np.ndarray  # (3,H,W) or (H,W,3) uint8
    truth: np.ndarray  # (M,h,w)
    pred: np.ndarray  # (M,h,w)
    score: float | None = None
    label: str = ""


def plot_predicted_vs_measured(
    panels: Sequence[SamplePanel],
    marker_names: Sequence[str],
    path: str | Path,
    marker_sets: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Rows = samples; columns = H&E, then measured and predicted composites for each marker set
    (default: the paper's structural and immune panels).  Prediction uses the measurement's scale."""
    if not panels:
        raise ValueError("plot_predicted_vs_measured: no sample given")
    sets = dict(marker_sets) if marker_sets is not None else {"structural": STRUCTURAL_PANEL, "immune": IMMUNE_PANEL}
    plt = _plt()
    ncol = 1 + 2 * len(sets)
    fig, axes = plt.subplots(len(panels), ncol, figsize=(2.6 * ncol, 2.6 * len(panels)), squeeze=False)
    for r, p in enumerate(panels):
        he = np.asarray(p.he)
        he = np.moveaxis(he, 0, -1) if he.ndim == 3 and he.shape[0] == 3 else he
        axes[r, 0].imshow(he)
        head = p.label or p.sample_id
        if p.score is not None:
            head += f"\nR={p.score:.3f}"
        axes[r, 0].set_title(f"H&E  {head}", fontsize=8)
        c = 1
        for set_name, markers in sets.items():
            sc = marker_scales(p.truth, marker_names, markers)
            axes[r, c].imshow(composite_rgb(p.truth, marker_names, markers, scale=sc))
            axes[r, c].set_title(f"measured ({set_name})", fontsize=8)
            axes[r, c + 1].imshow(composite_rgb(p.pred, marker_names, markers, scale=sc))
            axes[r, c + 1].set_title(f"predicted ({set_name})", fontsize=8)
            c += 2
    for ax in axes.ravel():
        ax.set_axis_off()
    legend = "; ".join(f"{n}: {', '.join(m for m in ms if m in marker_names)}" for n, ms in sets.items())
    fig.suptitle(legend, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_percentile_samples(
    per_sample: pd.DataFrame,
    load_sample: SampleLoader,
    marker_names: Sequence[str],
    path: str | Path,
    percentiles: Sequence[float] = (99, 75, 50, 25),
) -> Path:
    """Fig. 2A: pick the samples at the given Pearson R percentiles from ``per_sample`` (columns
    ``sample_id``, ``pearson_r``) and plot them; ``load_sample(sample_id) -> (he, truth, pred)``."""
    scores = per_sample.set_index("sample_id")["pearson_r"]
    panels = []
    for q, sid in select_percentile_samples(scores, percentiles):
        he, truth, pred = load_sample(sid)
        panels.append(SamplePanel(sid, he, truth, pred, float(scores[sid]), label=f"p{q:g} {sid}"))
    return plot_predicted_vs_measured(panels, marker_names, path)


def display_factor(shape: Sequence[int], max_px: int = 768) -> int:
    """Downsampling step that brings an image's longest side to at most ``max_px`` for display."""
    return max(1, math.ceil(max(shape) / max_px))


def plot_rosie_percentile_samples(per_sample: pd.DataFrame, marker_names: Sequence[str], load: SampleLoader,
                                  path: Path) -> Path | None:
    """Predicted vs measured for the tissues at ROSIE's per-sample Pearson R percentiles.

    ``per_sample`` is the evaluation's table (columns ``method``, ``tissue_id``, ``pearson_r``);
    only its ``rosie`` rows rank the tissues. ``load`` gives the display-sized images of one tissue
    (read by the caller, e.g. :func:`datamodules.rosie_evaluation_data.percentile_loader`); it is
    called only for the tissues picked, so whole images are never all held at once. None (logged)
    when ROSIE has no per-sample Pearson R.
    """
    rows = per_sample[per_sample["method"] == "rosie"]
    if rows.empty or not rows["pearson_r"].notna().any():
        log.info("predicted-vs-measured figure skipped: no ROSIE per-sample Pearson R")
        return None
    return plot_percentile_samples(rows.rename(columns={"tissue_id": "sample_id"}), load, list(marker_names), path)


def plot_per_marker_methods(per_marker: pd.DataFrame, path: Path, order_by: str = "rosie") -> Path:
    """Grouped bars: Pearson R per marker (sorted by ``order_by``'s R), one colour per method."""
    plt = _plt()
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
    return _save(fig, path)
