"""What the selected virtual biomarkers are made of (VirTues paper Fig. 5f–g, Suppl. Fig. 22): cell-type
composition of each signature beside the overall composition, and the neighbourhood composition of
each cell type inside versus outside the signature.

Choices the Methods leave open, made here:

* Neighbours are the Delaunay neighbours of cell centroids within each tissue
  (:func:`analysis.cell_graphs.delaunay_edges`, no distance cutoff — the project's one neighbourhood
  graph), over all cells of the analysed tissues.
* For a signature S and a centre cell type T, "inside" pools the neighbour edges of the type-T cells
  in S, "outside" those of the type-T cells not in S. Per neighbour type N we report the share of
  those edges that end in an N cell (the proportion the z-test compares, one trial per edge) and the
  mean number of N neighbours per centre cell (the "density" of the figure's arrows); relative change
  = inside / outside − 1 in percent.
* Two-proportion pooled z-test, two-sided (the paper's "proportions z-test").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.virtues_biomarker_stats import two_proportion_z_test


NEIGHBOURHOOD_COLUMNS = ["signature", "centre_type", "neighbour_type", "n_centre_inside", "n_centre_outside",
                         "edges_inside", "edges_outside", "neighbours_inside", "neighbours_outside", "share_inside",
                         "share_outside", "density_inside", "density_outside", "relative_change_pct", "z", "p_value"]


def type_composition(cell_types: np.ndarray, membership: pd.DataFrame) -> pd.DataFrame:
    """Long table: signature ("all cells" first), cell type, count, proportion, relative change (%) vs all."""
    types = pd.Series(np.asarray(cell_types).astype(str), index=membership.index)
    overall = types.value_counts(normalize=True).sort_index()
    rows = [{"signature": "all cells", "cell_type": t, "n_cells": int((types == t).sum()), "proportion": p,
             "relative_change_pct": 0.0} for t, p in overall.items()]
    for name in membership.columns:
        inside = types[membership[name].to_numpy(bool)]
        counts = inside.value_counts().reindex(overall.index, fill_value=0)
        share = counts / max(len(inside), 1)
        for t in overall.index:
            rows.append({"signature": name, "cell_type": t, "n_cells": int(counts[t]), "proportion": float(share[t]),
                         "relative_change_pct": float((share[t] / overall[t] - 1) * 100)})
    return pd.DataFrame(rows)


def neighbour_counts(edges: np.ndarray, type_codes: np.ndarray, n_types: int) -> np.ndarray:
    """(cells × types) number of Delaunay neighbours of each type (edges are undirected)."""
    counts = np.zeros((len(type_codes), n_types), dtype=np.int64)
    if len(edges):
        np.add.at(counts, (edges[:, 0], type_codes[edges[:, 1]]), 1)
        np.add.at(counts, (edges[:, 1], type_codes[edges[:, 0]]), 1)
    return counts


def neighbourhood_composition(cell_types: np.ndarray, edges: np.ndarray, membership: pd.DataFrame, *,
                              centre_types: Sequence[str] | None = None, min_centre_cells: int = 5) -> pd.DataFrame:
    """Long table per (signature, centre type, neighbour type): inside vs outside shares, densities, z-test.

    ``centre_types``: the centre cell types to describe (None = every type with at least
    ``min_centre_cells`` cells inside the signature).
    """
    names, codes = np.unique(np.asarray(cell_types).astype(str), return_inverse=True)
    counts = neighbour_counts(np.asarray(edges, dtype=np.int64), codes, len(names))
    rows = []
    for signature in membership.columns:
        member = membership[signature].to_numpy(bool)
        for ci, centre in enumerate(names):
            if centre_types is not None and centre not in set(centre_types):
                continue
            inside, outside = member & (codes == ci), ~member & (codes == ci)
            if inside.sum() < (1 if centre_types is not None else min_centre_cells) or not outside.any():
                continue
            in_counts, out_counts = counts[inside].sum(axis=0), counts[outside].sum(axis=0)
            in_total, out_total = int(in_counts.sum()), int(out_counts.sum())
            for ni, neighbour in enumerate(names):
                z, p = two_proportion_z_test(in_counts[ni], in_total, out_counts[ni], out_total)
                in_share = in_counts[ni] / in_total if in_total else float("nan")
                out_share = out_counts[ni] / out_total if out_total else float("nan")
                rows.append({
                    "signature": signature, "centre_type": centre, "neighbour_type": neighbour,
                    "n_centre_inside": int(inside.sum()), "n_centre_outside": int(outside.sum()),
                    "edges_inside": in_total, "edges_outside": out_total,
                    "neighbours_inside": int(in_counts[ni]), "neighbours_outside": int(out_counts[ni]),
                    "share_inside": in_share, "share_outside": out_share,
                    "density_inside": in_counts[ni] / inside.sum(), "density_outside": out_counts[ni] / outside.sum(),
                    "relative_change_pct": (in_share / out_share - 1) * 100 if out_share else float("nan"),
                    "z": z, "p_value": p})
    return pd.DataFrame(rows, columns=NEIGHBOURHOOD_COLUMNS)
