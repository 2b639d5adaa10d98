"""The cell-type probe: the paper's logistic regression, split by tissue, scored on test cells only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.virtues_probes import linear_probe


def _blobs(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + noise * rng.normal(size=(n, dim)), np.array([f"type{k}" for k in y])


def test_probe_scores_match_sklearn_metrics_and_separability():
    from sklearn.metrics import accuracy_score, f1_score

    xtr, ytr = _blobs(400, 4, 8, 0.3, 0)
    xte, yte = _blobs(200, 4, 8, 0.3, 1)
    easy = linear_probe("easy", xtr, ytr, xte, yte)
    assert easy.accuracy == 1.0 and easy.macro_f1 == 1.0 and easy.n_train == 400 and easy.n_test == 200
    hard = linear_probe("hard", *_blobs(400, 4, 8, 6.0, 0), *_blobs(200, 4, 8, 6.0, 1))
    assert 0.25 < hard.accuracy < 0.9
    pred_classes = hard.confusion.to_numpy()
    assert pred_classes.sum() == 200
    # accuracy and macro-F1 are sklearn's on the predictions implied by the confusion matrix
    truth = np.repeat(hard.confusion.index.to_numpy(), pred_classes.sum(1))
    pred = np.concatenate([np.repeat(hard.confusion.columns.to_numpy(), row) for row in pred_classes])
    assert hard.accuracy == pytest.approx(accuracy_score(truth, pred))
    assert hard.macro_f1 == pytest.approx(f1_score(truth, pred, average="macro"))
    with pytest.raises(ValueError, match="two classes"):
        linear_probe("one", xtr, ["a"] * len(xtr), xte, yte)


def test_cli_splits_by_tissue_and_compares_with_mean_expression(tmp_path, capsys):
    import anndata as ad

    from datamodules.store import DatasetWriter
    from experiments.virtues_cell_probe import main

    data = tmp_path / "ds"
    with DatasetWriter.create(data) as w:
        w.write_tissues(pd.DataFrame({"tissue_id": ["a", "b", "c"], "split": ["train", "train", "test"]}))
    tokens = tmp_path / "tokens"
    (tokens / "cells").mkdir(parents=True)
    for k, tid in enumerate(["a", "b", "c"]):
        x, y = _blobs(150, 3, 6, 0.5, k)
        expr, _ = _blobs(150, 3, 4, 50.0, k + 10)  # mean expression: uninformative here
        cells = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"tissue_id": tid, "cell_id": np.arange(1, 151),
                                                                      "cell_type": y}, index=[f"{tid}:{i}" for i in range(150)]))
        cells.obsm["mean_expression"] = expr.astype(np.float32)
        cells.write_h5ad(tokens / "cells" / f"{tid}.h5ad")
    out = tmp_path / "probe"
    assert main(["--tokens", str(tokens), "--data", str(data), "--out", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("features")
    assert summary.loc["virtues_cell_tokens", "n_train"] == 300 and summary.loc["virtues_cell_tokens", "n_test"] == 150
    assert summary.loc["virtues_cell_tokens", "accuracy"] > 0.95 > summary.loc["mean_expression", "accuracy"]
    assert (out / "per_class_f1.png").stat().st_size > 0 and (out / "confusion_virtues_cell_tokens.csv").exists()
    assert main(["--tokens", str(tokens), "--data", str(data), "--out", str(out)]) == 2  # no silent overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main(["--tokens", str(tokens), "--data", str(data), "--out", str(tmp_path / "x"), "--label", "nope"]) == 2
