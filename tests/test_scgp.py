"""SCGP tissue-structure discovery (analysis/scgp.py) and its command (experiments/scgp.py).

Planted structures must be found, the partition comparison must agree with hand-computed and sklearn
values, the command must write its outputs and refuse bad tables with one error line, and on the two
real DKD kidney regions the partition of measured expression must agree with the SCGP authors'
published one (ARI >= 0.5, the same parameters for both regions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_data
from sklearn.metrics import adjusted_rand_score, f1_score

from analysis.scgp import (
    UNASSIGNED,
    feature_edges,
    match_partitions,
    normalize_expression,
    partition_scores,
    plot_partition_maps,
    remove_small_partitions,
    scgp_partition,
    smooth_isolated_cells,
    spatial_edges,
)
from experiments import scgp as scgp_command

KIDNEY_REGIONS = ("DKD_kidney_000", "DKD_kidney_005")


def planted_tissue(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells in a 600 µm square with 3 structures (left, right, a central disc), each with its own
    high markers, lognormal noise, and 10 % of cells of another structure's type mixed in."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 600, (n, 2))
    region = np.where(np.hypot(xy[:, 0] - 300, xy[:, 1] - 300) < 150, 2, (xy[:, 0] > 300).astype(int))
    profile = np.ones((3, 12))
    profile[0, 0:4] = profile[1, 4:8] = profile[2, 8:12] = 6.0
    base = rng.lognormal(3.0, 0.3, (n, 12))
    expression = base * profile[region] * rng.lognormal(0.0, 0.4, (n, 12))
    intruders = rng.random(n) < 0.1
    expression[intruders] = base[intruders] * profile[rng.integers(0, 3, intruders.sum())]
    return xy, expression, region


def test_planted_structures_are_recovered() -> None:
    xy, expression, region = planted_tissue()
    labels = scgp_partition(xy, expression, seed=0)
    assert adjusted_rand_score(region, labels) > 0.8
    assert np.array_equal(labels, scgp_partition(xy, expression, seed=0))  # deterministic given the seed


def test_joint_samples_share_labels_and_spatial_edges_stay_within_a_sample() -> None:
    xy_a, expr_a, region_a = planted_tissue(seed=1)
    xy_b, expr_b, region_b = planted_tissue(seed=2)
    xy, expr = np.concatenate([xy_a, xy_b]), np.concatenate([expr_a, expr_b])  # the same coordinates overlap
    samples = np.repeat(["a", "b"], len(xy_a))
    edges = spatial_edges(xy, samples)
    assert (samples[edges[:, 0]] == samples[edges[:, 1]]).all()
    labels = scgp_partition(xy, expr, samples, seed=0)
    assert adjusted_rand_score(np.concatenate([region_a, region_b]), labels) > 0.8  # one label set for both


def test_spatial_edges_are_delaunay_edges_within_the_cutoff() -> None:
    # two clusters 100 µm apart: the triangulation joins them, the 35 µm cutoff does not
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.uniform(0, 20, (30, 2)), rng.uniform(0, 20, (30, 2)) + [120, 0]])
    edges = spatial_edges(xy)
    assert len(edges) and (edges[:, 0] < edges[:, 1]).all()
    assert (np.linalg.norm(xy[edges[:, 0]] - xy[edges[:, 1]], axis=1) <= 35).all()
    assert not ((edges[:, 0] < 30) & (edges[:, 1] >= 30)).any()
    line = np.stack([np.arange(5.0) * 10, np.zeros(5)], axis=1)  # collinear: the degenerate triangulation
    assert spatial_edges(line).tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]  # neighbours along the line


def test_feature_edges_link_each_cell_to_its_nearest_other_cells() -> None:
    features = np.array([[0.0], [1.0], [3.0], [10.0], [10.5]])
    edges = {tuple(e) for e in feature_edges(features, feature_knn=2)}  # 1 other cell each, symmetrised
    assert edges == {(0, 1), (1, 2), (3, 4)}


def test_normalize_expression_is_the_authors_arcsinh_zscore_per_sample() -> None:
    x = np.random.default_rng(0).lognormal(3, 1, (40, 3))
    samples = np.repeat([0, 1], 20)
    out = normalize_expression(x, samples)
    first = np.arcsinh(x[:20] / (5 * np.quantile(x[:20], 0.2, axis=0) + 1e-5))
    assert np.allclose(out[:20], (first - first.mean(0)) / first.std(0, ddof=1))
    assert np.allclose(out[20:].mean(0), 0) and np.allclose(out[20:].std(0, ddof=1), 1)


def test_small_partitions_are_removed_and_lone_cells_smoothed() -> None:
    labels = np.array([0] * 600 + [1] * 399 + [2])
    assert (remove_small_partitions(labels) == np.array([0] * 600 + [1] * 399 + [UNASSIGNED])).all()
    # a path 0-1-2-3-4 (CSR neighbour lists): cell 2 (label 1) sits between two cells of label 0
    indptr = np.array([0, 1, 3, 5, 7, 8])
    indices = np.array([1, 0, 2, 1, 3, 2, 4, 3])
    path = np.array([0, 0, 1, 0, 0])
    assert smooth_isolated_cells(path, indptr, indices, smooth_level=0).tolist() == [0, 0, 0, 0, 0]
    # smooth_level=1 also moves a cell with one like neighbour of two; cells are visited in order and
    # a tie goes to the larger label (the authors' majority_of_list)
    assert smooth_isolated_cells(path, indptr, indices, smooth_level=1).tolist() == [0, 1, 1, 1, 0]
    # a cell whose assigned neighbours have no majority becomes unassigned
    star_ptr, star_idx = np.array([0, 3, 4, 5, 6]), np.array([1, 2, 3, 0, 0, 0])
    assert smooth_isolated_cells(np.array([0, 1, 2, 3]), star_ptr, star_idx)[0] == UNASSIGNED


def test_match_partitions_on_a_hand_computed_contingency_table() -> None:
    # contingency (pred x ref over cells assigned on both sides):
    #        ref 0  ref 1  ref 2
    # pred 0    3      1      0
    # pred 1    0      2      2
    # pred 2    0      0      1
    # pred 3    0      3      0
    # best one-to-one total: 0->0 (3) + 3->1 (3) + 1->2 (2) = 8; pred 2 is left over
    pred = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, UNASSIGNED, 2])
    ref = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1, 0, UNASSIGNED])
    match = match_partitions(pred, ref)
    assert match.mapping == {0: 0, 1: 2, 2: UNASSIGNED, 3: 1}
    assert match.contingency.to_numpy().tolist() == [[3, 1, 0], [0, 2, 2], [0, 0, 1], [0, 3, 0]]
    assert match.mapped.tolist() == [0, 0, 0, 0, 2, 2, 2, 2, UNASSIGNED, 1, 1, 1, UNASSIGNED, UNASSIGNED]


def test_scores_agree_with_sklearn() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(-1, 4, 600)
    pred = np.where(rng.random(600) < 0.7, (ref + 1) % 5, rng.integers(-1, 5, 600))  # relabelled, noisy
    samples = np.repeat(["s1", "s2"], 300)
    scores, match = partition_scores(pred, ref, samples, n_boot=200, seed=0)
    assert scores["sample"].tolist() == ["s1", "s2", "all"]
    for i, sample in enumerate(["s1", "s2"]):
        rows = samples == sample
        assert scores["ari"][i] == pytest.approx(adjusted_rand_score(ref[rows], pred[rows]))
    assert scores["ari"][2] == pytest.approx(scores["ari"][:2].mean())
    keep = ref != UNASSIGNED
    labels = [0, 1, 2, 3]
    per_label = f1_score(ref[keep], match.mapped[keep], labels=labels, average=None)
    assert np.allclose(scores.loc[2, [f"f1_{k}" for k in labels]].to_numpy(float), per_label)
    assert scores["f1_macro"][2] == pytest.approx(f1_score(ref[keep], match.mapped[keep], labels=labels,
                                                           average="macro"))
    assert (scores["f1_macro_ci_low"] <= scores["f1_macro"]).all()
    assert (scores["f1_macro"] <= scores["f1_macro_ci_high"]).all()
    again, _ = partition_scores(pred, ref, samples, n_boot=200, seed=0)
    pd.testing.assert_frame_equal(scores, again)  # the bootstrap is seeded


def test_partition_map_is_written(tmp_path: Path) -> None:
    xy, expression, region = planted_tissue(n=300)
    path = plot_partition_maps(xy, {"measured": region, "ROSIE": region[::-1]}, tmp_path / "map.png", title="t")
    assert path.stat().st_size > 1000


def write_region(folder: Path, n: int = 600, seed: int = 0) -> dict[str, Path]:
    """A planted region as the SCGP authors' CSV triple (centroids in pixels of 0.3775 µm)."""
    xy, expression, region = planted_tissue(n=n, seed=seed)
    ids = np.arange(1, n + 1)
    paths = {k: folder / f"r.{k}.csv" for k in ("cell_data", "expression", "scgp_annotations")}
    pd.DataFrame({"CELL_ID": ids, "X": xy[:, 0] / 0.3775, "Y": xy[:, 1] / 0.3775}).to_csv(paths["cell_data"], index=False)
    markers = pd.DataFrame(expression, columns=[f"M{i}" for i in range(expression.shape[1])])
    pd.concat([pd.DataFrame({"CELL_ID": ids}), markers], axis=1).to_csv(paths["expression"], index=False)
    pd.DataFrame({"CELL_ID": ids, "SCGP": region}).to_csv(paths["scgp_annotations"], index=False)
    return paths


def run_command(paths: dict[str, Path], out: Path, *extra: str) -> int:
    return scgp_command.main(["--cells", str(paths["cell_data"]), "--expression", str(paths["expression"]),
                              "--reference", str(paths["scgp_annotations"]), "--out", str(out), *extra])


def test_command_writes_partitions_scores_and_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_region(tmp_path)
    assert run_command(paths, tmp_path / "out", "--bootstrap", "100") == 0
    assert "ARI vs reference" in capsys.readouterr().out
    out = tmp_path / "out"
    partitions = pd.read_csv(out / "partitions.csv")
    assert partitions.columns.tolist() == ["cell_id", "partition"] and len(partitions) == 600
    scores = pd.read_csv(out / "scores.csv")
    assert scores["ari"][0] > 0.8
    assert {"partition", "reference", "overlap_cells"} <= set(pd.read_csv(out / "mapping.csv").columns)
    assert (out / "map.png").is_file()
    assert run_command(paths, tmp_path / "out") == 2  # exists: needs --overwrite
    assert run_command(paths, tmp_path / "out", "--overwrite", "--bootstrap", "10") == 0


def test_command_reads_anndata(tmp_path: Path) -> None:
    import anndata as ad

    xy, expression, region = planted_tissue(n=400)
    adata = ad.AnnData(expression.astype(np.float32))
    adata.obs_names = [f"c{i}" for i in range(400)]
    adata.obsm["spatial"] = xy / 0.3775
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert scgp_command.main(["--cells", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "out")]) == 0
    partitions = pd.read_csv(tmp_path / "out" / "partitions.csv")
    assert adjusted_rand_score(region, partitions["partition"]) > 0.8


@pytest.mark.parametrize("case, expected", [
    ("ids_differ", "cell ids do not match"),
    ("no_cell_id", "no CELL_ID column"),
    ("text_value", "not numeric"),
    ("nan_value", "missing or infinite expression"),
    ("no_expression", "--expression EXPR.csv is required"),
])
def test_command_refuses_bad_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                    expected: str) -> None:
    paths = write_region(tmp_path, n=100)
    table = pd.read_csv(paths["expression"])
    if case == "ids_differ":
        table.loc[:2, "CELL_ID"] = [9001, 9002, 9003]
    elif case == "no_cell_id":
        table = table.rename(columns={"CELL_ID": "cell"})
    elif case == "text_value":
        table["M3"] = table["M3"].astype(object)
        table.loc[5, "M3"] = "high"
    elif case == "nan_value":
        table.loc[7, "M1"] = np.nan
    table.to_csv(paths["expression"], index=False)
    argv = ["--cells", str(paths["cell_data"]), "--out", str(tmp_path / "out")]
    if case != "no_expression":
        argv += ["--expression", str(paths["expression"])]
    assert scgp_command.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    if case == "ids_differ":
        assert "3 of the 100 cell(s) there are missing here, and 3 id(s) here are not" in err[0]
    assert not (tmp_path / "out").exists()


def test_real_kidney_regions_agree_with_the_authors_partition(tmp_path: Path) -> None:
    """Each real region alone, default parameters: ARI >= 0.5 against the SCGP authors' partition."""
    folder = shared_data("codex_kidney_scgp")
    for region in KIDNEY_REGIONS:
        paths = {k: folder / f"{region}.{k}.csv" for k in ("cell_data", "expression", "scgp_annotations")}
        assert run_command(paths, tmp_path / region, "--bootstrap", "100") == 0
        ari = pd.read_csv(tmp_path / region / "scores.csv")["ari"][0]
        assert ari >= 0.5, f"{region}: ARI {ari:.3f} against the authors' SCGP partition"
