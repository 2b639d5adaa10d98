"""Tissue retrieval by optimal transport between sets of niche tokens (paper Fig. 4g–k, Methods
"Information retrieval").

Each tissue is the set of niche tokens of the central ``grid × grid`` 128-px crops of its image
(paper: 4 × 4; images smaller than the grid are left out). Two tissues are as far apart as the
2-Wasserstein distance between their token sets with uniform weights; a query's matches are the
other tissues by increasing distance. Evaluation, as the Methods define it:

* clinical labels: the share of the top-3 matches with the query's label, against random
  retrieval, with a McNemar test of correct matches (method vs three random retrievals);
* cell-type composition: L1 distance between the coarse cell-type proportions of the query and
  its closest match, against the mean over random matches;
* molecular composition: sliced 2-Wasserstein distance between the pixel sets of the query and
  its closest match, against random.

Tissues of the query's own patient are never offered as matches (a database lookup would
otherwise return the same patient's other cores; the paper does not say, this is the cautious
reading). Everything here takes arrays, so the same code scores any embedding (VirTues, a baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

TOP_K = 3


def central_grid_corners(height: int, width: int, grid: int = 4, tile: int = 128) -> np.ndarray | None:
    """(grid², 2) corners of the central grid of crops, or None when the image is smaller than the grid."""
    if height < grid * tile or width < grid * tile:
        return None
    y0, x0 = (height - grid * tile) // 2, (width - grid * tile) // 2
    return np.array([(y0 + i * tile, x0 + j * tile) for i in range(grid) for j in range(grid)], dtype=np.int64)


def wasserstein2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2 between two point sets with uniform weights (squared Euclidean ground cost)."""
    import ot

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cost = ot.dist(a, b, metric="sqeuclidean")
    return float(np.sqrt(max(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cost), 0.0)))


def distance_matrix(sets: Sequence[np.ndarray]) -> np.ndarray:
    n = len(sets)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = wasserstein2(sets[i], sets[j])
    return d


def allowed_matches(patients: Sequence[str]) -> np.ndarray:
    """(n, n) bool: j may be returned for query i (not itself, not the same patient)."""
    p = np.asarray(patients).astype(str)
    return p[:, None] != p[None, :]


def rank_matches(distances: np.ndarray, allowed: np.ndarray) -> list[np.ndarray]:
    """Per query, the allowed tissues by increasing distance (ties by index)."""
    return [np.flatnonzero(allowed[i])[np.argsort(distances[i, allowed[i]], kind="stable")] for i in range(len(distances))]


def label_hits(ranking: Sequence[np.ndarray], labels: Sequence, k: int = TOP_K) -> np.ndarray:
    """(n, k) bool: whether the r-th match of query i carries query i's label (False past the end)."""
    lab = np.asarray(labels).astype(str)
    hits = np.zeros((len(ranking), k), dtype=bool)
    for i, order in enumerate(ranking):
        top = order[:k]
        hits[i, : len(top)] = lab[top] == lab[i]
    return hits


def random_hits(allowed: np.ndarray, labels: Sequence, k: int = TOP_K, seed: int = 0) -> np.ndarray:
    """(n, k) bool hits of one uniformly random retrieval per query (without replacement)."""
    rng = np.random.default_rng(seed)
    ranking = [rng.permutation(np.flatnonzero(row)) for row in allowed]
    return label_hits(ranking, labels, k)


def expected_random_precision(allowed: np.ndarray, labels: Sequence) -> float:
    """Mean over queries of the share of allowed tissues with the query's label (exact, no sampling)."""
    lab = np.asarray(labels).astype(str)
    shares = [(lab[row] == lab[i]).mean() for i, row in enumerate(allowed) if row.any()]
    return float(np.mean(shares)) if shares else float("nan")


def mcnemar(method: np.ndarray, baseline: np.ndarray) -> tuple[int, int, float]:
    """McNemar's test on paired correct/incorrect outcomes: (n1, n2, p) with χ² = (n1 − n2)² / (n1 + n2), 1 dof.

    n1 = pairs the method got right and the baseline wrong, n2 the reverse (Methods' definition).
    """
    from scipy.stats import chi2

    method, baseline = np.asarray(method, bool).ravel(), np.asarray(baseline, bool).ravel()
    n1, n2 = int((method & ~baseline).sum()), int((~method & baseline).sum())
    if n1 + n2 == 0:
        return n1, n2, 1.0
    return n1, n2, float(chi2.sf((n1 - n2) ** 2 / (n1 + n2), df=1))


def label_retrieval_table(ranking: Sequence[np.ndarray], allowed: np.ndarray, labels: pd.DataFrame,
                          k: int = TOP_K, random_repeats: int = 3, seed: int = 0) -> pd.DataFrame:
    """One row per label column: top-k precision, random expectation, McNemar vs ``random_repeats`` retrievals."""
    rows = []
    for column in labels.columns:
        values = labels[column].astype(str).to_numpy()
        hits = label_hits(ranking, values, k)
        rand = np.concatenate([random_hits(allowed, values, k, seed + r) for r in range(random_repeats)])
        n1, n2, p = mcnemar(np.tile(hits, (random_repeats, 1)), rand)
        rows.append({"label": column, f"precision_at_{k}": float(hits.mean()),
                     "random_precision": expected_random_precision(allowed, values),
                     "random_precision_sampled": float(rand.mean()), "mcnemar_n1": n1, "mcnemar_n2": n2,
                     "mcnemar_p": p, "n_queries": len(ranking)})
    return pd.DataFrame(rows)


def composition_l1(proportions: np.ndarray, ranking: Sequence[np.ndarray], allowed: np.ndarray) -> tuple[float, float]:
    """Mean L1 distance of cell-type proportions between each query and (its closest match, a random match).

    The random figure is the exact mean over all allowed matches.
    """
    prop = np.asarray(proportions, dtype=np.float64)
    top, rand = [], []
    for i, order in enumerate(ranking):
        if len(order) == 0:
            continue
        top.append(np.abs(prop[i] - prop[order[0]]).sum())
        rand.append(np.abs(prop[i] - prop[allowed[i]]).sum(1).mean())
    return float(np.mean(top)), float(np.mean(rand))


def sliced_w2(x: np.ndarray, y: np.ndarray, n_projections: int = 64, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two pixel sets (rows = pixels, columns = channels)."""
    import ot

    return float(ot.sliced_wasserstein_distance(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                                n_projections=n_projections, seed=seed))


def molecular_distance(pixels: Sequence[np.ndarray], ranking: Sequence[np.ndarray], allowed: np.ndarray,
                       seed: int = 0) -> tuple[float, float]:
    """Mean sliced W2 between each query's pixels and (its closest match's, a random allowed match's)."""
    rng = np.random.default_rng(seed)
    top, rand = [], []
    for i, order in enumerate(ranking):
        if len(order) == 0:
            continue
        top.append(sliced_w2(pixels[i], pixels[order[0]], seed=seed))
        rand.append(sliced_w2(pixels[i], pixels[int(rng.choice(np.flatnonzero(allowed[i])))], seed=seed))
    return float(np.mean(top)), float(np.mean(rand))
