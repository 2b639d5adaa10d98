"""Risk stratification from cell-token cluster composition: composition drives the groups, the merge
orders groups by hazard, and the log-rank test separates tissues whose outcome follows composition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.virtues_risk import cluster_proportions, cumulative_hazard_at, group_tissues, stratify


def _cohort(n_tissues: int = 40, cells: int = 60, seed: int = 0):
    """Two cell states; 'bad' tissues hold mostly state B and die early."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * 4, [6.0] * 4])
    tokens, tissue_of_cell, rows = [], [], []
    for t in range(n_tissues):
        bad = t % 2 == 1
        share_b = 0.8 if bad else 0.2
        states = rng.random(cells) < share_b
        tokens.append(centres[states.astype(int)] + rng.normal(size=(cells, 4)) * 0.3)
        tissue_of_cell += [f"t{t:02d}"] * cells
        rows.append({"tissue_id": f"t{t:02d}", "time": rng.exponential(2.0 if bad else 20.0), "event": rng.random() < 0.9})
    return np.concatenate(tokens), np.array(tissue_of_cell), pd.DataFrame(rows).set_index("tissue_id")


def test_composition_groups_and_logrank_separate_outcomes():
    tokens, tissue_of_cell, outcome = _cohort()
    props = cluster_proportions(tokens, tissue_of_cell, n_clusters=4, seed=0)
    assert props.shape == (40, 4) and np.allclose(props.sum(1), 1)
    groups = group_tissues(props, n_groups=2, seed=0)
    bad = np.array([int(t[1:]) % 2 == 1 for t in groups.index])
    assert len(set(groups[bad])) == 1 and len(set(groups[~bad])) == 1  # composition recovers the two kinds
    result = stratify(groups, outcome["time"], outcome["event"])
    assert (result.risk[bad] == "high").all() and (result.risk[~bad] == "low").all()
    assert result.logrank_p < 1e-3
    with pytest.raises(ValueError, match="clusters"):
        cluster_proportions(tokens[:3], tissue_of_cell[:3], n_clusters=4)


def test_cumulative_hazard_matches_nelson_aalen_by_hand():
    time, event = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 1], bool)
    # at t=3: 1/4 (t=1) + 1/2 (t=3, two at risk)
    assert cumulative_hazard_at(time, event, 3.0) == pytest.approx(1 / 4 + 1 / 2)
    assert cumulative_hazard_at(time, event, 0.5) == pytest.approx(0.0)


def test_cli_writes_groups_and_kaplan_meier(tmp_path, capsys):
    import anndata as ad

    from datamodules.store import DatasetWriter
    from experiments.virtues_risk import main

    tokens, tissue_of_cell, outcome = _cohort(n_tissues=12, seed=1)
    data = tmp_path / "ds"
    with DatasetWriter.create(data) as w:
        w.write_tissues(outcome.reset_index().rename(columns={"time": "survival_time", "event": "survival_event"})
                        .assign(split="train"))
    (tmp_path / "tok" / "cells").mkdir(parents=True)
    for tid in np.unique(tissue_of_cell):
        sel = tissue_of_cell == tid
        ad.AnnData(X=tokens[sel].astype(np.float32), obs=pd.DataFrame({"tissue_id": tid}, index=[f"{tid}:{i}" for i in range(sel.sum())])
                   ).write_h5ad(tmp_path / "tok" / "cells" / f"{tid}.h5ad")
    out = tmp_path / "risk"
    args = ["--tokens", str(tmp_path / "tok"), "--data", str(data), "--out", str(out), "--clusters", "6", "--groups", "2"]
    assert main(args) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "n_tissues"] == 12 and summary.loc[0, "n_high"] + summary.loc[0, "n_low"] == 12
    groups = pd.read_csv(out / "groups.csv")
    assert set(groups["risk"]) == {"high", "low"} and (out / "kaplan_meier.png").stat().st_size > 0
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    assert main(args[:6] + ["--out", str(tmp_path / "x"), "--time-column", "nope"]) == 2


def test_four_groups_merge_into_the_two_riskiest_and_the_two_safest():
    """The paper's setting: four k-means groups, two turning out higher-risk and two lower-risk. Four
    kinds of tissue, each dominated by its own cell state, with mean survival 1, 30, 2, 40 (so the
    high-risk pair is not the first two group ids): the merge must put kinds 0 and 2 in 'high'."""
    rng = np.random.default_rng(5)
    centres = np.eye(4) * 8.0
    mean_survival = [1.0, 30.0, 2.0, 40.0]
    tokens, tissue_of_cell, rows = [], [], []
    for t in range(48):
        kind = t % 4
        states = np.where(rng.random(50) < 0.85, kind, rng.integers(0, 4, 50))
        tokens.append(centres[states] + rng.normal(size=(50, 4)) * 0.3)
        tissue_of_cell += [f"t{t:02d}"] * 50
        rows.append({"tissue_id": f"t{t:02d}", "kind": kind, "time": rng.exponential(mean_survival[kind]), "event": True})
    outcome = pd.DataFrame(rows).set_index("tissue_id")
    props = cluster_proportions(np.concatenate(tokens), np.array(tissue_of_cell), n_clusters=4, seed=0)
    groups = group_tissues(props, n_groups=4, seed=0)
    kind = outcome.loc[groups.index, "kind"]
    assert groups.groupby(kind).nunique().eq(1).all() and groups.nunique() == 4  # one group per kind
    result = stratify(groups, outcome["time"], outcome["event"])
    assert len(result.group_hazard) == 4
    group_of_kind = groups.groupby(kind).first()
    hazard_of_kind = result.group_hazard.loc[group_of_kind.to_numpy()].to_numpy()
    assert min(hazard_of_kind[[0, 2]]) > max(hazard_of_kind[[1, 3]])  # Nelson–Aalen orders the kinds by risk
    assert (result.risk[kind.isin([0, 2])] == "high").all() and (result.risk[kind.isin([1, 3])] == "low").all()
    assert result.logrank_p < 1e-4
