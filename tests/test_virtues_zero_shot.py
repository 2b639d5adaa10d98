"""Zero-shot leave-one-dataset-out: seen = channels pretraining trained on, not every embedding file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.virtues_reconstruction import build_marker_vocabulary
from datamodules.store import DatasetStore
from datamodules.virtues import MarkerTable, VirTuesDataModule
from datamodules.virtues_trained_markers import trained_markers

PLANTED_QC_FAIL = 3  # channels failing QC in the pretraining copy (their embedding files stay)


@pytest.fixture(scope="module")
def two_datasets(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """``pre``: the synthetic dataset with 3 channels failing QC and 1 without a UniProt id (the embedding
    files of all 4 left in its marker_embeddings folder); ``held``: the full panel."""
    root = tmp_path_factory.mktemp("zero_shot")
    pre, held = root / "pre", root / "held"
    shutil.copytree(synthetic_dataset, pre)
    shutil.copytree(synthetic_dataset, held)
    path = pre / "imc" / "channels.parquet"
    channels = pd.read_parquet(path)
    planted = [str(u) for u in channels["uniprot_id"].iloc[1:1 + PLANTED_QC_FAIL + 1]]
    channels.loc[channels.index[1:1 + PLANTED_QC_FAIL], "qc_pass"] = False
    channels["uniprot_id"] = channels["uniprot_id"].astype(object)
    channels.loc[channels.index[1 + PLANTED_QC_FAIL], "uniprot_id"] = None
    channels.to_parquet(path)
    assert all((pre / "marker_embeddings" / f"{u}.pt").is_file() for u in planted)
    return pre, held, planted


def test_trained_markers_are_the_channels_the_datamodule_feeds(two_datasets) -> None:
    pre, _, planted = two_datasets
    dm = VirTuesDataModule([str(pre)], modality="imc", crop_size=128, subimage_size=128)
    dm.setup()
    table = dm.prepare_marker_table()
    fed = {table.uniprot_ids[i] for t in dm.tissues["train"] for i in t.marker_ids.tolist()}
    assert trained_markers([str(pre)]) == fed
    assert len(table.uniprot_ids) == 40 and len(fed) == 40 - len(planted)  # the table still holds the planted rows
    assert not set(planted) & fed


def test_planted_panel_seen_unseen_classification(two_datasets) -> None:
    pre, held, planted = two_datasets
    table = MarkerTable.from_stores([DatasetStore(str(pre))])
    available = dict(zip(table.uniprot_ids, table.embeddings))
    extra = torch.randn(640)
    needed = [*table.uniprot_ids, "Q99999"]
    old = build_marker_vocabulary(table.uniprot_ids, {**available, "Q99999": extra}, needed)
    assert all(old.seen[u] for u in planted)  # the old rule: every table row (= embedding file) is "seen"
    vocab = build_marker_vocabulary(table.uniprot_ids, {**available, "Q99999": extra}, needed,
                                    trained_markers=trained_markers([str(pre)]))
    assert {u for u, s in vocab.seen.items() if not s} == {*planted, "Q99999"}
    assert vocab.uniprot_ids[:40] == table.uniprot_ids  # table order unchanged: marker index i keeps its meaning


def test_leave_one_out_command_reports_planted_markers_unseen(two_datasets, tmp_path: Path) -> None:
    from experiments.virtues_zero_shot import main, run

    pre, held, planted = two_datasets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run([pre, held], tmp_path / "zs", hold_out=["held"], max_steps=2, max_crops=2,
                      strategies=["independent"], marker_max_crops=1, figures=False)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "zs"
    assert (out / "models" / "held.ckpt").is_file()
    seen = pd.read_csv(out / "seen_markers.csv")
    assert set(seen.loc[~seen["seen"], "uniprot_id"]) == set(planted) and len(seen) == 40
    per_marker = pd.read_csv(out / "held" / "per_marker.csv")
    flags = per_marker.drop_duplicates("uniprot_id").set_index("uniprot_id")["seen"]
    assert not flags[planted].any() and flags.drop(planted).all()
    assert set(summary["held_out"]) == {"held"} and set(summary["seen"]) == {True, False}
    assert main(["--data", str(pre), "--out", str(tmp_path / "x")]) == 2  # one dataset cannot be held out
    assert main(["--data", str(pre), "--data", str(held), "--out", str(tmp_path / "y"), "--hold-out", "nope"]) == 2
