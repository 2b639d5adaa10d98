"""ROSIE cell phenotyping (analysis/rosie_phenotyping.py) against direct computations on small inputs:
the kNN vote, class balancing, top-marker selection, bootstrap F1 CIs, the bulk baseline, confusion
tables, and Leiden + annotation recovering planted cell types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import confusion_matrix, f1_score

from analysis.rosie_phenotyping import (
    CELL_TYPES,
    DEFAULT_TYPE_MARKERS,
    MACRO,
    OTHER,
    ExpressionScaler,
    KnnPhenotyper,
    average_label_proportions,
    balanced_sample,
    bulk_phenotype_labels,
    cluster_reference_labels,
    confusion_tables,
    f1_with_ci,
    load_type_markers,
    per_sample_proportions,
    phenotype_cells,
    plot_confusion,
    plot_f1_bars,
    score_methods,
    top_markers_by_pearson,
)
from datamodules.markers import ROSIE_PANEL


def planted_cells(n_per_type: int = 150, seed: int = 0, with_other: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ROSIE-panel expression of the seven types: each type's table markers 8x brighter, lognormal noise.

    ``with_other`` adds a group whose bright markers (Ki67, PCNA, FoxP3) belong to no type.
    """
    rng = np.random.default_rng(seed)
    col = {m: i for i, m in enumerate(ROSIE_PANEL)}
    groups = {t: [col[m] for m in ms] for t, ms in DEFAULT_TYPE_MARKERS.items()}
    if with_other:
        groups[OTHER] = [col["Ki67"], col["PCNA"], col["FoxP3"]]
    names = list(groups)
    truth = np.repeat(np.arange(len(names)), n_per_type)
    profile = np.ones((len(names), len(ROSIE_PANEL)))
    for i, cols in enumerate(groups.values()):
        profile[i, cols] = 8.0
    x = rng.lognormal(2.0, 0.3, (len(truth), len(ROSIE_PANEL))) * profile[truth]
    x *= rng.lognormal(0.0, 0.3, x.shape)
    return x, np.asarray(names, dtype=object)[truth]


def test_default_type_table_uses_panel_markers_and_the_seven_types() -> None:
    assert set(DEFAULT_TYPE_MARKERS) == set(CELL_TYPES)
    assert {m for ms in DEFAULT_TYPE_MARKERS.values() for m in ms} <= set(ROSIE_PANEL)


def test_leiden_and_annotation_recover_planted_types() -> None:
    x, truth = planted_cells(with_other=True)
    labels, table = cluster_reference_labels(x, ROSIE_PANEL, seed=0)
    assert (labels == truth).mean() > 0.9
    assert set(table["cell_type"]) == {*CELL_TYPES, OTHER}
    again, _ = cluster_reference_labels(x, ROSIE_PANEL, seed=0)
    assert np.array_equal(labels, again)  # deterministic given the seed


@pytest.mark.slow
def test_leiden_above_the_exact_knn_limit_uses_seeded_nn_descent() -> None:
    x, truth = planted_cells(n_per_type=3000, seed=1)  # 21,000 cells: the NN-descent graph (numba compiles)
    labels, _ = cluster_reference_labels(x, ROSIE_PANEL, seed=0)
    assert (labels == truth).mean() > 0.9
    assert np.array_equal(labels, cluster_reference_labels(x, ROSIE_PANEL, seed=0)[0])


def test_knn_labels_equal_a_hand_computed_majority_vote() -> None:
    rng = np.random.default_rng(3)
    markers = ["A", "B", "C"]
    train = np.concatenate([rng.normal([0, 0, 0], 1, (10, 3)), rng.normal([4, 0, 0], 1, (10, 3)),
                            rng.normal([0, 4, 0], 1, (10, 3))])
    labels = np.repeat(["x", "y", "z"], 10)
    knn = KnnPhenotyper.fit(train, markers, labels, ["A", "B"], k=5, log1p=False, seed=0)
    assert len(knn.train_index) == 30  # equal classes of 10: the balanced sample is everything
    queries = rng.normal([2, 2, 0], 2, (40, 3))
    # by hand: z-score A, B with the measured statistics, 5 nearest training cells, most common label
    mu, sd = train[:, :2].mean(0), train[:, :2].std(0)
    ft, fq = (train[:, :2] - mu) / sd, (queries[:, :2] - mu) / sd
    d = np.linalg.norm(fq[:, None] - ft[None], axis=2)
    nearest = np.argsort(d, axis=1, kind="stable")[:, :5]
    expected = []
    for row in labels[nearest]:
        values, counts = np.unique(row, return_counts=True)
        expected.append(values[np.argmax(counts)])  # np.unique sorts: ties go to the first name, as sklearn
    # the predicted expression may come with its columns in another order
    got = knn.predict(queries[:, [2, 1, 0]], ["C", "B", "A"])
    assert list(got) == expected


def test_scaler_is_the_measured_transform_for_predictions() -> None:
    measured = np.array([[1.0, 10.0], [3.0, 30.0], [7.0, 0.0]])
    scaler = ExpressionScaler.fit(measured)
    v = np.log1p(measured)
    np.testing.assert_allclose(scaler.transform(measured), (v - v.mean(0)) / v.std(0))
    predicted = np.array([[-2.0, 5.0]])  # below 0 is clipped to 0 before log1p
    np.testing.assert_allclose(scaler.transform(predicted), ([[0.0, np.log1p(5.0)]] - v.mean(0)) / v.std(0))


def test_balanced_sample_draws_equal_counts() -> None:
    labels = np.array(["a"] * 500 + ["b"] * 40 + ["c"] * 3000)
    idx = balanced_sample(labels, seed=1)
    assert len(np.unique(idx)) == len(idx)
    assert dict(zip(*np.unique(labels[idx], return_counts=True))) == {"a": 40, "b": 40, "c": 40}
    capped = balanced_sample(labels, 30, seed=1)
    assert dict(zip(*np.unique(labels[capped], return_counts=True))) == {"a": 30, "b": 30, "c": 30}
    assert np.array_equal(idx, balanced_sample(labels, seed=1))
    assert not np.array_equal(idx, balanced_sample(labels, seed=2))
    big = np.array(["a"] * 5000 + ["b"] * 4000)
    assert len(balanced_sample(big, max_per_class=100)) == 200
    with pytest.raises(ValueError, match="smallest class"):
        balanced_sample(labels, 41)


def test_top_markers_by_pearson() -> None:
    markers = [f"M{i:02d}" for i in range(30)]
    r = np.linspace(0.9, 0.0, 30)
    table = pd.DataFrame({"method": "rosie", "marker": markers, "pearson_r": r})
    other = pd.DataFrame({"method": "cell_morphology", "marker": markers, "pearson_r": r[::-1]})
    top = top_markers_by_pearson(pd.concat([other, table]), 24)
    assert top == markers[:24]
    with_nan = table.assign(pearson_r=np.where(np.arange(30) == 0, np.nan, r))
    assert top_markers_by_pearson(with_nan, 3) == ["M01", "M02", "M03"]
    assert top_markers_by_pearson({"b": 0.5, "a": 0.5, "c": 0.9}, 2) == ["c", "a"]  # ties by name
    assert top_markers_by_pearson({"DAPI": 0.9, "CD3e": 0.5, "CD8": 0.4}, 2, exclude=["dapi"]) == ["CD3e", "CD8"]
    per_sample = pd.DataFrame({"marker": ["x", "x", "y", "y"], "pearson_r": [0.1, 0.9, 0.6, 0.6]})
    assert top_markers_by_pearson(per_sample, 1) == ["y"]  # mean over samples: x 0.5, y 0.6


def _labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.choice(["B cells", "T cells", "epithelial", OTHER], n, p=[0.2, 0.3, 0.4, 0.1])
    pred = np.where(rng.random(n) < 0.7, ref, rng.choice(["B cells", "T cells", "epithelial", OTHER], n))
    return ref, pred


def test_f1_point_values_and_confusion_equal_sklearn() -> None:
    ref, pred = _labels(3000, 0)
    types = ["B cells", "T cells", "epithelial"]
    table = f1_with_ci(ref, pred, types, n_boot=10)
    expected = f1_score(ref, pred, labels=types, average=None, zero_division=0)
    np.testing.assert_allclose(table["f1"].to_numpy()[:3], expected)
    assert table.iloc[-1]["cell_type"] == MACRO and table.iloc[-1]["f1"] == pytest.approx(expected.mean())
    counts, rows = confusion_tables(ref, pred, types)
    assert list(counts.index) == [*types, OTHER]
    np.testing.assert_array_equal(counts.to_numpy(), confusion_matrix(ref, pred, labels=[*types, OTHER]))
    np.testing.assert_allclose(rows.sum(axis=1), 1.0)


def test_a_type_absent_from_the_reference_is_left_out_of_the_macro() -> None:
    # a cohort without neutrophils: a perfect labelling scores macro 1, not 2/3 (undefined recall is not a miss)
    ref = np.array(["B cells"] * 5 + ["T cells"] * 5)
    table = f1_with_ci(ref, ref.copy(), ["B cells", "T cells", "neutrophils"], n_boot=20).set_index("cell_type")
    assert np.isnan(table.loc["neutrophils", "f1"]) and np.isnan(table.loc["neutrophils", "ci_low"])
    assert table.loc[MACRO, "f1"] == 1.0 and table.loc[MACRO, "ci_low"] == 1.0
    # predicting the absent type is still a miss: F1 0 for it, and lower recall for the type it took cells from
    pred = ref.astype(object)
    pred[0] = "neutrophils"
    table = f1_with_ci(ref, pred, ["B cells", "T cells", "neutrophils"], n_boot=20).set_index("cell_type")
    assert table.loc["neutrophils", "f1"] == 0.0
    assert table.loc[MACRO, "f1"] == pytest.approx((2 * 4 / 9 + 1.0) / 2)


def test_bootstrap_ci_contains_the_estimate_and_equals_a_direct_loop() -> None:
    ref, pred = _labels(60, 1)
    types = ["B cells", "T cells", "epithelial"]
    table = f1_with_ci(ref, pred, types, n_boot=200, seed=7)
    assert ((table["ci_low"] <= table["f1"]) & (table["f1"] <= table["ci_high"])).all()
    # direct loop: the same seeded resamples (multinomial counts of the cells' label pairs), sklearn's F1 on each
    pairs, counts = np.unique(np.stack([ref, pred], 1), axis=0, return_counts=True)
    labels = [*types, OTHER]
    full = np.zeros((4, 4))
    for (r, p), c in zip(pairs, counts):
        full[labels.index(r), labels.index(p)] = c
    draws = np.random.default_rng(7).multinomial(60, full.ravel() / 60, size=200).reshape(200, 4, 4)
    boot = []
    for d in draws:
        r = np.repeat(np.repeat(labels, 4), d.ravel())
        p = np.repeat(np.tile(labels, 4), d.ravel())
        f = f1_score(r, p, labels=types, average=None, zero_division=0)
        boot.append([*f, f.mean()])
    low, high = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(table["ci_low"], low)
    np.testing.assert_allclose(table["ci_high"], high)


def test_bootstrap_ci_matches_resampling_cell_indices() -> None:
    ref, pred = _labels(2000, 2)
    types = ["B cells", "T cells", "epithelial"]
    table = f1_with_ci(ref, pred, types, n_boot=1000, seed=0)
    rng = np.random.default_rng(1)
    boot = [f1_score(ref[i], pred[i], labels=types, average=None, zero_division=0)
            for i in (rng.integers(0, 2000, 2000) for _ in range(400))]
    low, high = np.percentile(np.array(boot), [2.5, 97.5], axis=0)
    np.testing.assert_allclose(table["ci_low"].to_numpy()[:3], low, atol=0.012)
    np.testing.assert_allclose(table["ci_high"].to_numpy()[:3], high, atol=0.012)


def test_bulk_baseline_draws_the_average_sample_proportions() -> None:
    # two samples of very different size: the average of proportions, not the pooled proportion
    ref = np.array(["T cells"] * 900 + ["B cells"] * 100 + ["T cells"] * 10 + ["B cells"] * 90)
    samples = np.array(["s1"] * 1000 + ["s2"] * 100)
    avg = average_label_proportions(ref, samples)
    assert avg.to_dict() == pytest.approx({"B cells": 0.5, "T cells": 0.5})
    many = np.tile(ref, 100)
    bulk = bulk_phenotype_labels(many, np.tile(samples, 100), seed=0)
    assert len(bulk) == len(many)
    assert (bulk == "T cells").mean() == pytest.approx(0.5, abs=0.01)
    assert np.array_equal(bulk, bulk_phenotype_labels(many, np.tile(samples, 100), seed=0))
    fixed = bulk_phenotype_labels(many, np.tile(samples, 100), seed=0, proportions={"a": 1.0, "b": 3.0})
    assert (fixed == "b").mean() == pytest.approx(0.75, abs=0.01)


def test_per_sample_t_cell_proportions() -> None:
    samples = np.array(["a", "a", "b", "b", "b"])
    out = per_sample_proportions({"measured": np.array(["T cells", "B cells", "T cells", "T cells", "other"]),
                                  "rosie": np.array(["T cells"] * 5)}, samples)
    assert out["sample_id"].tolist() == ["a", "b"] and out["n_cells"].tolist() == [2, 3]
    np.testing.assert_allclose(out["measured"], [0.5, 2 / 3])
    np.testing.assert_allclose(out["rosie"], [1.0, 1.0])


def test_end_to_end_phenotyping_and_figures(tmp_path: Path) -> None:
    x, truth = planted_cells(n_per_type=60, seed=4)
    rng = np.random.default_rng(5)
    rosie = x * rng.lognormal(0.0, 0.2, x.shape)
    morphology = rng.permutation(x)
    pearson = pd.DataFrame({"method": "rosie", "marker": ROSIE_PANEL, "pearson_r": rng.uniform(0, 1, 50)})
    samples = rng.integers(0, 6, len(x)).astype(str)
    res = phenotype_cells(x, ROSIE_PANEL, {"rosie": rosie, "cell_morphology": morphology}, pearson, samples,
                          labels=truth, k=20, n_boot=50)
    assert res.markers == top_markers_by_pearson(pearson, 24) and res.cluster_table is None
    assert set(res.predicted) == {"rosie", "cell_morphology", "bulk"}
    macro = res.scores[res.scores["cell_type"] == MACRO].set_index("method")["f1"]
    assert macro["rosie"] > 0.8 > 0.3 > macro["cell_morphology"]
    assert {"measured", "rosie", "bulk"} <= set(res.t_cell_proportions.columns)
    scores = score_methods(res.reference, res.predicted, n_boot=20)
    assert plot_f1_bars(scores, tmp_path / "f1.png").stat().st_size > 0
    assert plot_confusion(res.confusion["rosie"][1], tmp_path / "confusion.png").stat().st_size > 0


def test_type_tables_from_yaml_and_csv(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"T cells": ["CD3e", "CD8"], "epithelial": "PanCK"}))
    assert load_type_markers(tmp_path / "t.yaml") == {"T cells": ("CD3e", "CD8"), "epithelial": ("PanCK",)}
    pd.DataFrame({"cell_type": ["B cells", "B cells"], "marker": ["CD20", "CD79a"]}).to_csv(tmp_path / "t.csv")
    assert load_type_markers(tmp_path / "t.csv") == {"B cells": ("CD20", "CD79a")}
    (tmp_path / "bad.csv").write_text("type,gene\nB,CD20\n")
    with pytest.raises(ValueError, match="cell_type and marker"):
        load_type_markers(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="yaml"):
        load_type_markers(tmp_path / "t.txt")
