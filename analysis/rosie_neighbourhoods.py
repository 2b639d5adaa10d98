"""Cell neighbourhood phenotypes of the ROSIE paper: lymphocyte-neighbouring epithelial cells (LNEs) and
tumour-infiltrating lymphocytes (TILs) (Methods, "Cell neighborhood phenotyping"; Fig. 5).

Why: a cell type alone does not show tumour-immune contact; the paper asks whether labels from
ROSIE-predicted expression give the same per-sample LNE and TIL numbers as labels from measured CODEX.
Each step and the sentence it implements:

- **Graph** — "Based on the computed cell centroids, we then construct a Delaunay triangulation ...
  a graph with cells as nodes and Delaunay neighbors as edges" (:func:`delaunay_edges`): one
  triangulation per sample (samples never touch), edges as unique pairs ``i < j``. The paper gives
  no length cutoff, so by default none is applied (``max_edge_um=None``); a cutoff in µm drops edges
  across empty tissue (SCGP uses 35 µm). Degenerate samples: 2 cells are one edge; collinear cells
  are joined to their neighbours along the line (the limit of the triangulation); a cell at exactly
  the position of another (left out by Qhull) is joined to that cell.
- **LNE** — "we identify epithelial cells and then find the subset of these cells that share an edge
  with a lymphocyte (B cell or T cell). The reported percentage of LNEs is defined as the proportion
  of epithelial cells in a sample that are LNEs" (:func:`lne_mask`, :func:`neighbourhood_table`);
  a sample without epithelial cells has no proportion (NaN), not 0.
- **TIL** — "we find lymphocytes that are assigned to epithelial tissue structures. For each sample,
  we report the raw count of TILs" (:func:`til_mask`). Structures are SCGP partitions given as one
  label per cell (``analysis.scgp``: one label set shared by all samples, ``-1`` = unassigned, never
  epithelial); which partitions are epithelial is the manual annotation step of SCGP, here
  :func:`epithelial_partitions`: a partition whose cells are at least half epithelial (pooled over
  all samples, assigned cells only), i.e. epithelial cells are its majority type. Partitions labelled
  per sample (the same number meaning different structures in different samples) must be made unique
  first, e.g. ``f"{sample}:{partition}"``.
- **Agreement** — "Scatter plots of predicted and ground truth measurements, where each dot
  represents a sample", with Pearson and Spearman R (:func:`compare_across_samples`,
  :func:`plot_neighbourhood_scatter`); samples where either side is NaN are left out, and R needs 3
  samples with non-constant values (else NaN).

The labels are the cell types of :mod:`analysis.rosie_phenotyping` (``"epithelial"``, ``"B cells"``,
``"T cells"``); measured and predicted labels are scored on the same cells and the same graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

from analysis.cell_graphs import sample_array
from analysis.rosie_phenotyping import EPITHELIAL, LYMPHOCYTES

log = logging.getLogger(__name__)

#: SCGP's label of cells in no partition (``analysis.scgp.UNASSIGNED``).
UNASSIGNED = -1
#: A partition is epithelial when at least this fraction of its cells is epithelial.
EPITHELIAL_PARTITION_FRACTION = 0.5
NEIGHBOURHOOD_COLUMNS = ["sample_id", "n_cells", "n_epithelial", "n_lymphocytes", "n_lne", "lne_proportion",
                         "n_til"]


def lne_mask(labels: np.ndarray, edges: np.ndarray, *, epithelial: str = EPITHELIAL,
             lymphocytes: Sequence[str] = LYMPHOCYTES) -> np.ndarray:
    """Boolean per cell: epithelial and sharing at least one edge with a lymphocyte."""
    labels = np.asarray(labels).astype(str)
    e = _check_edges(edges, len(labels))
    lymph = np.isin(labels, list(lymphocytes))
    touches = np.zeros(len(labels), bool)
    touches[e[lymph[e[:, 1]], 0]] = True
    touches[e[lymph[e[:, 0]], 1]] = True
    return (labels == epithelial) & touches


def epithelial_partitions(partitions: np.ndarray, labels: np.ndarray, *,
                          min_fraction: float = EPITHELIAL_PARTITION_FRACTION, epithelial: str = EPITHELIAL,
                          unassigned: object = UNASSIGNED) -> np.ndarray:
    """Partition ids (sorted) whose cells are at least ``min_fraction`` epithelial; ``unassigned`` never."""
    parts, labels = np.asarray(partitions), np.asarray(labels).astype(str)
    if parts.shape != labels.shape or parts.ndim != 1:
        raise ValueError(f"partitions and labels must be 1-D of equal length, got {parts.shape}, {labels.shape}")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    frac = pd.Series(labels == epithelial).groupby(parts).mean()
    frac = frac[frac.index != unassigned]
    return np.asarray(sorted(frac.index[frac >= min_fraction]))


def til_mask(labels: np.ndarray, partitions: np.ndarray, epithelial_ids: Sequence[object], *,
             lymphocytes: Sequence[str] = LYMPHOCYTES) -> np.ndarray:
    """Boolean per cell: a lymphocyte in one of the ``epithelial_ids`` partitions."""
    labels, parts = np.asarray(labels).astype(str), np.asarray(partitions)
    if parts.shape != labels.shape:
        raise ValueError(f"partitions must have one entry per cell ({len(labels)}), got {parts.shape}")
    return np.isin(labels, list(lymphocytes)) & pd.Series(parts).isin(list(epithelial_ids)).to_numpy()


def neighbourhood_table(labels: np.ndarray, edges: np.ndarray, sample_ids: np.ndarray,
                        partitions: np.ndarray | None = None, epithelial_ids: Sequence[object] | None = None, *,
                        epithelial: str = EPITHELIAL, lymphocytes: Sequence[str] = LYMPHOCYTES) -> pd.DataFrame:
    """Per sample (Fig. 5): cell counts, LNE count and proportion, TIL count.

    ``labels``: cell type per cell; ``edges``: :func:`delaunay_edges` of the same cells; ``partitions``
    and ``epithelial_ids`` (default :func:`epithelial_partitions` of these labels): SCGP structures,
    or None for no TIL column values (NaN). Columns :data:`NEIGHBOURHOOD_COLUMNS`.
    """
    labels = np.asarray(labels).astype(str)
    samples = sample_array(sample_ids, len(labels))
    lne = lne_mask(labels, edges, epithelial=epithelial, lymphocytes=lymphocytes)
    til = np.full(len(labels), np.nan)
    if partitions is not None:
        if epithelial_ids is None:
            epithelial_ids = epithelial_partitions(partitions, labels, epithelial=epithelial)
        til = til_mask(labels, partitions, epithelial_ids, lymphocytes=lymphocytes).astype(float)
    cells = pd.DataFrame({"sample_id": samples, "n_cells": 1, "n_epithelial": labels == epithelial,
                          "n_lymphocytes": np.isin(labels, list(lymphocytes)), "n_lne": lne, "n_til": til})
    out = cells.groupby("sample_id", sort=True).sum(min_count=1).reset_index()
    for col in ("n_epithelial", "n_lymphocytes", "n_lne", *(("n_til",) if partitions is not None else ())):
        out[col] = out[col].astype(np.int64)
    out["lne_proportion"] = np.where(out["n_epithelial"] > 0, out["n_lne"] / out["n_epithelial"].clip(lower=1),
                                     np.nan)
    return out[NEIGHBOURHOOD_COLUMNS]


def compare_across_samples(measured: pd.Series, predicted: pd.Series) -> dict[str, float]:
    """Pearson and Spearman R between per-sample values (indexed by sample id) of measured and predicted.

    Returns ``{"n_samples", "pearson_r", "pearson_p", "spearman_r", "spearman_p"}``.
    """
    both = pd.concat([measured.rename("m"), predicted.rename("p")], axis=1, join="inner").dropna()
    out: dict[str, float] = {"n_samples": float(len(both)), "pearson_r": np.nan, "pearson_p": np.nan,
                             "spearman_r": np.nan, "spearman_p": np.nan}
    if len(both) >= 3 and both["m"].nunique() > 1 and both["p"].nunique() > 1:
        pr, sr = pearsonr(both["m"], both["p"]), spearmanr(both["m"], both["p"])
        out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue), spearman_r=float(sr.statistic),
                   spearman_p=float(sr.pvalue))
    return out


def compare_neighbourhoods(measured: pd.DataFrame, predicted: pd.DataFrame,
                           columns: Sequence[str] = ("n_til", "lne_proportion")) -> pd.DataFrame:
    """One row per phenotype column: :func:`compare_across_samples` of two :func:`neighbourhood_table` s."""
    m, p = measured.set_index("sample_id"), predicted.set_index("sample_id")
    return pd.DataFrame([{"phenotype": c, **compare_across_samples(m[c], p[c])} for c in columns])


def plot_neighbourhood_scatter(measured: pd.DataFrame, predicted: pd.DataFrame, path: str | Path, *,
                               columns: Sequence[str] = ("n_til", "lne_proportion"),
                               method: str = "ROSIE") -> Path:
    """Fig. 5B: predicted vs measured per sample, one panel per column, identity line, R in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"n_til": "TILs (count per sample)", "lne_proportion": "LNEs (fraction of epithelial cells)"}
    m, p = measured.set_index("sample_id"), predicted.set_index("sample_id")
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        both = pd.concat([m[col].rename("m"), p[col].rename("p")], axis=1, join="inner").dropna()
        stats = compare_across_samples(m[col], p[col])
        ax.scatter(both["m"], both["p"], s=14, alpha=0.8)
        hi = float(np.nanmax([both["m"].max(), both["p"].max(), 0])) if len(both) else 1.0
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("measured")
        ax.set_ylabel(method)
        ax.set_title(f"{titles.get(col, col)}\nPearson {stats['pearson_r']:.3f}, Spearman {stats['spearman_r']:.3f}",
                     fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _check_edges(edges: np.ndarray, n: int) -> np.ndarray:
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(e) and (e.min() < 0 or e.max() >= n):
        raise ValueError(f"edges must index the {n} cells (0..{n - 1}), got values {e.min()}..{e.max()}")
    return e
