"""OT retrieval: W2 between token sets, ranking without the query's own patient, the paper's
label / composition scores and McNemar test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.virtues_retrieval import (
    allowed_matches,
    central_grid_corners,
    composition_l1,
    distance_matrix,
    expected_random_precision,
    label_hits,
    label_retrieval_table,
    mcnemar,
    rank_matches,
    wasserstein2,
)


def test_central_grid_and_too_small_images():
    c = central_grid_corners(600, 700, grid=4)
    assert c.shape == (16, 2) and c[0].tolist() == [44, 94] and c[-1].tolist() == [44 + 384, 94 + 384]
    assert central_grid_corners(500, 700, grid=4) is None
    assert central_grid_corners(256, 256, grid=2).tolist() == [[0, 0], [0, 128], [128, 0], [128, 128]]


def test_wasserstein2_known_values():
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert wasserstein2(a, a) == pytest.approx(0.0, abs=1e-9)
    assert wasserstein2(a, a + [0.0, 3.0]) == pytest.approx(3.0)  # a translation moves every point by 3
    # one-dimensional sets: W2 pairs sorted values
    x, y = np.array([[0.0], [4.0]]), np.array([[1.0], [2.0]])
    assert wasserstein2(x, y) == pytest.approx(np.sqrt((1 + 4) / 2))


def test_ranking_excludes_self_and_same_patient_and_finds_the_twin():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 5)) * 10
    sets = [centres[k % 3] + rng.normal(size=(4, 5)) * 0.1 for k in range(6)]  # tissues k and k+3 are twins
    patients = ["p0", "p1", "p2", "p3", "p4", "p0"]  # tissue 5 shares tissue 0's patient
    d = distance_matrix(sets)
    assert np.allclose(d, d.T) and np.allclose(np.diag(d), 0)
    allowed = allowed_matches(patients)
    ranking = rank_matches(d, allowed)
    assert ranking[1][0] == 4 and ranking[2][0] == 5 and ranking[3][0] == 0
    assert 5 not in ranking[0] and 0 not in ranking[5] and all(i not in r for i, r in enumerate(ranking))
    labels = ["a", "b", "c", "a", "b", "c"]
    hits = label_hits(ranking, labels, k=3)
    assert hits[:, 0].all() and not hits[:, 1:].any()  # the twin comes first; the others have other labels
    table = label_retrieval_table(ranking, allowed, pd.DataFrame({"kind": labels}))
    assert table.loc[0, "precision_at_3"] > table.loc[0, "random_precision"]
    props = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    top, rand = composition_l1(props, ranking, allowed)
    assert top < rand


def test_mcnemar_matches_the_formula_and_scipy_chi2():
    from scipy.stats import chi2

    method = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)
    base = np.array([0, 0, 1, 0, 0, 1, 1, 0], bool)
    n1, n2, p = mcnemar(method, base)
    assert (n1, n2) == (4, 1) and p == pytest.approx(chi2.sf((4 - 1) ** 2 / 5, 1))
    assert mcnemar(method, method) == (0, 0, 1.0)


def test_expected_random_precision_is_exact():
    allowed = allowed_matches(["a", "b", "c", "d"])
    assert expected_random_precision(allowed, ["x", "x", "y", "y"]) == pytest.approx(1 / 3)


def test_cli_on_synthetic_tissues(synthetic_dataset, tmp_path, capsys):
    import torch

    from datamodules.store import DatasetStore
    from experiments.virtues_retrieval import default_label_columns, main
    from tests.test_virtues_reconstruct import save_random_checkpoint

    store = DatasetStore(synthetic_dataset)
    ids = store.embedding_ids()
    ckpt = save_random_checkpoint(tmp_path / "tiny.ckpt", ids, torch.stack([store.embedding(u) for u in ids]))
    out = tmp_path / "retrieval"
    args = ["--ckpt", str(ckpt), "--data", str(synthetic_dataset), "--out", str(out), "--grid", "1", "--device", "cpu",
            "--no-progress", "--pixels-per-tissue", "500"]
    assert main(args) == 0
    labels = pd.read_csv(out / "labels.csv")
    assert set(labels["label"]) == set(default_label_columns(store.tissues())) and len(labels) > 0
    assert "n_cells" not in set(labels["label"])  # a count is not a label
    d = pd.read_csv(out / "distances.csv", index_col=0)
    assert sorted(d.index) == sorted(store.tissue_ids()) and np.allclose(d.to_numpy(), d.to_numpy().T)
    matches = pd.read_csv(out / "matches.csv")
    assert (matches["query"] != matches["match"]).all() and matches.groupby("query")["rank"].max().eq(3).all()
    for _, row in matches.iterrows():  # one crop per tissue: W2 between single points is their distance
        assert row["w2"] == pytest.approx(d.loc[row["query"], row["match"]])
    comp = pd.read_csv(out / "composition.csv")
    assert len(comp) == 2 and (comp[["closest_match", "random_match"]] >= 0).all().all()
    assert (out / "retrieval.png").stat().st_size > 0
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    big = ["--ckpt", str(ckpt), "--data", str(synthetic_dataset), "--out", str(tmp_path / "big"), "--grid", "4",
           "--device", "cpu", "--no-progress"]
    assert main(big) == 2  # 128-px images hold no 4x4 grid of 128-px crops
    assert "at least 3" in capsys.readouterr().err


def test_cli_ranks_a_planted_near_duplicate_first(synthetic_dataset, tmp_path):
    """A copy of one tissue's image (another patient, 1 % multiplicative noise) added to the dataset must
    come back as that tissue's closest match and vice versa, through the whole command (crops, tokens, W2)."""
    import shutil

    import torch

    from datamodules.statistics import compute_and_store_statistics
    from datamodules.store import DatasetStore, DatasetWriter
    from experiments.virtues_retrieval import main
    from tests.test_virtues_reconstruct import save_random_checkpoint

    data = tmp_path / "with_twin"
    shutil.copytree(synthetic_dataset, data)
    store = DatasetStore(data)
    mpp = store.resolutions("imc")[0]
    original = store.tissue_ids()[0]
    image = store.image("imc", original, mpp)
    pixels = np.asarray(image.read(0, 0, image.shape[1], image.shape[2]))
    noisy = (pixels * (1 + 0.01 * np.random.default_rng(0).standard_normal(pixels.shape))).astype(pixels.dtype)
    writer = DatasetWriter.open(data, create=False)
    writer.write_image("imc", "twin", noisy, mpp, [str(n) for n in store.channels("imc")["channel_name"]])
    writer.write_tissue_mask("twin", mpp, store.tissue_mask(original, mpp))
    row = store.tissues().set_index("tissue_id").loc[[original]].reset_index().assign(tissue_id="twin")
    if "patient_id" in row:
        row["patient_id"] = "patient-of-twin"
    writer.append_tissues(row)
    compute_and_store_statistics(str(data), "imc", mpp, force=True)

    ids = store.embedding_ids()
    ckpt = save_random_checkpoint(tmp_path / "tiny.ckpt", ids, torch.stack([store.embedding(u) for u in ids]))
    out = tmp_path / "retrieval"
    assert main(["--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--grid", "1", "--device", "cpu",
                 "--no-progress", "--pixels-per-tissue", "200"]) == 0
    first = pd.read_csv(out / "matches.csv").query("rank == 1").set_index("query")["match"]
    assert first[original] == "twin" and first["twin"] == original
    d = pd.read_csv(out / "distances.csv", index_col=0)
    others = d.loc[original].drop([original, "twin"])
    assert d.loc[original, "twin"] < 0.2 * others.min()  # a near-copy, not a narrow win
