"""SCGP: Spatial Cellular Graph Partitioning (Wu et al., "Characterizing tissue structures from spatial
omics with spatial cellular graph partition", bioRxiv 10.1101/2023.09.05.556133), the tissue-structure
method of ROSIE's Fig. 4 (Methods, "Tissue structure discovery").

Why a graph of two kinds of edges: spatial edges make neighbouring cells prefer one partition (a
structure is contiguous tissue), feature edges let distant cells of the same kind join it (a structure
recurs across the slide and across samples). Community detection on the union finds structures that
neither edge kind finds alone.

The method follows the authors' code (``scgp/scgp_wrapper.py: SCGP_wrapper/SCGP_partition``,
``scgp/neighborhood.py``, ``scgp/partition.py``, ``scgp/object_io.py`` of gitlab
enable-medicine-public/scgp, mirrored at github lzx325/scgp); every default below names its source:

- features: ``arcsinh(x / (5 · q20 + 1e-5))`` per marker, then z-scored (sample std), each sample
  separately (``object_io.normalize_biomarker_expression``, applied per region by ``construct_object``);
- spatial edges: Delaunay triangulation of the cell centroids of each sample, keeping edges of at most
  35 µm (``delaunay_distance_cutoff=35``; the authors' coordinates are pixels at 0.3775 µm/px, here they
  are µm). Spatial edges never join two samples;
- feature edges: each cell to its ``feature_knn - 1`` nearest other cells in feature space, made
  symmetric (``feature_knn=5``, built by umap's ``nearest_neighbors`` + ``fuzzy_simplicial_set``,
  whose neighbour list counts the cell itself and whose union keeps an edge found from either end).
  Here the neighbours are exact (a k-d tree) instead of umap's approximate NN-descent: same graph up
  to the rare pairs NN-descent misses, and no numba compilation. Feature edges may join samples;
- weights: every edge, and a self-loop per cell (Delaunay neighbour lists contain the cell itself),
  weighs ``s / (median(s) + 1e-5)`` clipped to [1e-5, 3], with ``s = 1 / max(‖f_i − f_j‖, 1e-5)``
  (``neighborhood.construct_graph``). The self-loops do not change which partition Leiden prefers, but
  they enter the median, as in the authors' graph;
- Leiden with the Constant Potts Model (CPM), leidenalg's default two iterations, seeded. The
  resolution, unless given, is ``RESOLUTION_CELLS / N`` for N cells partitioned together (see
  :func:`default_resolution`);
- clean-up: partitions of at most ``max(1, 0.002 · N)`` cells become unassigned (-1), then one pass
  (``smooth_iter=1``) of spatial smoothing with ``smooth_level=1`` (the DKD example; wrapper default
  0), then small partitions are removed again (``partition.remove_isolated_patch`` and
  ``smooth_spatially_isolated_patch``).

Departures. (1) The default resolution scales with the number of cells. The authors pick an absolute
CPM resolution per project: 3e-4 for their DKD-kidney example (regions 000 and 011 together, 16,092
cells; ``Example.ipynb``), 1e-5 for ROSIE's 281 TMA cores (about 0.8 M cells,
judging by the 2.39 M spatial edges its ``preprocess_codex_data.ipynb`` prints), 1e-3 as the wrapper default. Under CPM two groups of a and b cells
merge when the edge weight between them exceeds ``resolution · a · b``; that weight grows with the
number of cells and the threshold with its square, so a fixed resolution splits a large joint graph
into more structures than one region alone (one DKD region at 3e-4 gives 3-4 structures where the
published partition has 5, at 1e-4 a single one). Holding ``resolution · N`` at the DKD example's value (3e-4 × 16,092 ≈ 4.8, close to
ROSIE's 1e-5 × 0.8 M ≈ 8) keeps the structure scale alike for one region or many; an explicit
``resolution`` is used as given, as in the authors' code. (2) Partitions are renumbered 0, 1, ... by
decreasing size after the clean-up (the authors keep Leiden's numbers, with gaps where small
partitions were removed).

Comparing two partitions of the same cells (:func:`match_partitions`, :func:`partition_scores`)
follows ROSIE's Fig. 4b: ARI per sample needs no labels; F1 needs the predicted partitions mapped
one-to-one onto the reference labels first, and gets a bootstrap 95 % CI over cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import igraph as ig
import leidenalg as la
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score

from analysis.cell_graphs import delaunay_edges, sample_array

#: Label of cells in no partition (removed small partitions, undecided smoothing), as in SCGP.
UNASSIGNED = -1
#: Spatial-edge length cutoff, µm (``SCGP_wrapper(delaunay_distance_cutoff=35)``).
DELAUNAY_CUTOFF_UM = 35.0
#: Pixel size of the authors' CODEX coordinates (``SCGP_wrapper(pixel_resolution=0.3775)``), µm/px.
SCGP_UM_PER_PX = 0.3775
#: ``resolution · cells`` of the authors' DKD-kidney example: ``rp=3e-4`` on regions 000 + 011 together
#: (5,387 + 10,705 cells; ``Example.ipynb``).
RESOLUTION_CELLS = 3e-4 * (5387 + 10705)
#: Feature neighbours counting the cell itself (``SCGP_wrapper(feature_knn=5)``).
FEATURE_KNN = 5
#: A partition of at most this fraction of all cells is noise (``remove_isolated_patch``: 0.2 %).
MIN_PARTITION_FRACTION = 0.002


def default_resolution(n_cells: int) -> float:
    """CPM resolution for ``n_cells`` partitioned together: ``RESOLUTION_CELLS / n_cells`` (module doc)."""
    return RESOLUTION_CELLS / max(int(n_cells), 1)


def normalize_expression(expression: np.ndarray, sample_ids: np.ndarray | None = None) -> np.ndarray:
    """The authors' arcsinh + z-score of raw per-cell intensities, per sample.

    Why the cofactor ``5 · q20``: it puts each marker's background (its 20th percentile) in the linear
    part of arcsinh, so dim and bright markers count alike after the z-score. A marker that is constant
    within a sample becomes 0 there instead of NaN.
    """
    x = np.asarray(expression, dtype=np.float64)
    samples = sample_array(sample_ids, len(x))
    out = np.empty_like(x)
    for sample in np.unique(samples):
        rows = samples == sample
        block = np.arcsinh(x[rows] / (5.0 * np.quantile(x[rows], 0.2, axis=0) + 1e-5))
        std = block.std(axis=0, ddof=1) if rows.sum() > 1 else np.zeros(x.shape[1])
        out[rows] = (block - block.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return out


def spatial_edges(xy_um: np.ndarray, sample_ids: np.ndarray | None = None,
                  max_distance_um: float = DELAUNAY_CUTOFF_UM) -> np.ndarray:
    """Undirected Delaunay edges (i < j) no longer than ``max_distance_um``, within each sample.

    Why the cutoff: the triangulation also joins cells across empty space (tissue edges, holes,
    lumens), which are not neighbours (:func:`analysis.cell_graphs.delaunay_edges`).
    """
    return delaunay_edges(xy_um, sample_ids, max_edge_um=max_distance_um)


def feature_edges(features: np.ndarray, feature_knn: int = FEATURE_KNN) -> np.ndarray:
    """Undirected edges (i < j) from each cell to its ``feature_knn - 1`` nearest other cells."""
    f = np.asarray(features, dtype=np.float64)
    n_other = min(feature_knn - 1, len(f) - 1)
    if n_other < 1:
        return np.empty((0, 2), np.int64)
    _, nbr = cKDTree(f).query(f, k=n_other + 1, workers=-1)
    rows = np.arange(len(f))[:, None]
    # drop the cell itself (the first hit, unless an identical cell came first), keep n_other others
    is_self = nbr == rows
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), n_other)
    keep = np.ones_like(nbr, dtype=bool)
    keep[np.arange(len(f)), drop] = False
    src = np.broadcast_to(rows, nbr.shape)[keep]
    return _unique_pairs(np.stack([src, nbr[keep]], axis=1), len(f))


def edge_weights(features: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The authors' weight: inverse feature distance over its median, clipped to [1e-5, 3]."""
    f = np.asarray(features, dtype=np.float64)
    dist = np.linalg.norm(f[edges[:, 0]] - f[edges[:, 1]], axis=1)
    similarity = 1.0 / np.clip(dist, 1e-5, None)
    return np.clip(similarity / (np.median(similarity) + 1e-5), 1e-5, 3.0)


def scgp_partition(xy_um: np.ndarray, features: np.ndarray, sample_ids: np.ndarray | None = None, *,
                   resolution: float | None = None, feature_knn: int = FEATURE_KNN,
                   max_distance_um: float = DELAUNAY_CUTOFF_UM, smooth_level: int = 1, smooth_iter: int = 1,
                   normalize: bool = True, n_iterations: int = 2, seed: int = 0) -> np.ndarray:
    """SCGP partition label per cell (0, 1, ... by decreasing size; ``UNASSIGNED`` = -1).

    ``xy_um``: (N, 2) centroids in µm; ``features``: (N, M) raw per-cell expression (``normalize=True``
    applies the authors' per-sample arcsinh + z-score) or already-normalised features; ``sample_ids``:
    one id per cell, to partition several samples jointly (one label set; spatial edges stay within a
    sample). ``resolution``: CPM resolution, None for :func:`default_resolution` of N. Deterministic
    for a given ``seed``.
    """
    xy = np.asarray(xy_um, dtype=np.float64)
    f = np.asarray(features, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or f.ndim != 2 or len(f) != len(xy):
        raise ValueError(f"scgp_partition: need xy (N, 2) and features (N, M) for the same cells, got "
                         f"{xy.shape} and {f.shape}")
    if not (np.isfinite(xy).all() and np.isfinite(f).all()):
        raise ValueError("scgp_partition: coordinates and features must be finite (no NaN or inf)")
    if resolution is None:
        resolution = default_resolution(len(xy))
    if resolution <= 0 or feature_knn < 1 or max_distance_um <= 0 or smooth_level < 0 or smooth_iter < 0:
        raise ValueError("scgp_partition: resolution and max_distance_um must be > 0, feature_knn >= 1, "
                         "smooth_level and smooth_iter >= 0")
    n = len(xy)
    if n == 0:
        return np.empty(0, np.int64)
    samples = sample_array(sample_ids, n)
    feats = normalize_expression(f, samples) if normalize else f
    spatial = spatial_edges(xy, samples, max_distance_um)
    loops = np.repeat(np.arange(n)[:, None], 2, axis=1)
    edges = _unique_pairs(np.concatenate([spatial, feature_edges(feats, feature_knn), loops]), n)
    graph = ig.Graph(n=n, edges=edges.tolist())
    part = la.find_partition(graph, la.CPMVertexPartition, weights=edge_weights(feats, edges).tolist(),
                             resolution_parameter=resolution, n_iterations=n_iterations, seed=seed)
    labels = remove_small_partitions(np.asarray(part.membership, dtype=np.int64))
    indptr, indices = _adjacency(spatial, n)
    for _ in range(smooth_iter):
        labels = smooth_isolated_cells(labels, indptr, indices, smooth_level)
    return _renumber_by_size(remove_small_partitions(labels))


def remove_small_partitions(labels: np.ndarray, min_fraction: float = MIN_PARTITION_FRACTION) -> np.ndarray:
    """Partitions of at most ``max(1, min_fraction · N)`` cells become unassigned (noise, not structure)."""
    labels = np.array(labels, dtype=np.int64, copy=True)
    values, counts = np.unique(labels, return_counts=True)
    small = values[(counts <= max(1.0, min_fraction * len(labels))) & (values != UNASSIGNED)]
    labels[np.isin(labels, small)] = UNASSIGNED
    return labels


def smooth_isolated_cells(labels: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                          smooth_level: int = 1) -> np.ndarray:
    """One pass of the authors' spatial smoothing, cell by cell in order (updates are seen at once).

    A cell with at least two spatial neighbours, of which at most ``smooth_level`` share its partition,
    takes the partition that at least half of its assigned neighbours share (the largest label wins a
    tie), or becomes unassigned. Why: a lone cell inside another structure is a cell-type outlier, not
    a structure of its own.
    """
    labels = np.array(labels, dtype=np.int64, copy=True)
    for cell in range(len(labels)):
        nbrs = labels[indices[indptr[cell]:indptr[cell + 1]]]
        if len(nbrs) < 2 or np.count_nonzero(nbrs == labels[cell]) > smooth_level:
            continue
        assigned = nbrs[nbrs != UNASSIGNED]
        if len(assigned) == 0:
            labels[cell] = UNASSIGNED
            continue
        values, counts = np.unique(assigned, return_counts=True)
        best = len(counts) - 1 - int(np.argmax(counts[::-1]))  # the largest label among the most frequent
        labels[cell] = values[best] if counts[best] >= 0.5 * len(assigned) else UNASSIGNED
    return labels


@dataclass(frozen=True)
class PartitionMatch:
    """A one-to-one assignment of predicted partitions to reference labels."""

    mapping: dict[int, int]  # predicted partition -> reference label (UNASSIGNED when left over)
    mapped: np.ndarray  # per cell: the reference label its predicted partition was given
    contingency: pd.DataFrame  # cells per predicted partition (rows) and reference label (columns)


def match_partitions(pred: np.ndarray, ref: np.ndarray) -> PartitionMatch:
    """Map predicted partitions one-to-one onto reference labels, maximising the cells they share.

    Why one-to-one (Hungarian assignment on the contingency table, not each partition to its
    majority label): two predicted partitions must not both claim one structure, or F1 would reward
    over-splitting. Predicted partitions left over (more partitions than labels) map to UNASSIGNED;
    unassigned cells on either side take no part in the assignment.
    """
    pred, ref = _label_pair(pred, ref)
    keep = (pred != UNASSIGNED) & (ref != UNASSIGNED)
    rows, cols = np.unique(pred[pred != UNASSIGNED]), np.unique(ref[ref != UNASSIGNED])
    table = np.zeros((len(rows), len(cols)), dtype=np.int64)
    np.add.at(table, (np.searchsorted(rows, pred[keep]), np.searchsorted(cols, ref[keep])), 1)
    mapping = {int(r): UNASSIGNED for r in rows}
    if table.size:
        for i, j in zip(*linear_sum_assignment(table, maximize=True)):
            mapping[int(rows[i])] = int(cols[j])
    mapped = np.array([mapping.get(int(p), UNASSIGNED) for p in pred], dtype=np.int64)
    contingency = pd.DataFrame(table, index=pd.Index(rows, name="predicted"), columns=pd.Index(cols, name="reference"))
    return PartitionMatch(mapping, mapped, contingency)


def f1_per_label(ref: np.ndarray, mapped: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """F1 of each reference label over cells with an assigned reference (a cell left unassigned by
    the prediction counts as missed); NaN for a label with no reference cell."""
    ref, mapped = _label_pair(ref, mapped)
    keep = ref != UNASSIGNED
    return _f1_from_confusion(_confusion(ref[keep], mapped[keep], labels))


def partition_scores(pred: np.ndarray, ref: np.ndarray, sample_ids: np.ndarray | None = None, *,
                     n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, PartitionMatch]:
    """ARI and F1 of ``pred`` against ``ref`` per sample, plus an ``all`` row when there are several.

    ARI (sklearn ``adjusted_rand_score``) is taken over all cells of a sample, unassigned cells
    forming one more group; the ``all`` row holds the mean over samples, as the paper reports.
    F1 compares reference labels with the predicted partitions mapped by :func:`match_partitions`,
    one mapping for all samples (they share one label set when partitioned jointly): ``f1_<label>``
    per label (NaN where the sample has no cell of that label) and their mean ``f1_macro`` over the
    labels present, with a percentile bootstrap 95 % CI over cells (``n_boot``
    resamples, seeded). Resampling n cells with replacement draws the confusion counts from a
    multinomial, so each resample costs O(labels²) whatever the number of cells.
    """
    pred, ref = _label_pair(pred, ref)
    samples = sample_array(sample_ids, len(pred))
    match = match_partitions(pred, ref)
    labels = np.unique(ref[ref != UNASSIGNED])
    rng = np.random.default_rng(seed)
    groups = [(str(s), samples == s) for s in np.unique(samples)]
    if len(groups) > 1:
        groups.append(("all", np.ones(len(pred), dtype=bool)))
    rows = []
    for name, rows_of in groups:
        keep = rows_of & (ref != UNASSIGNED)
        confusion = _confusion(ref[keep], match.mapped[keep], labels)
        f1 = _f1_from_confusion(confusion)
        boot = _bootstrap_macro_f1(confusion, n_boot, rng)
        ari = (np.mean([r["ari"] for r in rows]) if name == "all"
               else adjusted_rand_score(ref[rows_of], pred[rows_of]))
        rows.append({"sample": name, "n_cells": int(rows_of.sum()), "ari": float(ari),
                     "f1_macro": _macro(f1),
                     "f1_macro_ci_low": boot[0], "f1_macro_ci_high": boot[1],
                     **{f"f1_{label}": float(v) for label, v in zip(labels, f1)}})
    return pd.DataFrame(rows), match


def plot_partition_maps(xy: np.ndarray, partitions: Mapping[str, np.ndarray], path: str | Path, *,
                        title: str | None = None, label_names: Mapping[int, str] | None = None) -> Path:
    """One map per partition set, side by side (e.g. measured / ROSIE / morphology), cells as dots.

    A label has the same colour in every panel, so after :func:`match_partitions` a structure found
    by both sets looks the same; unassigned cells are light grey. y grows downwards, as in the image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xy = np.asarray(xy, dtype=np.float64)
    labels = sorted({int(v) for p in partitions.values() for v in np.unique(p)} - {UNASSIGNED})
    palette = [plt.get_cmap("tab10")(i) for i in range(10) if i != 7]  # tab10's grey would read as unassigned
    palette += [plt.get_cmap("tab20")(i) for i in range(1, 20, 2) if i != 15]
    colours = {lab: palette[i % len(palette)] for i, lab in enumerate(labels)}
    colours[UNASSIGNED] = (0.85, 0.85, 0.85, 1.0)
    size = float(np.clip(20000.0 / max(len(xy), 1), 0.5, 20.0))
    fig, axes = plt.subplots(1, len(partitions), figsize=(5 * len(partitions) + 1.5, 5), squeeze=False)
    for ax, (name, part) in zip(axes[0], partitions.items()):
        part = np.asarray(part, dtype=np.int64)
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=[colours[int(v)] for v in part], linewidths=0)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
    names = dict(label_names or {})
    handles = [Line2D([], [], marker="o", ls="", color=colours[lab], label=names.get(lab, str(lab)))
               for lab in [*labels, UNASSIGNED]]
    handles[-1].set_label("unassigned")
    fig.legend(handles=handles, loc="center right", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _label_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two partitions of the same cells needed (1-D, same length), got {a.shape} and {b.shape}")
    if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise ValueError("partition labels must be integers (UNASSIGNED = -1); encode named labels first")
    return a.astype(np.int64), b.astype(np.int64)


def _confusion(ref: np.ndarray, mapped: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, K + 1) cell counts: reference label × mapped label, the last column for any other value."""
    k = len(labels)
    r = np.searchsorted(labels, ref)
    m = np.searchsorted(labels, mapped)
    m = np.where((m < k) & (labels[np.minimum(m, k - 1)] == mapped), m, k) if k else m
    return np.bincount(r * (k + 1) + m, minlength=k * (k + 1)).reshape(k, k + 1)


def _f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """F1 per reference label; NaN for a label with no reference cells (absent from that sample)."""
    k = confusion.shape[0]
    tp = np.diagonal(confusion[:, :k]).astype(np.float64)
    denom = confusion[:, :k].sum(axis=0) + confusion.sum(axis=1)  # predicted + true = 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return np.where(confusion.sum(axis=1) > 0, f1, np.nan)


def _macro(f1: np.ndarray) -> float:
    present = f1[~np.isnan(f1)]
    return float(present.mean()) if len(present) else float("nan")


def _bootstrap_macro_f1(confusion: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    n = int(confusion.sum())
    if n == 0 or n_boot < 1 or confusion.shape[0] == 0:
        return float("nan"), float("nan")
    draws = rng.multinomial(n, confusion.ravel() / n, size=n_boot).reshape(n_boot, *confusion.shape)
    macro = np.array([_macro(_f1_from_confusion(d)) for d in draws])
    low, high = np.nanpercentile(macro, [2.5, 97.5])
    return float(low), float(high)


def _unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique undirected pairs (i <= j), so the graph does not depend on how edges were found."""
    pairs = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


def _adjacency(edges: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR neighbour lists (without self) of undirected ``edges``."""
    edges = edges[edges[:, 0] != edges[:, 1]]
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    order = np.lexsort((dst, src))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))])
    return indptr, dst[order]


def _renumber_by_size(labels: np.ndarray) -> np.ndarray:
    values, counts = np.unique(labels[labels != UNASSIGNED], return_counts=True)
    order = values[np.lexsort((values, -counts))]
    lookup = {int(v): i for i, v in enumerate(order)}
    return np.array([lookup.get(int(v), UNASSIGNED) for v in labels], dtype=np.int64)
