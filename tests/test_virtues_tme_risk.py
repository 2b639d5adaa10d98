"""TME-structure risk ratios (paper Fig. 4d, Suppl. Fig. 18): risk ratio and Katz CI by hand, the
zero-cell correction, the survival-only baseline rule, and the command on a planted cohort where
one structure drives risk and another does not."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from analysis.virtues_tme_risk import (
    risk_ratio,
    structure_columns,
    structure_risk_ratios,
    survival_baseline_risk,
)
from datamodules.store import DatasetWriter


def test_risk_ratio_and_katz_interval_by_hand():
    rr = risk_ratio(30, 50, 10, 50)
    se = np.sqrt(1 / 30 - 1 / 50 + 1 / 10 - 1 / 50)
    assert rr.risk_ratio == pytest.approx(3.0)
    assert rr.ci_low == pytest.approx(3.0 * np.exp(-1.959964 * se), rel=1e-5)
    assert rr.ci_high == pytest.approx(3.0 * np.exp(1.959964 * se), rel=1e-5)
    assert not rr.corrected
    zero = risk_ratio(0, 20, 5, 25)  # Haldane–Anscombe: 0.5 added to every cell
    expect = (0.5 / 21) / (5.5 / 26)
    assert zero.corrected and zero.risk_ratio == pytest.approx(expect)
    assert zero.ci_high == pytest.approx(expect * np.exp(1.959964 * np.sqrt(1 / 0.5 - 1 / 21 + 1 / 5.5 - 1 / 26)), rel=1e-5)
    assert np.isnan(risk_ratio(0, 10, 0, 12).risk_ratio) and np.isnan(risk_ratio(10, 10, 12, 12).risk_ratio)
    with pytest.raises(ValueError):
        risk_ratio(11, 10, 0, 5)


def test_structure_table_and_column_selection():
    table = pd.DataFrame({"has_a": [1, 1, 1, 0, 0, 0, 1, 0], "has_b": ["True", "false", "TRUE", "False", "true", None,
                                                                      "false", "true"], "grade": range(8)},
                         index=[f"t{i}" for i in range(8)])
    assert structure_columns(table) == ["has_a", "has_b"] and structure_columns(table, ["has_b"]) == ["has_b"]
    with pytest.raises(ValueError, match="starts with"):
        structure_columns(table, "is_")
    risk = pd.Series(["high"] * 4 + ["low"] * 4, index=table.index)
    out = structure_risk_ratios(risk, table, ["has_a", "has_b"]).set_index("structure")
    assert out.loc["has_a", ["n_high_with", "n_high", "n_low_with", "n_low"]].tolist() == [3, 4, 1, 4]
    assert out.loc["has_a", "risk_ratio"] == pytest.approx(3.0)
    # has_b: t5 has no value; high 2 of 4, low 2 of 3
    assert out.loc["has_b", ["n_high_with", "n_high", "n_low_with", "n_low"]].tolist() == [2, 4, 2, 3]
    assert out.loc["has_b", "risk_ratio"] == pytest.approx((2 / 4) / (2 / 3))
    with pytest.raises(ValueError, match="boolean"):
        structure_risk_ratios(risk, table, ["grade"])


def test_survival_baseline_rule():
    time = pd.Series([5.0, 50.0, 10.0, 80.0, 30.0, np.nan], index=list("abcdef"))
    event = pd.Series([0, 1, 0, 0, 1, 1], index=list("abcdef"))
    risk, horizon = survival_baseline_risk(time, event)
    assert horizon == 30.0  # median follow-up of the five with an outcome
    assert risk.to_dict() == {"a": "high", "b": "high", "c": "high", "d": "low", "e": "high"}
    risk, _ = survival_baseline_risk(time, event, horizon=8.0)
    assert risk["c"] == "low" and risk["a"] == "high"


def planted_cohort(tmp_path, n: int = 40, seed: int = 0):
    """Tissues whose cells are of a 'bad' kind in proportion to ``has_bad``; survival is short with it.
    ``has_neutral`` is a coin flip, unrelated to both."""
    rng = np.random.default_rng(seed)
    (tmp_path / "tokens" / "cells").mkdir(parents=True)
    rows = []
    for i in range(n):
        bad = i % 2 == 0
        tid = f"t{i:02d}"
        k = 30
        kinds = rng.uniform(size=k) < (0.8 if bad else 0.1)
        x = np.where(kinds[:, None], 4.0, -4.0) + rng.normal(size=(k, 3))
        obs = pd.DataFrame({"tissue_id": tid, "cell_id": np.arange(1, k + 1)}, index=[f"{tid}:{j}" for j in range(k)])
        ad.AnnData(X=x.astype(np.float32), obs=obs).write_h5ad(tmp_path / "tokens" / "cells" / f"{tid}.h5ad")
        rows.append({"tissue_id": tid, "split": "test", "survival_time": float(rng.exponential(10 if bad else 60)),
                     "survival_event": int(rng.uniform() < 0.8), "has_bad": bad, "has_neutral": bool(rng.uniform() < 0.5)})
    with DatasetWriter.create(tmp_path / "data") as writer:
        writer.write_tissues(pd.DataFrame(rows))
    return tmp_path / "tokens", tmp_path / "data", pd.DataFrame(rows).set_index("tissue_id")


def test_command_from_tokens_and_from_risk_groups(tmp_path, capsys):
    from experiments.virtues_tme_risk import main, tme_risk_ratios

    tokens, data, tissues = planted_cohort(tmp_path)
    out = tmp_path / "out"
    assert main(["--data", str(data), "--tokens", str(tokens), "--out", str(out), "--clusters", "4", "--groups", "2"]) == 0
    table = pd.read_csv(out / "risk_ratios.csv").set_index(["stratification", "structure"])
    bad = table.loc[("virtues_cell_tokens", "has_bad")]
    assert bad["risk_ratio"] > 5 and bad["ci_low"] > 1  # the structure that drives risk is enriched in high risk
    neutral = table.loc[("virtues_cell_tokens", "has_neutral")]
    assert neutral["ci_low"] < 1 < neutral["ci_high"]
    assert ("survival_only", "has_bad") in table.index
    groups = pd.read_csv(out / "groups.csv")
    assert set(groups.columns) == {"tissue_id", "virtues_cell_tokens", "survival_only"} and len(groups) == 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structures"] == ["has_bad", "has_neutral"] and summary["logrank_p"] < 0.05
    assert (out / "tme_risk_ratios.png").stat().st_size > 0

    # from a virtues_risk-style groups.csv: the same numbers when the groups are the same
    risk_dir = tmp_path / "risk"
    risk_dir.mkdir()
    groups[["tissue_id", "virtues_cell_tokens"]].rename(columns={"virtues_cell_tokens": "risk"}).to_csv(
        risk_dir / "groups.csv", index=False)
    again = tme_risk_ratios(data, risk_groups=risk_dir, structures=["has_bad"])
    row = again.risk_ratios.set_index(["stratification", "structure"]).loc[("virtues_cell_tokens", "has_bad")]
    assert row["risk_ratio"] == pytest.approx(bad["risk_ratio"]) and again.logrank_p is None
    # the survival baseline by hand
    t, e = tissues["survival_time"], tissues["survival_event"].astype(bool)
    high = e | (t < t.median())
    a, c = int((high & tissues["has_bad"]).sum()), int((~high & tissues["has_bad"]).sum())
    base = again.risk_ratios.set_index("stratification").loc["survival_only"]
    assert base["risk_ratio"] == pytest.approx((a / high.sum()) / (c / (~high).sum()))
    capsys.readouterr()
    assert main(["--data", str(data), "--tokens", str(tokens), "--out", str(tmp_path / "o2"), "--structures", "is_"]) == 2
    assert "is_" in capsys.readouterr().err
