"""Cross-panel cell-type transfer (paper Fig. 3e–g): channel-subset tokens equal the tokens of a
dataset that measured only those channels; the random forest trained on one dataset's labels beats
chance on every class of the other and beats (or matches) mean marker abundances on planted data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from analysis.virtues_cross_panel import (
    balanced_downsample,
    chance_f1,
    per_class_f1,
    shared_columns,
    transfer_random_forest,
)
from datamodules.store import DatasetStore, DatasetWriter


def subset_dataset(src: Path, out: Path, channel_names: list[str], tissue_id: str) -> Path:
    """A copy of one tissue of ``src`` whose imc panel holds only ``channel_names`` (same pixels,
    masks, cells, statistics and embeddings): what a lab with the smaller panel would have measured."""
    store = DatasetStore(src)
    panel = store.channels("imc")
    rows = panel[panel["channel_name"].isin(channel_names)].reset_index(drop=True)
    index = [int(i) for i in panel.index[panel["channel_name"].isin(channel_names)]]
    image = store.image("imc", tissue_id, 1.0)
    _, h, w = image.shape
    stats = store.standardization("imc", 1.0)
    names = rows["channel_name"].astype(str).tolist()
    with DatasetWriter.create(out) as writer:
        writer.write_tissues(store.tissues().query("tissue_id == @tissue_id"))
        cells = store.cells()
        writer.write_cells(cells[cells["tissue_id"] == tissue_id])
        writer.write_channels("imc", rows)
        writer.write_image("imc", tissue_id, np.asarray(image.read(0, 0, h, w, index)), 1.0, names)
        writer.write_tissue_mask(tissue_id, 1.0, store.tissue_mask(tissue_id, 1.0))
        writer.write_cell_mask(tissue_id, 1.0, store.cell_mask(tissue_id, 1.0))
        writer.write_standardization("imc", 1.0, stats.upper_quantiles[names], stats.means[names], stats.stds[names])
        for uid in rows["uniprot_id"].dropna():
            writer.write_embedding(str(uid), store.embedding(str(uid)))
    return out


@pytest.mark.slow
def test_channel_subset_tokens_equal_tokens_of_a_dataset_with_only_those_channels(synthetic_dataset, tmp_path):
    from experiments.virtues_tokens import main
    from tests.test_virtues_reconstruct import save_random_checkpoint

    store = DatasetStore(synthetic_dataset)
    ids = store.embedding_ids()
    ckpt = save_random_checkpoint(tmp_path / "tiny.ckpt", ids, torch.stack([store.embedding(u) for u in ids]))
    (tid,) = store.tissue_ids("test")
    panel = store.channels("imc")
    usable = panel[panel["uniprot_id"].notna()]["channel_name"].astype(str).tolist()
    chosen = usable[::3][:6]
    small = subset_dataset(synthetic_dataset, tmp_path / "small", chosen, tid)
    common = ["--ckpt", str(ckpt), "--split", "test", "--device", "cpu", "--no-progress", "--batch-size", "16"]
    # the small dataset holds only its own markers' embeddings; the checkpoint's others come from the big one
    emb = ["--embeddings", str(synthetic_dataset / "marker_embeddings")]
    assert main([*common, *emb, "--data", str(small), "--out", str(tmp_path / "t_small")]) == 0
    assert main([*common, "--data", str(synthetic_dataset), "--out", str(tmp_path / "t_from"),
                 "--channels-from", str(small)]) == 0
    ref = ad.read_h5ad(tmp_path / "t_small" / "cells" / f"{tid}.h5ad")
    assert ref.uns["mean_expression_channels"].tolist() == chosen
    for name in ("t_from",):
        sub = ad.read_h5ad(tmp_path / name / "cells" / f"{tid}.h5ad")
        assert sub.uns["mean_expression_channels"].tolist() == chosen
        np.testing.assert_allclose(sub.X, ref.X, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sub.obsm["mean_expression"], ref.obsm["mean_expression"], rtol=1e-6)
        assert json.loads((tmp_path / name / "records" / f"{tid}.json").read_text())["channels"] == chosen
    # a name outside the panel is one error line, exit 2
    assert main([*common, "--data", str(synthetic_dataset), "--out", str(tmp_path / "bad"), "--channels", "NOPE"]) == 2


def test_select_channels_by_name_uniprot_id_or_other_panel(synthetic_dataset, tmp_path):
    from experiments.virtues_tokens import select_channels

    store = DatasetStore(synthetic_dataset)
    panel = store.channels("imc")
    usable = [i for i in range(len(panel)) if pd.notna(panel["uniprot_id"].iloc[i])]
    rows = [100 + i for i in usable]  # stand-ins for the model's marker-table rows
    names = panel["channel_name"].astype(str)
    want = [names.iloc[usable[4]], str(panel["uniprot_id"].iloc[usable[1]]).lower(), names.iloc[usable[7]]]
    channels, marker_rows = select_channels(store, "imc", usable, rows, want)
    assert channels == sorted([usable[1], usable[4], usable[7]]) and marker_rows == [100 + c for c in channels]
    assert select_channels(store, "imc", usable, rows) == (usable, rows)
    small = subset_dataset(synthetic_dataset, tmp_path / "small", [names.iloc[i] for i in usable[2:5]],
                           store.tissue_ids("test")[0])
    assert select_channels(store, "imc", usable, rows, other=DatasetStore(small))[0] == usable[2:5]
    with pytest.raises(ValueError, match="not in"):
        select_channels(store, "imc", usable, rows, ["NOPE"])
    no_uid = [n for n, u in zip(names, panel["uniprot_id"]) if pd.isna(u)]
    with pytest.raises(ValueError, match="none of"):
        select_channels(store, "imc", usable, rows, no_uid[:1])


def planted_cells(rng: np.random.Generator, n: int, classes: list[str], shift: float, noise_dims: int) -> tuple:
    """Tokens where each class sits at its own centre (plus a dataset shift); mean abundances where
    two classes share one centre (the markers cannot tell them apart)."""
    y = rng.choice(classes, size=n, p=np.linspace(1, 2, len(classes)) / np.linspace(1, 2, len(classes)).sum())
    k = np.array([classes.index(c) for c in y])
    centres = np.eye(len(classes), 6) * 4.0
    tokens = centres[k] + shift + rng.normal(size=(n, 6))
    tokens = np.concatenate([tokens, rng.normal(size=(n, noise_dims))], axis=1)
    merged = np.minimum(k, len(classes) - 2)  # the last two classes look alike in the markers
    markers = np.eye(len(classes), 4)[merged] * 4.0 + shift + rng.normal(size=(n, 4))
    return tokens.astype(np.float32), markers.astype(np.float32), y


def test_rf_transfer_beats_chance_on_every_class_and_the_marker_baseline():
    rng = np.random.default_rng(0)
    classes = ["tumour", "stroma", "immune", "vascular"]
    xs, ms, ys = planted_cells(rng, 1200, classes, 0.0, 4)
    xt, mt, yt = planted_cells(rng, 900, classes, 0.3, 4)
    tok = transfer_random_forest(xs, ys, xt, yt, seed=0)
    base = transfer_random_forest(ms, ys, mt, yt, seed=0)
    chance = chance_f1(yt, classes)
    assert set(tok.per_class) == set(classes)
    for c in classes:
        assert tok.per_class[c] > chance[c] + 0.3, (c, tok.per_class[c], chance[c])
    assert tok.macro_f1 > base.macro_f1 + 0.1
    assert base.per_class["vascular"] < tok.per_class["vascular"]
    # same seed, same forest
    again = transfer_random_forest(xs, ys, xt, yt, seed=0)
    np.testing.assert_array_equal(again.predictions, tok.predictions)


def test_balanced_downsample_and_chance_level_by_hand():
    y = np.array(["a"] * 10 + ["b"] * 3 + ["c"] * 5)
    idx = balanced_downsample(y, seed=1)
    assert sorted(pd.Series(y[idx]).value_counts().tolist()) == [3, 3, 3]
    assert np.array_equal(idx, balanced_downsample(y, seed=1))
    # uniform guessing among K=3 classes: precision = prevalence p, recall = 1/3
    chance = chance_f1(y, ["a", "b", "c"])
    p = 10 / 18
    assert chance["a"] == pytest.approx(2 * p * (1 / 3) / (p + 1 / 3))
    f1 = per_class_f1(np.array(["a", "a", "b", "c"]), np.array(["a", "b", "b", "b"]), ["a", "b", "c"])
    assert f1 == pytest.approx({"a": 2 / 3, "b": 2 * (1 / 3) * 1 / (1 / 3 + 1), "c": 0.0})


def test_shared_columns_align_two_panels_by_name():
    a = ["CD3", "CD20", "panCK", "SMA"]
    b = ["SMA", "CD3", "Vimentin", "panCK"]
    ia, ib, names = shared_columns(a, b)
    assert names == ["CD3", "panCK", "SMA"]
    assert [a[i] for i in ia] == names and [b[i] for i in ib] == names


def write_token_folder(folder: Path, tokens: np.ndarray, markers: np.ndarray, labels: Sequence, marker_names: list[str],
                       label: str = "cell_type", tissues: int = 3) -> Path:
    """An ``experiments.virtues_tokens``-shaped folder (cells/<tissue>.h5ad) holding planted cells."""
    (folder / "cells").mkdir(parents=True)
    parts = np.array_split(np.arange(len(tokens)), tissues)
    for t, idx in enumerate(parts):
        tid = f"{folder.name}_{t}"
        obs = pd.DataFrame({"tissue_id": tid, "cell_id": np.arange(1, len(idx) + 1), label: np.asarray(labels)[idx]},
                           index=[f"{tid}:{i}" for i in range(len(idx))])
        cells = ad.AnnData(X=tokens[idx], obs=obs)
        cells.obsm["mean_expression"] = markers[idx]
        cells.uns["mean_expression_channels"] = marker_names
        cells.write_h5ad(folder / "cells" / f"{tid}.h5ad")
    return folder


def test_command_writes_tables_figure_and_maps_target_labels(tmp_path, capsys):
    from experiments.virtues_cross_panel import cross_panel_transfer, main

    rng = np.random.default_rng(1)
    classes = ["tumour", "stroma", "immune", "vascular"]
    xs, ms, ys = planted_cells(rng, 800, classes, 0.0, 2)
    xt, mt, yt = planted_cells(rng, 600, classes, 0.2, 2)
    fine = {"tumour": "Tumor", "stroma": "Fibroblast", "immune": "CD8_T", "vascular": "Endothelial"}
    yt_fine = np.array([fine[c] for c in yt], dtype=object)
    yt_fine[:20] = "Unknown"  # maps to no source class: left out
    src = write_token_folder(tmp_path / "src", xs, ms, ys, ["CD3", "CD20", "SMA", "panCK"])
    tgt = write_token_folder(tmp_path / "tgt", xt, mt[:, [3, 0, 2, 1]], yt_fine, ["panCK", "CD3", "SMA", "CD20"],
                             label="phenotype")
    pd.DataFrame({"target": list(fine.values()), "source": list(fine)}).to_csv(tmp_path / "map.csv", index=False)
    out = tmp_path / "out"
    assert main(["--source-tokens", str(src), "--target-tokens", str(tgt), "--out", str(out), "--target-label",
                 "phenotype", "--label-map", str(tmp_path / "map.csv")]) == 0
    per_class = pd.read_csv(out / "per_class_f1.csv")
    assert set(per_class["representation"]) == {"virtues_cell_tokens", "mean_expression"}
    tok = per_class[per_class["representation"] == "virtues_cell_tokens"]
    assert (tok["f1"] > tok["chance"]).all() and tok["n_target"].sum() == 600 - 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_target_unmapped"] == 20 and (out / "transfer_f1.png").stat().st_size > 0
    # markers matched by name: the shuffled target columns give the same baseline as aligned ones
    aligned = write_token_folder(tmp_path / "tgt2", xt, mt, yt_fine, ["CD3", "CD20", "SMA", "panCK"], label="phenotype")
    direct = cross_panel_transfer(src, aligned, target_label="phenotype", label_map=dict(zip(fine.values(), fine)))
    base = per_class[per_class["representation"] == "mean_expression"]["f1"].to_numpy()
    np.testing.assert_allclose(base, direct.per_class.query("representation == 'mean_expression'")["f1"].to_numpy())
    capsys.readouterr()
    assert main(["--source-tokens", str(src), "--target-tokens", str(tgt), "--out", str(tmp_path / "o2"),
                 "--target-label", "phenotype"]) == 2
    assert "--label-map" in capsys.readouterr().err
