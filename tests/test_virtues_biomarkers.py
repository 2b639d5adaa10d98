"""Virtual biomarker discovery (VirTues Fig. 5c–g): each statistic against a direct computation, and the
whole discovery on a planted cohort where one rare token blob marks responders and another marks
non-responders (both must be found; post-treatment tissues must not leak in)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold

from analysis.cell_graphs import delaunay_edges
from analysis.virtues_biomarker_context import neighbourhood_composition, type_composition
from analysis.virtues_biomarker_stats import (auroc, cell_type_ratio, cv_auroc_folds, one_sided_t_test,
                                              parse_resolutions, proportion_ranks, resolution_grid, risk_ratio,
                                              two_proportion_z_test)
from analysis.virtues_biomarkers import DiscoveryConfig, discover_biomarkers

TYPES = np.array(["Tumor", "CD4_T", "CD8_T", "B_cell", "Macrophage", "Fibroblast"])  # type of each blob
RESPONSE_BLOB, NONRESPONSE_BLOB = 4, 5
FAST = dict(resolutions=(0.3, 0.6), max_cluster_cells=400, embedding="pca", connectivities="gauss")


def planted_cohort(n_patients: int = 24, cells: int = 120, seed: int = 0) -> tuple[ad.AnnData, pd.DataFrame]:
    """Blobs 0–3 common to all (blob 3 mixes B cells, macrophages and fibroblasts); blob 4 only in responders' and blob 5 only in non-responders' pre-treatment
    tissues (4–8 % of cells). Post-treatment tissues of non-responders are full of blob 4 (must be ignored)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, size=(6, 8))
    blocks, tissues = [], []
    for i in range(n_patients):
        response = int(i % 2 == 0)
        for timepoint in ("pre", "post"):
            p = np.array([0.5, 0.2, 0.1, 0.2, 0.0, 0.0])
            if timepoint == "pre":
                p[RESPONSE_BLOB if response else NONRESPONSE_BLOB] = rng.uniform(0.04, 0.08)
            elif not response:
                p[RESPONSE_BLOB] = 0.3
            blob = rng.choice(6, size=cells, p=p / p.sum())
            tid = f"t{i:02d}{timepoint}"
            types = np.where((blob == 3) & (rng.random(cells) < 0.5), np.where(rng.random(cells) < 0.5, "Macrophage",
                                                                               "Fibroblast"), TYPES[blob])
            obs = pd.DataFrame({"tissue_id": tid, "cell_id": np.arange(cells), "cell_type": types, "blob": blob,
                                "x": rng.uniform(0, 400, cells), "y": rng.uniform(0, 400, cells)},
                               index=[f"{tid}:{c}" for c in range(cells)])
            blocks.append(ad.AnnData((means[blob] + rng.normal(size=(cells, 8))).astype(np.float32), obs=obs))
            tissues.append({"tissue_id": tid, "patient_id": f"p{i:02d}", "timepoint": timepoint, "response": response})
    cells_ = ad.concat(blocks)
    cells_.obsm["spatial"] = cells_.obs[["x", "y"]].to_numpy(np.float32)
    return cells_, pd.DataFrame(tissues)


@pytest.fixture(scope="module")
def discovery():
    cells, tissues = planted_cohort()
    return cells, tissues, discover_biomarkers(cells, tissues, DiscoveryConfig(**FAST))


def test_resolution_grid_is_inclusive_and_parsed():
    grid = resolution_grid(4.0, 5.0, 0.05)
    assert len(grid) == 21 and grid[0] == 4.0 and grid[-1] == 5.0 and grid[1] == 4.05
    assert parse_resolutions("4.0:5.0:0.05") == grid and parse_resolutions("0.5,1") == [0.5, 1.0]
    with pytest.raises(ValueError):
        parse_resolutions("a:b")


def test_ranks_are_zero_for_absence_and_tertiles_of_positive_proportions():
    p = pd.Series([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0])
    q1, q2 = np.quantile([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1 / 3, 2 / 3])  # 0.2667, 0.4333
    assert (q1, q2) == pytest.approx((0.26667, 0.43333), abs=1e-4)
    assert proportion_ranks(p).tolist() == [0, 1, 1, 2, 2, 3, 3, 0]
    assert proportion_ranks(pd.Series([0.0, 1, 1, 1, 2])).tolist() == [0, 1, 1, 1, 3]  # ties at a boundary: lower
    with pytest.raises(ValueError, match="NaN"):
        proportion_ranks(pd.Series([0.1, np.nan]))


def _direct_cv(x, y, n_splits, n_repeats, seed):
    out = []
    for train, test in RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed).split(x, y):
        model = LogisticRegression().fit(x[train], y[train])
        out.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return np.array(out)


def test_cv_auroc_equals_a_direct_sklearn_loop():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 16)
    uni = np.clip(y + rng.integers(-1, 3, 32), 0, 3).astype(float)[:, None]  # ranks, informative
    multi = np.column_stack([uni[:, 0], rng.integers(0, 4, 32), rng.normal(size=32)])
    ratio = rng.lognormal(size=32)[:, None] + y[:, None]
    for x in (uni, multi, ratio):
        ours = cv_auroc_folds(x, y, n_splits=4, n_repeats=10, seed=7)
        assert len(ours) == 40
        np.testing.assert_allclose(ours, _direct_cv(x, y, 4, 10, 7), atol=1e-9)
    assert auroc(y, uni[:, 0]) == pytest.approx(roc_auc_score(y, uni[:, 0]))
    with pytest.raises(ValueError, match="4 patients"):
        cv_auroc_folds(uni[:6], np.array([0, 0, 0, 1, 1, 1]))


def test_risk_ratio_and_katz_interval_by_hand():
    # a=6 of n1=10 exposed respond, c=3 of n0=12 unexposed
    exposed = np.array([True] * 10 + [False] * 12)
    outcome = np.array([1] * 6 + [0] * 4 + [1] * 3 + [0] * 9)
    rr = risk_ratio(exposed, outcome)
    se = np.sqrt(1 / 6 - 1 / 10 + 1 / 3 - 1 / 12)
    assert rr.rr == pytest.approx(2.4)
    assert (rr.lower, rr.upper) == pytest.approx((2.4 * np.exp(-1.959964 * se), 2.4 * np.exp(1.959964 * se)), rel=1e-5)
    # a zero cell: point estimate 0, CI from counts + 0.5 (a=0.5, n1=11, c=3.5, n0=13)
    zero = risk_ratio(exposed, np.array([0] * 10 + [1] * 3 + [0] * 9))
    est, se0 = (0.5 / 11) / (3.5 / 13), np.sqrt(1 / 0.5 - 1 / 11 + 1 / 3.5 - 1 / 13)
    assert zero.rr == 0 and zero.upper == pytest.approx(est * np.exp(1.959964 * se0), rel=1e-5)
    assert np.isnan(risk_ratio(np.zeros(5, bool), np.ones(5)).rr)


def test_ratio_t_test_and_z_test_by_hand():
    types = np.array(["Tumor", "Tumor", "CD4_T", "Tumor", "cd4 t", "B_cell"])
    patients = np.array(["a", "a", "a", "b", "b", "b"])
    ratio = cell_type_ratio(types, patients, ["a", "b", "c"], ["tumor"], ["CD4_T"])
    assert ratio.tolist() == pytest.approx([(2 + 1) / (1 + 1), (1 + 1) / (1 + 1), 1.0])
    a, b = np.array([0.8, 0.85, 0.9, 0.82]), np.array([0.6, 0.7, 0.65, 0.75])
    t, p = one_sided_t_test(a, b)
    assert p == pytest.approx(stats.ttest_ind(a, b).pvalue / 2) and t > 0
    z, pz = two_proportion_z_test(30, 100, 20, 100)
    pooled = 0.25
    assert z == pytest.approx(0.1 / np.sqrt(pooled * 0.75 * 0.02))
    assert pz == pytest.approx(2 * stats.norm.sf(z))


def test_compositions_by_hand():
    # a path of five cells 0-1-2-3-4: types T C T C B; signature = cells {0, 1}
    xy = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]], float)
    types = np.array(["T", "C", "T", "C", "B"])
    edges = delaunay_edges(xy)
    assert edges.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
    membership = pd.DataFrame({"RS1": [True, True, False, False, False]})
    comp = type_composition(types, membership).set_index(["signature", "cell_type"])
    assert comp.loc[("RS1", "T"), "proportion"] == 0.5 and comp.loc[("RS1", "T"), "relative_change_pct"] == pytest.approx(
        (0.5 / 0.4 - 1) * 100)
    nb = neighbourhood_composition(types, edges, membership, centre_types=["T"]).set_index("neighbour_type")
    # T inside: cell 0 (neighbour C). T outside: cell 2 (neighbours C, C)
    assert nb.loc["C", "share_inside"] == 1.0 and nb.loc["C", "share_outside"] == 1.0
    assert nb.loc["C", "density_inside"] == 1.0 and nb.loc["C", "density_outside"] == 2.0
    assert nb.loc["C", "edges_inside"] == 1 and nb.loc["C", "edges_outside"] == 2


def test_planted_signatures_are_found(discovery):
    cells, tissues, result = discovery
    pre = cells.obs["tissue_id"].str.endswith("pre").to_numpy()
    assert result.summary["n_patients"] == 24 and result.summary["n_cells"] == int(pre.sum())
    blob = cells.obs["blob"].to_numpy()[pre]
    kinds = dict(zip(result.signatures["signature"], result.signatures["kind"]))
    assert kinds["RS1"] == "response" and kinds["NRS1"] == "non-response"
    for name, planted in (("RS1", RESPONSE_BLOB), ("NRS1", NONRESPONSE_BLOB)):
        member, truth = result.membership[name].to_numpy(bool), blob == planted
        assert (member & truth).sum() / (member | truth).sum() > 0.9, name
    assert result.signatures.set_index("signature").loc["RS1", "auroc"] > 0.9
    assert result.summary["multivariate_auroc"] >= 0.9 > result.summary["best_baseline_auroc"]
    assert (result.comparison.dropna()["p_one_sided"] < 0.05).all()
    # the tables agree with direct computations
    patients = result.patients
    rs1 = pd.Series(result.membership["RS1"].to_numpy(), index=result.membership["patient_id"].to_numpy())
    direct = proportion_ranks(rs1.groupby(level=0).mean().reindex(patients.index))
    assert (patients["RS1"] == direct).all()
    row = result.candidates.set_index("candidate").loc[result.signatures.iloc[0]["candidate"]]
    folds = cv_auroc_folds(patients["RS1"].to_numpy(), patients["response"].to_numpy(), n_splits=4, n_repeats=10)
    assert row["auroc"] == pytest.approx(folds.mean())
    assert result.neighbourhoods["signature"].nunique() == len(result.signatures)
    assert result.embedding.shape == (int(pre.sum()), 2)


def test_max_overlap_keeps_the_same_cluster_from_being_chosen_twice(discovery):
    _, _, result = discovery
    members = result.membership[result.signatures["signature"]].to_numpy(bool)
    for i in range(members.shape[1]):
        for j in range(i):
            assert (members[:, i] & members[:, j]).sum() / (members[:, i] | members[:, j]).sum() <= 0.5


def test_command_writes_tables_signatures_and_figures(tmp_path, capsys):
    from datamodules.store import DatasetWriter
    from experiments.virtues_biomarkers import main

    cells, tissues = planted_cohort(n_patients=16, cells=100, seed=1)
    data = tmp_path / "ds"
    with DatasetWriter.create(data) as w:
        w.write_tissues(tissues.assign(split="train"))
    (tmp_path / "tok" / "cells").mkdir(parents=True)
    for tid in tissues["tissue_id"]:
        cells[cells.obs["tissue_id"] == tid].copy().write_h5ad(tmp_path / "tok" / "cells" / f"{tid}.h5ad")
    out = tmp_path / "bio"
    args = ["--tokens", str(tmp_path / "tok"), "--data", str(data), "--out", str(out), "--resolutions", "0.3,0.6",
            "--max-cluster-cells", "300", "--embedding", "pca", "--connectivities", "gauss",
            "--univariate-repeats", "2", "--multivariate-repeats", "3"]
    assert main(args) == 0
    for name in ("candidates.csv", "signatures.csv", "signature_cells.parquet", "patients.csv", "auroc_folds.csv",
                 "auroc_comparison.csv", "composition.csv", "neighbourhoods.csv", "summary.json",
                 "fig5c_candidates.png", "fig5d_embedding.png", "fig5e_auroc.png", "fig5f_composition.png",
                 "fig5g_neighbourhoods.png"):
        assert (out / name).stat().st_size > 0, name
    cells_table = pd.read_parquet(out / "signature_cells.parquet")
    assert cells_table.index.isin(cells.obs_names).all() and "RS1" in cells_table
    assert len(pd.read_csv(out / "auroc_folds.csv").query("predictor == 'signatures'")) == 12
    capsys.readouterr()
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    assert main(args[:4] + ["--out", str(tmp_path / "x"), "--response-column", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
