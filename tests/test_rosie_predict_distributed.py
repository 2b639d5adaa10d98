"""Distributed, resumable whole-tissue prediction: `rosie_predict --devices 2` under Lightning predict.

Two CPU ranks (gloo) share out the tissues of a split; each tissue must be written exactly once,
by one rank, with the same pixels as a single-process run, and rank 0 must fold every tissue into
the dataset-level QC tables. A rerun skips complete tissues and redoes one whose completion record
is missing (an interrupted run), even when fewer tissues than ranks remain.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
MARKERS = ["DAPI", "CD45", "PanCK", "CD3e", "Ki67"]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """convnext_atto on the central 32 px: the real model class, fast enough for 2 ranks on CPU."""
    from benchmarks.rosie_predict_memory import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "atto32.ckpt", MARKERS)


def _predict(ckpt: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.rosie_predict", "--ckpt", str(ckpt), "--he", str(data),
           "--split", "train", "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rosie_predict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _writes(proc: subprocess.CompletedProcess) -> list[tuple[int, str]]:
    return [(int(r), t) for r, t in re.findall(r"rank (\d+) wrote tissue (\S+)", proc.stdout)]


def test_two_ranks_write_each_tissue_once_and_match_single_process(small_ckpt, synthetic_dataset, tmp_path):
    from datamodules.store import DatasetStore
    from experiments.rosie_predict import main

    ids = DatasetStore(synthetic_dataset).tissue_ids("train")
    assert len(ids) >= 2
    out = tmp_path / "ddp"
    proc = _predict(small_ckpt, synthetic_dataset, out, "--accelerator", "cpu", "--devices", "2")
    writes = _writes(proc)
    assert sorted(t for _, t in writes) == sorted(ids), f"each tissue once: {writes}"
    assert {r for r, _ in writes} == {0, 1}, f"both ranks must work: {writes}"

    single = tmp_path / "single"
    assert main(["--ckpt", str(small_ckpt), "--he", str(synthetic_dataset), "--split", "train", "--out", str(single),
                 "--device", "cpu", "--no-progress"]) == 0
    ddp_store, one_store = DatasetStore(out), DatasetStore(single)
    mpp = one_store.resolutions("codex")[0]
    for tid in ids:
        np.testing.assert_allclose(ddp_store.image("codex", tid, mpp).read_all(), one_store.image("codex", tid, mpp).read_all(),
                                   rtol=1e-5, atol=1e-6)
    # rank 0 folded every rank's tissue into the shared tables
    assert sorted(json.loads((out / "qc.json").read_text())["tissues"]) == sorted(ids)
    assert sorted(ddp_store.tissue_ids()) == sorted(ids)
    assert len(pd.read_csv(out / "qc.csv")) == len(ids) * len(MARKERS)
    assert [p for p in ddp_store.validate() if p.severity == "error"] == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    # interrupted run: one tissue lost its completion record (crash after its image was renamed)
    lost, kept = ids[0], ids[1]
    (out / "qc" / "tissues" / f"{lost}.json").unlink()
    kept_mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if kept in p.name and p.is_file()}
    proc = _predict(small_ckpt, synthetic_dataset, out, "--accelerator", "cpu", "--devices", "2")
    assert _writes(proc) and [t for _, t in _writes(proc)] == [lost], "only the incomplete tissue is redone"
    assert f"{kept}: already complete" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in kept_mtimes} == kept_mtimes, "a complete tissue was rewritten"
    assert sorted(json.loads((out / "qc.json").read_text())["tissues"]) == sorted(ids)


def test_rerun_skips_complete_tissues_and_overwrite_redoes_them(small_ckpt, synthetic_dataset, tmp_path, capsys):
    from experiments.rosie_predict import main

    out = tmp_path / "pred"
    args = ["--ckpt", str(small_ckpt), "--he", str(synthetic_dataset), "--split", "train", "--out", str(out),
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "patches/s" in first
    records = sorted((out / "qc" / "tissues").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in records]
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "patches/s" not in second and second.count("already complete") == len(records)
    assert [p.stat().st_mtime_ns for p in records] == mtimes
    assert main(args + ["--overwrite"]) == 0
    assert "patches/s" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in records] != mtimes
