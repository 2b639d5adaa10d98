"""ROSIE cell neighbourhoods (analysis/rosie_neighbourhoods.py) on hand-made configurations: Delaunay
neighbours, LNE proportions, epithelial partitions and TIL counts, and the measured-vs-predicted R."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.cell_graphs import delaunay_edges
from analysis.rosie_neighbourhoods import (
    NEIGHBOURHOOD_COLUMNS,
    compare_across_samples,
    compare_neighbourhoods,
    epithelial_partitions,
    lne_mask,
    neighbourhood_table,
    plot_neighbourhood_scatter,
    til_mask,
)

#: a unit square (µm x 10) and its centre: 4 sides and 4 spokes, no diagonal
SQUARE = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [5.0, 5.0]])
SQUARE_EDGES = [(0, 1), (0, 3), (0, 4), (1, 2), (1, 4), (2, 3), (2, 4), (3, 4)]


def as_pairs(edges: np.ndarray) -> list[tuple[int, int]]:
    return [tuple(map(int, e)) for e in edges]


def test_delaunay_neighbours_of_a_hand_made_point_set() -> None:
    assert as_pairs(delaunay_edges(SQUARE)) == SQUARE_EDGES
    # a far point to the right is a neighbour of the two right corners only
    far = np.vstack([SQUARE, [[40.0, 5.0]]])
    edges = as_pairs(delaunay_edges(far))
    assert set(edges) == {*SQUARE_EDGES, (1, 5), (2, 5)}
    # no cutoff by default; a cutoff drops the long edges (length ~30.4 µm)
    assert set(as_pairs(delaunay_edges(far, max_edge_um=20.0))) == set(SQUARE_EDGES)


def test_samples_are_triangulated_separately() -> None:
    xy = np.vstack([SQUARE, SQUARE + 1.0])  # overlapping coordinates, two samples
    samples = np.repeat(["b", "a"], 5)
    edges = delaunay_edges(xy, samples)
    assert (samples[edges[:, 0]] == samples[edges[:, 1]]).all()
    assert set(as_pairs(edges)) == {*SQUARE_EDGES, *((i + 5, j + 5) for i, j in SQUARE_EDGES)}


def test_degenerate_samples() -> None:
    assert len(delaunay_edges(np.zeros((1, 2)))) == 0
    assert as_pairs(delaunay_edges(np.array([[0.0, 0.0], [3.0, 4.0]]))) == [(0, 1)]
    line = np.array([[0.0, 0.0], [30.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    assert as_pairs(delaunay_edges(line)) == [(0, 2), (1, 3), (2, 3)]  # neighbours along the line
    dup = np.vstack([SQUARE, SQUARE[4:]])  # cell 5 sits on cell 4
    assert set(as_pairs(delaunay_edges(dup))) == {*SQUARE_EDGES, (4, 5)}
    with pytest.raises(ValueError, match="finite"):
        delaunay_edges(np.array([[0.0, np.nan]]))


def test_lne_proportion_and_til_count_on_a_hand_made_configuration() -> None:
    # sample s1: epithelial 0, 1, 2; T cell 3 touches 0; B cell 4 touches 1; fibroblast 5 touches 2
    # sample s2: epithelial 6, 7 touch only each other and a macrophage 8; T cell 9 alone
    labels = np.array(["epithelial"] * 3 + ["T cells", "B cells", "fibroblasts", "epithelial", "epithelial",
                                            "macrophages", "T cells"])
    edges = np.array([[0, 3], [1, 4], [2, 5], [0, 1], [1, 2], [6, 7], [7, 8]])
    samples = np.array(["s1"] * 6 + ["s2"] * 4)
    assert np.flatnonzero(lne_mask(labels, edges)).tolist() == [0, 1]
    # partitions: 0 = tumour (cells 0, 1, 2, 3, 6), 1 = stroma (4, 5, 7, 8), -1 = unassigned (9)
    partitions = np.array([0, 0, 0, 0, 1, 1, 0, 1, 1, -1])
    assert epithelial_partitions(partitions, labels).tolist() == [0]  # 4/5 vs 1/4 epithelial
    assert np.flatnonzero(til_mask(labels, partitions, [0])).tolist() == [3]  # B cell 4 is in stroma
    table = neighbourhood_table(labels, edges, samples, partitions)
    assert list(table.columns) == NEIGHBOURHOOD_COLUMNS
    row = table.set_index("sample_id")
    assert row.loc["s1", ["n_cells", "n_epithelial", "n_lymphocytes", "n_lne", "n_til"]].tolist() == [6, 3, 2, 2, 1]
    assert row.loc["s1", "lne_proportion"] == pytest.approx(2 / 3)
    assert row.loc["s2", ["n_epithelial", "n_lne", "n_til"]].tolist() == [2, 0, 0]
    assert row.loc["s2", "lne_proportion"] == 0.0
    # no partitions: TIL counts are missing, not zero; no epithelial cells: no proportion
    no_til = neighbourhood_table(labels, edges, samples)
    assert no_til["n_til"].isna().all()
    none = neighbourhood_table(np.array(["T cells", "B cells"]), np.array([[0, 1]]), np.array(["x", "x"]))
    assert np.isnan(none.loc[0, "lne_proportion"])


def test_epithelial_partition_rule_threshold() -> None:
    labels = np.array(["epithelial", "T cells"] * 2 + ["epithelial", "T cells", "T cells"])
    parts = np.array(["a", "a", "a", "a", "b", "b", "b"])  # a: 1/2 epithelial, b: 1/3
    assert epithelial_partitions(parts, labels).tolist() == ["a"]
    assert epithelial_partitions(parts, labels, min_fraction=0.3).tolist() == ["a", "b"]


def test_measured_vs_predicted_correlations(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    m = pd.Series(rng.uniform(0, 1, 12), index=[f"s{i}" for i in range(12)])
    p = m * 0.5 + rng.normal(0, 0.1, 12)
    p["s0"] = np.nan  # left out
    out = compare_across_samples(m, p.rename(lambda s: s))
    keep = p.dropna().index
    assert out["n_samples"] == 11
    assert out["pearson_r"] == pytest.approx(scipy.stats.pearsonr(m[keep], p[keep]).statistic)
    assert out["spearman_r"] == pytest.approx(scipy.stats.spearmanr(m[keep], p[keep]).statistic)
    assert np.isnan(compare_across_samples(m[:2], p[1:3])["pearson_r"])  # fewer than 3 shared samples
    measured = pd.DataFrame({"sample_id": m.index, "n_til": rng.integers(0, 50, 12), "lne_proportion": m.values})
    predicted = measured.assign(n_til=measured["n_til"] + rng.integers(0, 5, 12), lne_proportion=p.values)
    table = compare_neighbourhoods(measured, predicted)
    assert table["phenotype"].tolist() == ["n_til", "lne_proportion"]
    assert table.loc[1, "pearson_r"] == pytest.approx(out["pearson_r"])
    assert plot_neighbourhood_scatter(measured, predicted, tmp_path / "fig5.png").stat().st_size > 0
