"""Cell graphs shared by the tissue-structure and neighbourhood analyses: Delaunay neighbours of cell
centroids, one triangulation per sample (edges never join two samples).

Why one module: SCGP's spatial edges (Delaunay with a distance cutoff, as its authors build them) and
the ROSIE paper's neighbourhood graph (Delaunay, no cutoff) are the same construction; a single
definition keeps their degenerate cases (too few or collinear cells, duplicate centroids) the same.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import Delaunay, QhullError


def _triangulation_edges(xy: np.ndarray) -> np.ndarray:
    """Delaunay edges (local indices, unsorted, with repeats) of one sample's centroids."""
    n = len(xy)
    if n < 2:
        return np.empty((0, 2), np.int64)
    if n >= 3:
        try:
            tri = Delaunay(xy)
        except QhullError:
            tri = None
        if tri is not None:
            s = tri.simplices
            pairs = [s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]]
            if len(tri.coplanar):  # points Qhull left out (duplicates): joined to their nearest vertex
                pairs.append(tri.coplanar[:, [0, 2]])
            return np.concatenate(pairs).astype(np.int64)
    # 2 cells or all collinear: neighbours along the line (the degenerate triangulation)
    centred = xy - xy.mean(axis=0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    order = np.argsort(centred @ direction, kind="stable")
    return np.stack([order[:-1], order[1:]], axis=1).astype(np.int64)


def delaunay_edges(centroids_um: np.ndarray, sample_ids: np.ndarray | None = None, *,
                   max_edge_um: float | None = None) -> np.ndarray:
    """(E, 2) int64 unique undirected Delaunay edges ``i < j`` (global cell indices), per sample, sorted.

    ``centroids_um``: (N, 2) cell centroids in µm; ``sample_ids``: one per cell (None = one sample);
    ``max_edge_um``: drop longer edges (None = keep all, the ROSIE paper's graph; SCGP uses 35 µm).
    """
    xy = np.asarray(centroids_um, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise ValueError(f"centroids must be a finite (N, 2) array in µm, got shape {xy.shape}")
    if max_edge_um is not None and not max_edge_um > 0:
        raise ValueError(f"max_edge_um must be > 0 µm or None, got {max_edge_um}")
    samples = sample_array(sample_ids, len(xy))
    parts = [np.empty((0, 2), np.int64)]
    for rows in sample_groups(samples):
        local = _triangulation_edges(xy[rows])
        if max_edge_um is not None:
            local = local[np.linalg.norm(xy[rows][local[:, 0]] - xy[rows][local[:, 1]], axis=1) <= max_edge_um]
        parts.append(rows[local])
    edges = np.sort(np.concatenate(parts), axis=1)
    edges = edges[edges[:, 0] != edges[:, 1]]
    return np.unique(edges, axis=0)


def sample_array(sample_ids: np.ndarray | None, n: int) -> np.ndarray:
    if sample_ids is None:
        return np.zeros(n, dtype=np.int64)
    samples = np.asarray(sample_ids)
    if samples.shape != (n,):
        raise ValueError(f"sample_ids must have one entry per cell ({n}), got shape {samples.shape}")
    return samples


def sample_groups(samples: np.ndarray) -> list[np.ndarray]:
    """Cell indices of each sample (sorted by sample id)."""
    _, inverse = np.unique(samples, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1) if len(order) else []
