"""Signature transfer and risk strata (VirTues Fig. 5h–k): R and the stratum boundaries (R = 2 and R = −1
go to medium), log-rank and C-index equal lifelines called directly, the forests recover a planted
signature, and strata separate an independent cohort whose survival follows the planted signatures."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from analysis.virtues_signature_transfer import (TransferConfig, risk_score, risk_strata, survival_comparison,
                                                 train_signature_classifier, transfer_signatures)

MEANS = np.random.default_rng(42).normal(0, 5, size=(5, 8))  # blob 3: response signature, blob 4: non-response
TYPES = np.array(["Tumor", "CD4_T", "B_cell", "CD8_T", "Tumor"])
FAST = TransferConfig(n_trees=20, high_r_is_high_risk=False)


def cohort(n_patients: int, cells: int, seed: int, survival: bool) -> tuple[ad.AnnData, pd.DataFrame]:
    """Each patient has some of blob 3 (good) or blob 4 (bad); bad patients relapse early."""
    rng = np.random.default_rng(seed)
    blocks, rows = [], []
    for i in range(n_patients):
        good = i % 2 == 0
        p = np.array([0.5, 0.2, 0.2, 0.0, 0.0])
        p[3 if good else 4] = rng.uniform(0.03, 0.12)
        blob = rng.choice(5, size=cells, p=p / p.sum())
        tid = f"s{seed}t{i:02d}"
        obs = pd.DataFrame({"tissue_id": tid, "cell_type": TYPES[blob], "blob": blob},
                           index=[f"{tid}:{c}" for c in range(cells)])
        blocks.append(ad.AnnData((MEANS[blob] + rng.normal(size=(cells, 8))).astype(np.float32), obs=obs))
        row = {"tissue_id": tid, "patient_id": f"s{seed}p{i:02d}"}
        if survival:
            row.update(survival_time=rng.exponential(60.0 if good else 8.0), survival_event=int(rng.random() < 0.9))
        rows.append(row)
    return ad.concat(blocks), pd.DataFrame(rows)


def test_risk_score_and_strata_boundaries():
    ranks = pd.DataFrame({"RS1": [3, 0, 2, 1], "RS2": [1, 0, 0, 0], "NRS1": [0, 3, 1, 2]}, index=list("abcd"))
    r = risk_score(ranks, {"RS1": "response", "RS2": "response", "NRS1": "non-response"})
    assert r.tolist() == [4, -3, 1, -1]
    values = pd.Series([-3, -2, -1, 0, 1, 2, 3], index=list("abcdefg"))
    assert risk_strata(values).tolist() == ["low", "low", "medium", "medium", "medium", "medium", "high"]
    flipped = risk_strata(values, high_r_is_high_risk=False)
    assert flipped.tolist() == ["high", "high", "medium", "medium", "medium", "medium", "low"]


def test_survival_comparison_equals_lifelines():
    from lifelines.statistics import logrank_test
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(30)]
    groups = pd.Series(np.array(["low", "medium", "high"])[np.arange(30) % 3], index=ids)
    time = pd.Series(rng.exponential(10, 30) / (1 + (groups == "high").to_numpy()), index=ids)
    event = pd.Series(rng.random(30) < 0.8, index=ids)
    row = survival_comparison(groups, time, event)
    hi, lo = groups == "high", groups == "low"
    direct = logrank_test(time[hi], time[lo], event_observed_A=event[hi], event_observed_B=event[lo])
    assert row["logrank_p"] == pytest.approx(direct.p_value) and row["n_high"] == 10
    assert row["events_low"] == int(event[lo].sum())
    risk = groups.map({"low": 0, "medium": 1, "high": 2})
    assert row["c_index"] == pytest.approx(concordance_index(time, -risk, event))


def test_forest_recovers_a_planted_signature_on_held_out_cells():
    cells, _ = cohort(10, 200, seed=1, survival=False)
    member = cells.obs["blob"].to_numpy() == 3
    clf = train_signature_classifier(cells.X, member, config=FAST)
    m = clf.metrics
    assert m["n_heldout"] == pytest.approx(0.2 * len(member), abs=1)
    assert m["heldout_members"] == pytest.approx(0.2 * member.sum(), abs=1)
    assert m["n_train_balanced"] == 2 * (member.sum() - m["heldout_members"])  # members + as many non-members
    assert m["recall"] > 0.95 and m["precision"] > 0.9 and m["auroc"] > 0.99


def test_transfer_separates_survival_in_an_independent_cohort():
    discovery, _ = cohort(12, 150, seed=2, survival=False)
    blob = discovery.obs["blob"].to_numpy()
    membership = pd.DataFrame({"RS1": blob == 3, "NRS1": blob == 4}, index=discovery.obs_names)
    signatures = pd.DataFrame({"signature": ["RS1", "NRS1"], "kind": ["response", "non-response"]})
    independent, tissues = cohort(60, 150, seed=3, survival=True)
    result = transfer_signatures(discovery, membership, signatures, independent, tissues, FAST)
    patients = result.patients
    assert len(patients) == 60 and set(result.classifiers["signature"]) == {"RS1", "NRS1"}
    assert (patients["R"] == patients["rank_RS1"] - patients["rank_NRS1"]).all()
    assert ((patients["R"] > 2) == (patients["stratum"] == "low")).all()  # response-protective naming
    # predicted memberships follow the planted blobs in the new cohort
    truth = independent.obs["blob"].to_numpy() == 3
    assert (result.membership["RS1"].to_numpy() == truth).mean() > 0.98
    row = result.survival.set_index("predictor").loc["signatures_R"]
    assert row["logrank_p"] < 0.05 and row["c_index"] > 0.6
    assert {"ratio_CD4", "ratio_CD8", "ratio_B"} <= set(result.survival["predictor"])
    assert result.summary["logrank_p"] == row["logrank_p"]


def test_command_writes_strata_and_kaplan_meier(tmp_path, capsys):
    from datamodules.store import DatasetWriter
    from experiments.virtues_signature_transfer import main

    discovery, _ = cohort(8, 120, seed=4, survival=False)
    independent, tissues = cohort(20, 100, seed=5, survival=True)
    for name, cells in (("tok1", discovery), ("tok2", independent)):
        (tmp_path / name / "cells").mkdir(parents=True)
        for tid in cells.obs["tissue_id"].unique():
            cells[cells.obs["tissue_id"] == tid].copy().write_h5ad(tmp_path / name / "cells" / f"{tid}.h5ad")
    bio = tmp_path / "bio"
    bio.mkdir()
    blob = discovery.obs["blob"].to_numpy()
    pd.DataFrame({"signature": ["RS1", "NRS1"], "kind": ["response", "non-response"]}).to_csv(bio / "signatures.csv",
                                                                                               index=False)
    pd.DataFrame({"RS1": blob == 3, "NRS1": blob == 4}, index=discovery.obs_names.rename("obs_name")).to_parquet(
        bio / "signature_cells.parquet")
    data = tmp_path / "ds"
    with DatasetWriter.create(data) as w:
        w.write_tissues(tissues.assign(split="test", phenotype=np.where(np.arange(20) % 2, "cold", "inflamed")))
    out = tmp_path / "out"
    args = ["--biomarkers", str(bio), "--discovery-tokens", str(tmp_path / "tok1"), "--tokens", str(tmp_path / "tok2"),
            "--data", str(data), "--out", str(out), "--trees", "10", "--phenotype-column", "phenotype"]
    assert main(args) == 0
    for name in ("classifiers.csv", "cell_memberships.parquet", "patients.csv", "survival.csv", "phenotypes.csv",
                 "summary.json", "fig5j_kaplan_meier.png", "fig5k_c_index.png"):
        assert (out / name).stat().st_size > 0, name
    phenotypes = pd.read_csv(out / "phenotypes.csv", index_col=0)
    # RS1 cells come from the even (good, "inflamed") patients, NRS1 cells from the odd ("cold") ones
    assert phenotypes.loc["RS1", "inflamed"] > 0.8 and phenotypes.loc["NRS1", "cold"] > 0.8
    capsys.readouterr()
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    assert main(args[:8] + ["--out", str(tmp_path / "x"), "--time-column", "nope"]) == 2
    assert main(["--biomarkers", str(tmp_path), *args[2:8], "--out", str(tmp_path / "y")]) == 2
