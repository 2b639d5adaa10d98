"""Cell phenotyping with ROSIE-predicted expression (ROSIE paper, Methods "Cell phenotyping", "Baseline
methods" (*bulk phenotyping*), Fig. 3, Supplementary Fig. 4).

Why: predicted expression is useful if it gives the cell types measured CODEX gives. Each step, the
sentence it implements, and the choices where the paper is silent:

1. "cell clusters are produced using Leiden clustering based on the cell-level CODEX measured
   expressions" (:func:`leiden_clusters`). Features (:class:`ExpressionScaler`): ``log1p(max(x, 0))``
   (right-skewed intensities; ``log1p=False`` for data already on a log scale), z-scored with the
   statistics of all measured cells, clipped at +-10 SD (scanpy's ``pp.scale(max_value=10)``). PCA
   (``min(20, M - 1)`` components, arpack), 15-neighbour graph (exact below 20,000 cells, NN-descent
   above: exact search is quadratic, and scanpy's own NN-descent path fails on scipy sparse arrays),
   scanpy's umap connectivities, ``sc.tl.leiden`` at resolution 1; all seeded. Flavor ``"igraph"``
   (2 iterations) by default: the same Leiden algorithm and modularity objective as leidenalg, ~10x
   faster on 1e5 cells; ``flavor="leidenalg"`` runs leidenalg to convergence (scanpy's old default).
2. "These clusters are identified and merged based on cell expression within each cluster to produce
   manually annotated cell labels" (:func:`annotate_clusters`): the manual step is an editable marker
   -> type table (:data:`DEFAULT_TYPE_MARKERS`, :func:`load_type_markers`). A cluster's score for a
   type = mean over the type's markers of the cluster's mean z-score; the best type wins if its score
   is >= ``min_score`` (0.5 SD above the all-cell mean), else the cluster is ``"other"``; clusters of
   one type merge. The user's own labels may replace steps 1-2.
3. "k-nearest neighbors algorithm (where k=100) ... used to automatically generate the reference cell
   labels. To prevent class imbalance, we sample from each cell label class with equal proportion ...
   the same kNN and the predicted expressions to generate the predicted cell labels ... only the top 24
   biomarkers by Pearson correlation" (:func:`top_markers_by_pearson`, :func:`balanced_sample`,
   :class:`KnnPhenotyper`). Every class, ``"other"`` included (so the kNN can say "none of the
   seven"), gets ``min(smallest class, 2000)`` training cells without replacement (2000 = 20 k votes'
   worth; prediction of 1e5 cells stays at seconds). One :class:`ExpressionScaler` fitted on all
   measured cells (24 markers) scales measured, ROSIE and morphology-baseline expression alike
   (negative predictions clip to 0 before ``log1p``). Euclidean, uniform votes, ties to the
   alphabetically first label (sklearn).
4. F1 "relative to the cell typing determined using clustering on the CODEX measurements", "mean values
   with ... 95% bootstrapped confidence intervals" (:func:`f1_with_ci`): F1 on all cells; CI = 2.5th
   and 97.5th percentiles of 1,000 resamples of the cells, drawn as one multinomial over the confusion
   matrix (the same distribution as resampling cell indices, as F1 sees cells only through that
   matrix; milliseconds for any N). Macro-F1 = mean over the scored types present in the reference (a
   type the reference lacks has no defined recall: it is listed with F1 NaN, or 0 when a method
   predicts it, and left out of the macro); ``"other"`` is never scored but is a miss for the others.
5. Bulk phenotyping: "assign cell labels randomly according to the average ground truth cell label
   proportions across all samples" (:func:`bulk_phenotype_labels`): unweighted mean of per-sample
   proportions, one seeded draw per cell.

Marker names match ignoring case and punctuation; aliases are resolved in ``datamodules.markers``
(pass canonical names). :func:`phenotype_cells` runs all steps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import yaml
from pynndescent import NNDescent
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.neighbors import KNeighborsClassifier

log = logging.getLogger(__name__)

CELL_TYPES: tuple[str, ...] = ("B cells", "endothelial", "epithelial", "fibroblasts", "macrophages",
                               "neutrophils", "T cells")
OTHER = "other"
EPITHELIAL = "epithelial"
LYMPHOCYTES: tuple[str, ...] = ("B cells", "T cells")
MACRO = "macro"
#: Editable marker -> type table (all names are in ``datamodules.markers.ROSIE_PANEL``).
DEFAULT_TYPE_MARKERS: dict[str, tuple[str, ...]] = {
    "T cells": ("CD3e", "CD4", "CD8"),
    "B cells": ("CD20", "CD79a"),
    "epithelial": ("PanCK", "ECad", "EpCAM", "Keratin8/18"),
    "endothelial": ("CD31", "CD34"),
    "fibroblasts": ("aSMA", "Vimentin", "Podoplanin"),
    "macrophages": ("CD68", "CD163", "CD14"),
    "neutrophils": ("MPO", "CD66"),
}
KNN_K = 100
TOP_MARKERS = 24
MAX_PER_CLASS = 2000
EXACT_KNN_BELOW = 20_000


def _squash(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def marker_columns(marker_names: Sequence[str], wanted: Sequence[str], *, strict: bool = True) -> list[int]:
    """Column of each ``wanted`` marker in ``marker_names``; missing ones raise (``strict``) or are skipped."""
    index = {_squash(m): i for i, m in enumerate(marker_names)}
    missing = [m for m in wanted if _squash(m) not in index]
    if missing and strict:
        raise ValueError(f"markers {missing} are not among the expression columns {list(marker_names)}")
    return [index[_squash(m)] for m in wanted if _squash(m) in index]


def _check_expression(x: np.ndarray, marker_names: Sequence[str] | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or (marker_names is not None and x.shape[1] != len(marker_names)):
        raise ValueError(f"expression must be (cells, markers) with one column per marker name, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("expression must be finite (no NaN or inf); drop or impute those cells first")
    return x


def load_type_markers(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Read a marker -> type table: YAML ``{type: [marker, ...]}`` or CSV with columns ``cell_type, marker``."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{path}: expected a mapping cell type -> list of markers")
        table = {str(t): tuple(str(m) for m in ([ms] if isinstance(ms, str) else ms or [])) for t, ms in data.items()}
    elif path.suffix.lower() == ".csv":
        df = pd.read_csv(path)
        if not {"cell_type", "marker"} <= set(df.columns):
            raise ValueError(f"{path}: needs columns cell_type and marker, has {list(df.columns)}")
        table = {str(t): tuple(g["marker"].astype(str)) for t, g in df.groupby("cell_type", sort=False)}
    else:
        raise ValueError(f"{path}: marker table must be .yaml, .yml or .csv")
    if empty := [t for t, ms in table.items() if not ms]:
        raise ValueError(f"{path}: cell types {empty} have no markers")
    return table


@dataclass(frozen=True)
class ExpressionScaler:
    """``log1p(max(x, 0))`` (optional), per-marker z-score with fitted statistics, clip at +-``clip``."""

    mean: np.ndarray
    std: np.ndarray
    log1p: bool = True
    clip: float = 10.0

    @classmethod
    def fit(cls, x: np.ndarray, *, log1p: bool = True, clip: float = 10.0) -> ExpressionScaler:
        """Statistics of ``x`` (measured cells); a constant marker gets std 1 (its z-score is 0)."""
        v = _check_expression(x)
        v = np.log1p(np.maximum(v, 0.0)) if log1p else v
        std = v.std(axis=0)
        return cls(v.mean(axis=0), np.where(std > 0, std, 1.0), log1p, clip)

    def transform(self, x: np.ndarray) -> np.ndarray:
        v = _check_expression(x)
        if v.shape[1] != len(self.mean):
            raise ValueError(f"scaler fitted on {len(self.mean)} markers, got {v.shape[1]}")
        v = np.log1p(np.maximum(v, 0.0)) if self.log1p else v
        return np.clip((v - self.mean) / self.std, -self.clip, self.clip)


class _NNDescentKnn(TransformerMixin, BaseEstimator):
    """Seeded NN-descent kNN distance graph as a ``csr_matrix`` (scanpy's ``transformer`` protocol)."""

    def __init__(self, n_neighbors: int = 15, random_state: int = 0) -> None:
        self.n_neighbors, self.random_state = n_neighbors, random_state

    def fit_transform(self, x: np.ndarray, y: object = None, **kwargs: object) -> sparse.csr_matrix:
        idx, dist = NNDescent(x, n_neighbors=self.n_neighbors, random_state=self.random_state).neighbor_graph
        n, k = idx.shape
        return sparse.csr_matrix((dist.ravel(), idx.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


def leiden_clusters(features: np.ndarray, *, n_pcs: int = 20, n_neighbors: int = 15, resolution: float = 1.0,
                    seed: int = 0, flavor: str = "igraph", exact_below: int = EXACT_KNN_BELOW) -> np.ndarray:
    """Leiden cluster (0, 1, ... by decreasing size) per cell of :meth:`ExpressionScaler.transform` output."""
    f = _check_expression(features).astype(np.float32)
    n, m = f.shape
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    adata, rep = ad.AnnData(f), "X_pca" if m > 2 else "X"
    if m > 2:
        sc.pp.pca(adata, n_comps=min(n_pcs, m - 1, n - 1), svd_solver="arpack", random_state=seed)
    k = min(n_neighbors, n - 1)
    transformer = "sklearn" if n < exact_below else _NNDescentKnn(k, seed)
    sc.pp.neighbors(adata, n_neighbors=k, use_rep=rep, random_state=seed, transformer=transformer)
    extra = {"n_iterations": 2, "directed": False} if flavor == "igraph" else {"n_iterations": -1}
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, flavor=flavor, key_added="leiden", **extra)
    raw = adata.obs["leiden"].astype(int).to_numpy()
    order = np.argsort(-np.bincount(raw), kind="stable")
    return np.argsort(order)[raw].astype(np.int64)


def annotate_clusters(features: np.ndarray, clusters: np.ndarray, marker_names: Sequence[str],
                      type_markers: Mapping[str, Sequence[str]] = DEFAULT_TYPE_MARKERS,
                      min_score: float = 0.5) -> tuple[np.ndarray, pd.DataFrame]:
    """(cell type per cell, table per cluster: ``cluster, n_cells, cell_type``, the score of each type).

    ``features``: scaled expression (z-scores). Types with no marker in the panel are skipped (logged).
    """
    f = _check_expression(features, marker_names)
    clusters = np.asarray(clusters)
    if clusters.shape != (len(f),):
        raise ValueError(f"clusters must have one entry per cell ({len(f)}), got {clusters.shape}")
    columns = {t: marker_columns(marker_names, ms, strict=False) for t, ms in type_markers.items()}
    if skipped := [t for t, cols in columns.items() if not cols]:
        log.warning("annotate_clusters: no marker of %s in the panel; those types cannot be assigned", skipped)
    columns = {t: cols for t, cols in columns.items() if cols}
    if not columns:
        raise ValueError(f"no marker of the type table is among the expression columns {list(marker_names)}")
    ids, inverse, counts = np.unique(clusters, return_inverse=True, return_counts=True)
    means = np.stack([np.bincount(inverse, weights=f[:, j], minlength=len(ids)) for j in range(f.shape[1])], 1)
    means /= counts[:, None]
    scores = pd.DataFrame({t: means[:, cols].mean(axis=1) for t, cols in columns.items()})
    best = scores.to_numpy().argmax(axis=1)
    chosen = np.where(scores.to_numpy().max(axis=1) >= min_score, np.asarray(scores.columns)[best], OTHER)
    table = pd.concat([pd.DataFrame({"cluster": ids, "n_cells": counts, "cell_type": chosen}), scores], axis=1)
    return chosen[inverse].astype(object), table


def cluster_reference_labels(measured: np.ndarray, marker_names: Sequence[str], *,
                             type_markers: Mapping[str, Sequence[str]] = DEFAULT_TYPE_MARKERS,
                             min_score: float = 0.5, log1p: bool = True, resolution: float = 1.0,
                             seed: int = 0, **leiden_kwargs: object) -> tuple[np.ndarray, pd.DataFrame]:
    """Steps 1-2: scale measured (cells, markers) expression, Leiden, annotate -> (labels, cluster table)."""
    scaled = ExpressionScaler.fit(measured, log1p=log1p).transform(measured)
    clusters = leiden_clusters(scaled, resolution=resolution, seed=seed, **leiden_kwargs)  # type: ignore[arg-type]
    return annotate_clusters(scaled, clusters, marker_names, type_markers, min_score)


def top_markers_by_pearson(table: pd.DataFrame | Mapping[str, float], k: int = TOP_MARKERS, *,
                           method: str | None = "rosie", exclude: Sequence[str] = ()) -> list[str]:
    """The ``k`` markers of highest Pearson R, best first; NaN skipped, ties by name.

    ``table``: the evaluation's ``per_marker`` or ``per_sample_marker`` table (``marker``, ``pearson_r``,
    optional ``method``: only ``method``'s rows; R averaged per marker), or a mapping marker -> R.
    """
    if isinstance(table, pd.DataFrame):
        if not {"marker", "pearson_r"} <= set(table.columns):
            raise ValueError(f"Pearson table needs columns marker and pearson_r, has {list(table.columns)}")
        if method is not None and "method" in table.columns:
            table = table[table["method"] == method]
        r = table.groupby("marker")["pearson_r"].mean()
    else:
        r = pd.Series(dict(table), dtype=float)
    r = r[~r.index.map(_squash).isin({_squash(m) for m in exclude})].dropna()
    ranked = sorted(r.items(), key=lambda item: (-item[1], str(item[0])))
    if len(ranked) < k:
        log.warning("top_markers_by_pearson: only %d markers have a Pearson R, wanted %d", len(ranked), k)
    return [str(m) for m, _ in ranked[:k]]


def balanced_sample(labels: np.ndarray, n_per_class: int | None = None, *, max_per_class: int = MAX_PER_CLASS,
                    seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n_per_class`` cells of every label (default ``min(smallest class, max_per_class)``)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        raise ValueError("balanced_sample: no labels")
    n = int(min(counts.min(), max_per_class)) if n_per_class is None else int(n_per_class)
    if n < 1 or counts.min() < n:
        raise ValueError(f"balanced_sample: {n} cells per class requested, smallest class "
                         f"{classes[counts.argmin()]!r} has {counts.min()}")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


@dataclass
class KnnPhenotyper:
    """The paper's kNN: fitted once on measured expression, applied to measured and predicted expression."""

    markers: tuple[str, ...]
    scaler: ExpressionScaler
    classifier: KNeighborsClassifier
    train_index: np.ndarray

    @classmethod
    def fit(cls, measured: np.ndarray, marker_names: Sequence[str], labels: np.ndarray, markers: Sequence[str], *,
            k: int = KNN_K, n_per_class: int | None = None, max_per_class: int = MAX_PER_CLASS,
            log1p: bool = True, seed: int = 0) -> KnnPhenotyper:
        """Fit on a class-balanced sample of ``labels`` (one per measured cell) using ``markers`` only."""
        x = _check_expression(measured, marker_names)
        labels = np.asarray(labels).astype(str)
        if labels.shape != (len(x),):
            raise ValueError(f"labels must have one entry per cell ({len(x)}), got {labels.shape}")
        cols = marker_columns(marker_names, markers)
        scaler = ExpressionScaler.fit(x[:, cols], log1p=log1p)
        train = balanced_sample(labels, n_per_class, max_per_class=max_per_class, seed=seed)
        per_class = len(train) // len(np.unique(labels))
        if len(train) < k:
            raise ValueError(f"kNN with k={k} needs at least {k} training cells, the balanced sample has "
                             f"{len(train)} ({per_class} per class); lower k or merge rare labels")
        if per_class < k:
            log.warning("KnnPhenotyper: %d training cells per class < k=%d; votes always mix classes", per_class, k)
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(scaler.transform(x[train][:, cols]),
                                                                          labels[train])
        return cls(tuple(marker_names[i] for i in cols), scaler, clf, train)

    def predict(self, expression: np.ndarray, marker_names: Sequence[str]) -> np.ndarray:
        """Label per cell of (cells, markers) expression, columns found by name."""
        x = _check_expression(expression, marker_names)
        feats = self.scaler.transform(x[:, marker_columns(marker_names, self.markers)])
        return self.classifier.predict(feats).astype(object)


def _encode(reference: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    ref, pred = np.asarray(reference).astype(str), np.asarray(predicted).astype(str)
    if ref.shape != pred.shape or ref.ndim != 1:
        raise ValueError(f"reference and predicted labels must be 1-D of equal length, got {ref.shape}, {pred.shape}")
    names, code = np.unique(np.concatenate([ref, pred]), return_inverse=True)
    labels = list(classes) + sorted(set(names) - set(classes))
    code = np.asarray([labels.index(v) for v in names])[code]  # np.unique's order -> classes first
    cm = np.bincount(code[: len(ref)] * len(labels) + code[len(ref):], minlength=len(labels) ** 2)
    return cm.reshape(len(labels), len(labels)), labels


def f1_from_confusion(confusion: np.ndarray, n_classes: int) -> np.ndarray:
    """F1 of the first ``n_classes`` labels from (..., L, L) counts (rows reference, columns predicted)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)[..., :n_classes].astype(np.float64)
    fp = confusion.sum(axis=-2)[..., :n_classes] - tp
    fn = confusion.sum(axis=-1)[..., :n_classes] - tp
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def scored_types(reference: np.ndarray, predicted: np.ndarray) -> list[str]:
    """Labels to score: the paper's seven types when the labels use them, else every label but ``"other"``."""
    seen = (set(np.unique(np.asarray(reference).astype(str))) | set(np.unique(np.asarray(predicted).astype(str))))
    seen.discard(OTHER)
    return list(CELL_TYPES) if seen <= set(CELL_TYPES) else sorted(seen)


def f1_with_ci(reference: np.ndarray, predicted: np.ndarray, classes: Sequence[str] | None = None, *,
               n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """F1 per type and macro-F1 (last row, ``"macro"``) with bootstrap CIs over cells.

    Columns ``cell_type, f1, ci_low, ci_high, n_reference, n_predicted``; ``classes`` default :func:`scored_types`.
    """
    classes = list(classes) if classes is not None else scored_types(reference, predicted)
    cm, _ = _encode(reference, predicted, classes)
    n, c = int(cm.sum()), len(classes)
    point = f1_from_confusion(cm, c)
    present = cm.sum(1)[:c] > 0
    values = np.append(point, point[present].mean() if present.any() else np.nan)
    values[:c][~present & (cm.sum(0)[:c] == 0)] = np.nan
    low = high = np.full(c + 1, np.nan)
    if n > 0 and n_boot > 0:
        draws = np.random.default_rng(seed).multinomial(n, cm.ravel() / n, size=n_boot).reshape(n_boot, *cm.shape)
        boot = f1_from_confusion(draws, c)
        boot = np.concatenate([boot, boot[:, present].mean(axis=1, keepdims=True)], axis=1)
        alpha = 100 * (1 - ci) / 2
        low, high = np.percentile(boot, [alpha, 100 - alpha], axis=0)
        low[np.isnan(values)] = high[np.isnan(values)] = np.nan
    return pd.DataFrame({"cell_type": [*classes, MACRO], "f1": values, "ci_low": low, "ci_high": high,
                         "n_reference": np.append(cm.sum(1)[:c], n), "n_predicted": np.append(cm.sum(0)[:c], n)})


def score_methods(reference: np.ndarray, predictions: Mapping[str, np.ndarray], classes: Sequence[str] | None = None,
                  *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """:func:`f1_with_ci` for each method (``{"rosie": labels, ...}``), stacked with a ``method`` column."""
    if classes is None:
        classes = scored_types(reference, np.concatenate([np.asarray(p).astype(str) for p in predictions.values()]))
    parts = [f1_with_ci(reference, p, classes, n_boot=n_boot, seed=seed).assign(method=name)
             for name, p in predictions.items()]
    out = pd.concat(parts, ignore_index=True)
    return out[["method", *[c for c in out.columns if c != "method"]]]


def confusion_tables(reference: np.ndarray, predicted: np.ndarray,
                     labels: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(counts, row-normalised) confusion matrices; rows = reference type, columns = predicted type."""
    cm, names = _encode(reference, predicted, scored_types(reference, predicted) if labels is None else list(labels))
    counts = pd.DataFrame(cm, index=pd.Index(names, name="reference"), columns=pd.Index(names, name="predicted"))
    rows = counts.sum(axis=1).to_numpy()[:, None]
    return counts, counts.div(np.where(rows > 0, rows, 1)).astype(float)


def average_label_proportions(labels: np.ndarray, sample_ids: np.ndarray) -> pd.Series:
    """Mean over samples of each sample's label proportions (every sample weighs the same)."""
    labels, samples = np.asarray(labels).astype(str), np.asarray(sample_ids)
    if labels.shape != samples.shape or labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels and sample_ids must be 1-D, non-empty, of equal length; got {labels.shape}, "
                         f"{samples.shape}")
    per_sample = pd.crosstab(samples, labels, normalize="index")
    return per_sample.mean(axis=0).sort_index()


def bulk_phenotype_labels(reference: np.ndarray, sample_ids: np.ndarray, *, seed: int = 0,
                          proportions: Mapping[str, float] | None = None) -> np.ndarray:
    """*Bulk phenotyping*: a label per cell drawn from the average proportions of ``reference`` (or from
    ``proportions``, e.g. of training samples or flow cytometry)."""
    p = pd.Series(dict(proportions), dtype=float) if proportions is not None else \
        average_label_proportions(reference, sample_ids)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"label proportions must be >= 0 with a positive sum, got {p.to_dict()}")
    draws = np.random.default_rng(seed).choice(len(p), size=len(np.asarray(reference)), p=(p / p.sum()).to_numpy())
    return np.asarray(p.index, dtype=object)[draws]


def per_sample_proportions(labels_by_method: Mapping[str, np.ndarray], sample_ids: np.ndarray,
                           cell_type: str = "T cells") -> pd.DataFrame:
    """Per sample: ``n_cells`` and, for each method, the fraction of its cells labelled ``cell_type``."""
    samples = np.asarray(sample_ids)
    out = pd.DataFrame({"sample_id": samples}).groupby("sample_id").size().rename("n_cells").to_frame()
    for name, labels in labels_by_method.items():
        hit = pd.Series(np.asarray(labels).astype(str) == cell_type, index=samples)
        out[name] = hit.groupby(level=0).mean()
    return out.reset_index()


@dataclass
class PhenotypingResult:
    """Everything :func:`phenotype_cells` computed; labels are object arrays aligned with the cells."""

    training_labels: np.ndarray
    cluster_table: pd.DataFrame | None
    markers: list[str]
    reference: np.ndarray
    predicted: dict[str, np.ndarray]
    scores: pd.DataFrame
    confusion: dict[str, tuple[pd.DataFrame, pd.DataFrame]]
    t_cell_proportions: pd.DataFrame


def phenotype_cells(measured: np.ndarray, marker_names: Sequence[str], predictions: Mapping[str, np.ndarray],
                    pearson_table: pd.DataFrame | Mapping[str, float], sample_ids: np.ndarray, *,
                    labels: np.ndarray | None = None,
                    type_markers: Mapping[str, Sequence[str]] = DEFAULT_TYPE_MARKERS, n_markers: int = TOP_MARKERS,
                    k: int = KNN_K, n_boot: int = 1000, log1p: bool = True, resolution: float = 1.0,
                    reference_from_knn: bool = True, seed: int = 0) -> PhenotypingResult:
    """Fig. 3 end to end for the cells of all samples together.

    ``measured``: (cells, markers), columns ``marker_names``; ``predictions``: ``{"rosie": ...,
    "cell_morphology": ...}`` arrays of the same cells and columns; ``pearson_table``: the ROSIE
    evaluation's per-marker table (markers outside ``marker_names`` ignored); ``sample_ids``: one per
    cell; ``labels``: the user's labels, replacing Leiden + annotation. Reference = the kNN's labels of
    the measured cells (``reference_from_knn=False``: the training labels). Adds the ``"bulk"`` method.
    """
    x, table = _check_expression(measured, marker_names), None
    if labels is None:
        labels, table = cluster_reference_labels(x, marker_names, type_markers=type_markers, log1p=log1p,
                                                 resolution=resolution, seed=seed)
    labels = np.asarray(labels).astype(str).astype(object)
    if isinstance(pearson_table, pd.DataFrame):
        panel = {_squash(m) for m in marker_names}
        pearson_table = pearson_table[pearson_table["marker"].map(_squash).isin(panel)]
    else:
        pearson_table = {m: r for m, r in pearson_table.items() if marker_columns(marker_names, [m], strict=False)}
    markers = top_markers_by_pearson(pearson_table, n_markers)
    knn = KnnPhenotyper.fit(x, marker_names, labels, markers, k=k, log1p=log1p, seed=seed)
    reference = knn.predict(x, marker_names) if reference_from_knn else labels
    predicted = {name: knn.predict(p, marker_names) for name, p in predictions.items()}
    predicted["bulk"] = bulk_phenotype_labels(reference, sample_ids, seed=seed)
    scores = score_methods(reference, predicted, scored_types(reference, reference), n_boot=n_boot, seed=seed)
    confusion = {name: confusion_tables(reference, p) for name, p in predicted.items()}
    proportions = per_sample_proportions({"measured": reference, **predicted}, sample_ids, "T cells")
    return PhenotypingResult(labels, table, markers, reference, predicted, scores, confusion, proportions)


def plot_f1_bars(scores: pd.DataFrame, path: str | Path, title: str = "Cell phenotyping F1") -> Path:
    """Fig. 3A: grouped F1 bars per type (and macro) with bootstrap CI whiskers, one colour per method."""
    plt = _plt()
    types = list(dict.fromkeys(scores["cell_type"]))
    methods = list(dict.fromkeys(scores["method"]))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2, 3.4))
    for j, method in enumerate(methods):
        s = scores[scores["method"] == method].set_index("cell_type").reindex(types)
        err = np.abs(np.vstack([s["f1"] - s["ci_low"], s["ci_high"] - s["f1"]]).astype(float))
        ax.bar(np.arange(len(types)) + (j - (len(methods) - 1) / 2) * width, s["f1"], width, label=method,
               yerr=np.nan_to_num(err), capsize=2)
    ax.set_xticks(np.arange(len(types)), types, rotation=30, ha="right")
    ax.set(ylabel="F1 (95% bootstrap CI)", ylim=(0, 1), title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(normalised: pd.DataFrame, path: str | Path, title: str = "Confusion (row-normalised)") -> Path:
    """Supplementary Fig. 4: heat map of the row-normalised confusion matrix with the values written in."""
    plt = _plt()
    v = normalised.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(0.6 * v.shape[1] + 2.5, 0.55 * v.shape[0] + 1.8))
    im = ax.imshow(v, cmap="viridis", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(v):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xticks(np.arange(v.shape[1]), normalised.columns, rotation=45, ha="right")
    ax.set_yticks(np.arange(v.shape[0]), normalised.index)
    ax.set(xlabel="predicted", ylabel="reference (measured)", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    """Write to a temporary name, then rename, so a figure on disk is always complete."""
    path, tmp = Path(path), Path(path).with_name(Path(path).stem + ".tmp" + Path(path).suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return tmp.replace(path)
