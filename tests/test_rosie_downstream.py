"""rosie_downstream wires per-cell tables into phenotyping, SCGP and neighbourhoods correctly.

A prediction that equals the measurement (stride 1, no noise) must give ROSIE perfect agreement
with the measured analyses — F1 1, ARI 1, identical neighbourhood tables — while the morphology
and bulk baselines do not: the test fails if the pipeline mixes up cells, markers or methods.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules.provenance import PREDICTION
from datamodules.store import DatasetStore, DatasetWriter
from experiments.rosie_downstream import main, run


def exact_prediction(truth_root: Path, out: Path) -> Path:
    """A rosie_predict-shaped folder whose codex images are the measured ones (the oracle)."""
    truth = DatasetStore(str(truth_root))
    names = [str(n) for n in truth.channels("codex")["channel_name"]]
    with DatasetWriter.create(out, overwrite=True, kind=PREDICTION) as w:
        for tid in truth.tissue_ids():
            w.write_image("codex", tid, truth.image("codex", tid, 0.5).read_all().astype(np.float32), 0.5, names)
        w.write_channels("codex", truth.channels("codex"))
        w.write_tissues(pd.DataFrame({"tissue_id": truth.tissue_ids()}))
    return out


@pytest.fixture(scope="module")
def oracle(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    pred = exact_prediction(synthetic_dataset, tmp_path_factory.mktemp("pred") / "oracle")
    out = tmp_path_factory.mktemp("down") / "downstream"
    result = run(pred, synthetic_dataset, out, split="train", parts=("phenotyping", "scgp", "neighbourhoods"),
                 morphology_epochs=3, knn_k=5, n_boot=50, seed=0)
    return {"result": result, "out": out}


def test_a_perfect_prediction_reproduces_every_measured_analysis(oracle: dict) -> None:
    tables = oracle["result"]["tables"]
    f1 = tables["phenotyping_f1"].set_index(["method", "cell_type"])["f1"]
    assert f1[("rosie", "macro")] == pytest.approx(1.0)
    assert f1[("bulk", "macro")] < 0.6 and f1[("cell_morphology", "macro")] < 1.0
    scgp = tables["scgp_scores"]
    np.testing.assert_allclose(scgp.loc[scgp["method"] == "rosie", "ari"], 1.0)
    hoods = tables["neighbourhoods"]
    measured = hoods[hoods["method"] == "measured"].drop(columns="method").reset_index(drop=True)
    rosie = hoods[hoods["method"] == "rosie"].drop(columns="method").reset_index(drop=True)
    pd.testing.assert_frame_equal(measured, rosie)


def test_outputs_and_report(oracle: dict) -> None:
    out = oracle["out"]
    for name in ("phenotyping_f1.csv", "scgp_scores.csv", "neighbourhoods.csv", "neighbourhood_correlations.csv",
                 "t_cell_proportions.csv", "downstream.json", "downstream.md", "phenotyping_f1.png", "scgp_maps.png"):
        assert (out / name).is_file(), name
    report = (out / "downstream.md").read_text()
    assert "| ROSIE | 1.000" in report and "0.475" in report  # ours beside the paper's SCGP ARI


def test_command_refuses_bad_input_with_one_line(synthetic_dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["--pred", str(synthetic_dataset), "--truth", str(synthetic_dataset), "--out", str(tmp_path / "o"),
                 "--parts", "phenotyping,astrology"]) == 2
    assert "unknown ['astrology']" in capsys.readouterr().err
    assert main(["--pred", str(tmp_path / "none"), "--truth", str(synthetic_dataset), "--out", str(tmp_path / "o"),
                 "--knn-k", "0"]) == 2
    assert "--knn-k 0" in capsys.readouterr().err
