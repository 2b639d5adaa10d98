"""Treatment response (paper Fig. 5b): entropic W2 equals POT called directly (and is close to the
exact W2), raw-scale ε underflows the plain solver, planted shifts come out in the planted direction
for responders and not for non-responders, and the command writes its tables and figure."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import ot
import pandas as pd
import pytest

from analysis.virtues_treatment_response import (
    cap_rows,
    cohort_trajectories,
    embedding_subsample,
    entropic_w2,
    patient_distances,
    seeded_rng,
)
from datamodules.store import DatasetWriter


def test_entropic_w2_equals_pot_called_directly_and_is_close_to_exact():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 6)) * 5
    b = rng.normal(size=(25, 6)) * 5 + 3
    got = entropic_w2(a, b, epsilon=1e-3, max_iter=3000, stop=1e-9)
    cost = ot.dist(a, b)  # squared Euclidean
    direct = ot.sinkhorn2(ot.unif(30), ot.unif(25), cost / cost.max(), 1e-3, method="sinkhorn_log", numItermax=3000,
                          stopThr=1e-9)
    assert got.value == pytest.approx(np.sqrt(direct * cost.max()), rel=1e-9)
    assert got.cost_scale == pytest.approx(cost.max())
    exact = np.sqrt(ot.emd2(ot.unif(30), ot.unif(25), cost))
    assert got.value == pytest.approx(exact, rel=0.01)
    assert entropic_w2(a, a).value < 0.05 * exact
    # the same ε on the raw costs (tens to hundreds) underflows the plain Sinkhorn: NaN or a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = ot.sinkhorn2(ot.unif(30), ot.unif(25), cost, 1e-3, numItermax=200)
    assert not np.isfinite(plain) or caught


def planted_cohort(rng: np.random.Generator, n_patients: int = 8, cells: int = 40, dims: int = 2,
                   responder_step: tuple = (3.0, 0.0), non_responder_step: tuple = (0.0, 0.3)):
    """Cells of each patient at pre/on/post; responders move by ``responder_step`` per step, non-responders
    by ``non_responder_step`` (in the first two dimensions), every patient from its own offset."""
    feats, patient, time, response = [], [], [], []
    for p in range(n_patients):
        resp = p % 2
        offset = rng.normal(scale=0.3, size=dims)
        step = np.zeros(dims)
        step[:2] = responder_step if resp else non_responder_step
        for k, t in enumerate(("pre", "on", "post")):
            feats.append(rng.normal(size=(cells, dims)) * 0.5 + offset + k * step)
            patient += [f"p{p}"] * cells
            time += [t] * cells
            response += [resp] * cells
    return np.concatenate(feats), np.array(patient), np.array(time), np.array(response)


def test_planted_shift_comes_out_in_the_planted_direction():
    x, patient, time, response = planted_cohort(np.random.default_rng(0))
    dist = patient_distances(x, patient, time, response, max_iter=500)
    assert len(dist) == 8 * 2 and set(zip(dist["t1"], dist["t2"])) == {("pre", "on"), ("on", "post")}
    assert dist.loc[dist["response"] == 1, "w2"].min() > dist.loc[dist["response"] == 0, "w2"].max()
    assert dist.loc[dist["response"] == 1, "w2"].mean() == pytest.approx(3.0, rel=0.2)

    traj = cohort_trajectories(x, patient, time, response, support=60, seed=0)
    d = traj.displacements.set_index(["cohort", "t1"])
    for t1 in ("pre", "on"):
        dx, dy = d.loc[("responders", t1), ["dx", "dy"]]
        assert dx == pytest.approx(3.0, abs=0.4) and abs(dy) < 0.4
        dx, dy = d.loc[("non_responders", t1), ["dx", "dy"]]
        assert abs(dx) < 0.4 and dy == pytest.approx(0.3, abs=0.3)
    assert traj.barycentres[("responders", "pre")].shape == (60, 2)
    # the non-responders' displacement is the smaller one, and the two point in different directions
    r = d.xs("responders", level="cohort")[["dx", "dy"]].to_numpy()
    n = d.xs("non_responders", level="cohort")[["dx", "dy"]].to_numpy()
    assert (np.linalg.norm(r, axis=1) > 3 * np.linalg.norm(n, axis=1)).all()


def test_caps_and_subsamples_are_seeded():
    assert cap_rows(5, 10, seeded_rng(0, "a")).tolist() == [0, 1, 2, 3, 4]
    one = cap_rows(100, 10, seeded_rng(3, "p1", "pre"))
    assert len(one) == 10 and np.array_equal(one, cap_rows(100, 10, seeded_rng(3, "p1", "pre")))
    assert not np.array_equal(one, cap_rows(100, 10, seeded_rng(3, "p1", "on")))
    sub = embedding_subsample(1000, 0.1, seed=0)
    assert len(sub) == 100 and np.array_equal(sub, np.unique(sub))
    x, patient, time, response = planted_cohort(np.random.default_rng(1), n_patients=2, cells=30)
    capped = patient_distances(x, patient, time, response, max_cells=10, max_iter=300)
    assert (capped["n_used_t1"] == 10).all() and (capped["n_cells_t1"] == 30).all()
    again = patient_distances(x, patient, time, response, max_cells=10, max_iter=300)
    np.testing.assert_array_equal(capped["w2"], again["w2"])


def test_command_writes_tables_figure_for_tokens_and_mean_expression(tmp_path, capsys):
    from experiments.virtues_treatment_response import main, treatment_response

    rng = np.random.default_rng(2)
    x, patient, time, response = planted_cohort(rng, n_patients=6, cells=30, dims=6)
    markers = rng.normal(size=(len(x), 3))  # mean abundances that do not move
    (tmp_path / "tokens" / "cells").mkdir(parents=True)
    tissues = []
    for p in np.unique(patient):
        for t in ("pre", "on", "post"):
            idx = np.flatnonzero((patient == p) & (time == t))
            tid = f"{p}_{t}"
            if p == "p0" and t == "post":
                continue  # a patient without its last sample: one transition only
            obs = pd.DataFrame({"tissue_id": tid, "cell_id": np.arange(1, len(idx) + 1)},
                               index=[f"{tid}:{i}" for i in range(len(idx))])
            cells = ad.AnnData(X=x[idx].astype(np.float32), obs=obs)
            cells.obsm["mean_expression"] = markers[idx].astype(np.float32)
            cells.write_h5ad(tmp_path / "tokens" / "cells" / f"{tid}.h5ad")
            tissues.append({"tissue_id": tid, "patient_id": p, "timepoint": t, "response": int(response[idx[0]]),
                            "split": "test"})
    tissues.append({"tissue_id": "unlabelled", "patient_id": None, "timepoint": None, "response": None, "split": "test"})
    with DatasetWriter.create(tmp_path / "data") as writer:
        writer.write_tissues(pd.DataFrame(tissues))
    out = tmp_path / "out"
    args = ["--tokens", str(tmp_path / "tokens"), "--data", str(tmp_path / "data"), "--out", str(out),
            "--embedding", "pca", "--support", "40", "--sinkhorn-iterations", "300", "--no-progress"]
    assert main(args) == 0
    dist = pd.read_csv(out / "w2_per_patient.csv")
    assert set(dist["representation"]) == {"virtues_cell_tokens", "mean_expression"}
    assert len(dist) == 2 * (6 * 2 - 1)
    cohorts = pd.read_csv(out / "cohort_w2.csv").set_index(["representation", "t1"])
    tok = cohorts.loc[("virtues_cell_tokens", "pre")]
    assert tok["mean_w2_responders"] > 2 * tok["mean_w2_non_responders"]
    base = cohorts.loc[("mean_expression", "pre")]
    assert base["mean_w2_responders"] < tok["mean_w2_responders"]
    disp = pd.read_csv(out / "displacement.csv")
    norms = disp[disp["representation"] == "virtues_cell_tokens"].groupby("cohort")["norm"].mean()
    assert norms["responders"] > 3 * norms["non_responders"]
    emb = pd.read_csv(out / "embedding.csv")
    assert len(emb) == 2 * round(0.1 * (6 * 3 - 1) * 30)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == 1e-3 and summary["n_patients"] == 6 and summary["responders_shift_more"]
    assert summary["contrast"]["virtues_cell_tokens"]["pre->on"]["displacement_norm_ratio"] > 3
    assert (out / "treatment_response.png").stat().st_size > 0
    # the library call gives the same distances
    direct = treatment_response(tmp_path / "tokens", tmp_path / "data", embedding="pca", support=40,
                                sinkhorn_iterations=300, progress=False)
    np.testing.assert_allclose(direct.distances["w2"], dist["w2"])
    capsys.readouterr()
    assert main([*args[:5], str(tmp_path / "o2"), "--response-column", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
