"""One slide over two ranks: `rosie_predict --accelerator cpu --devices 2` under Lightning predict.

Two CPU ranks (gloo) share out the chunk-aligned regions of ONE slide; each region (and so each
output chunk) must be recorded exactly once, by one rank, both ranks must work, and the image,
QC and cell table must equal a single-process run. A run killed with SIGKILL mid-way resumes
from its region records: finished regions are not predicted again. A rerun skips complete tissues.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, Path]:
    """A 256² H&E slide as a PNG and an instance mask of square cells beside it."""
    from test_rosie_predict import he_like, save_png

    folder = tmp_path_factory.mktemp("slide")
    png = save_png(folder / "slide.png", he_like(256, 256, blobs=12, seed=4))
    cells = np.zeros((256, 256), np.uint32)
    for n, (y, x) in enumerate((y, x) for y in range(0, 256, 24) for x in range(0, 256, 24)):
        cells[y + 2 : y + 18, x + 3 : x + 20] = n + 1
    np.save(folder / "cells.npy", cells)
    return png, folder / "cells.npy"


def _cmd(ckpt: Path, png: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.rosie_predict", "--ckpt", str(ckpt), "--he", str(png), "--out", str(out),
            "--no-progress", "--foreground", "all", *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"rosie_predict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _records(out: Path) -> dict[int, dict]:
    folder = out / ".rosie-work" / "slide" / "tiles"
    found = {}
    for p in sorted(folder.glob("*.npz")) if folder.exists() else []:
        with np.load(io.BytesIO(p.read_bytes())) as data:
            found[int(p.stem)] = {"rank": int(data["rank"]), "chunks": [tuple(c) for c in data["chunks"].tolist()],
                                  "written_at": float(data["written_at"])}
    return found


def test_two_ranks_share_one_slide_and_match_one_process(small_ckpt, slide, tmp_path):
    """Stride 4, 64×64 output, 8-px regions: 64 regions over two ranks, each chunk once, same result."""
    import anndata as ad

    from datamodules.store import DatasetStore

    png, cells = slide
    extra = ("--stride", "4", "--tile-size", "8", "--cell-mask", str(cells), "--ome-tiff")
    out = tmp_path / "ddp"
    _run(_cmd(small_ckpt, png, out, "--accelerator", "cpu", "--devices", "2") + list(extra))
    single = tmp_path / "single"
    proc = _run(_cmd(small_ckpt, png, single, "--device", "cpu") + list(extra))
    assert "patches/s" in proc.stdout

    qc = json.loads((out / "qc.json").read_text())["tissues"]["slide"]
    assert qc["regions"] == 64 and qc["n_patches"] == 64 * 64
    regions = pd.read_csv(out / qc["region_log"], dtype={"chunks": str})
    chunks = [c for cs in regions["chunks"] for c in cs.split()]
    assert len(chunks) == len(set(chunks)) == 64, "every output chunk written by exactly one region"
    assert qc["region_ranks"] == {"0": 32, "1": 32} and sorted(regions["rank"].unique()) == [0, 1]
    a, b = DatasetStore(out), DatasetStore(single)
    np.testing.assert_array_equal(a.image("codex", "slide", 2.0).read_all(), b.image("codex", "slide", 2.0).read_all())
    one = json.loads((single / "qc.json").read_text())["tissues"]["slide"]
    assert qc["dynamic_range"] == one["dynamic_range"] and qc["he_histogram"] == one["he_histogram"]
    np.testing.assert_array_equal(ad.read_h5ad(out / "slide.cells.h5ad").X, ad.read_h5ad(single / "slide.cells.h5ad").X)
    assert not (out / ".rosie-work").exists()
    assert [p for p in a.validate() if p.severity == "error"] == []


def test_sigkill_mid_run_resumes_without_recomputing_finished_regions(small_ckpt, slide, tmp_path):
    png, _ = slide
    out = tmp_path / "killed"
    cmd = _cmd(small_ckpt, png, out, "--accelerator", "cpu", "--devices", "2", "--stride", "2", "--tile-size", "16")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while len(_records(out)) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks, no clean-up of any kind
    proc.wait()
    before = _records(out)
    assert 6 <= len(before) < 64, f"the kill must land mid-run ({len(before)} of 64 regions recorded)"
    assert not (out / "qc" / "tissues" / "slide.json").exists()

    log = _run(cmd)
    assert "already complete" not in log.stdout
    qc = json.loads((out / "qc.json").read_text())["tissues"]["slide"]
    assert qc["regions"] == 64 and qc["n_patches"] == 128 * 128
    kept = dict(pd.read_csv(out / qc["region_log"])[["region", "written_at"]].itertuples(index=False))
    for k, rec in before.items():  # finished regions were not predicted (nor written) again
        assert kept[k] == pytest.approx(rec["written_at"], abs=1e-6), f"region {k} was recomputed"
    assert sum(v > max(r["written_at"] for r in before.values()) for v in kept.values()) == 64 - len(before)

    single = tmp_path / "single"
    _run(_cmd(small_ckpt, png, single, "--device", "cpu", "--stride", "2", "--tile-size", "16"))
    from datamodules.store import DatasetStore
    np.testing.assert_array_equal(DatasetStore(out).image("codex", "slide", 1.0).read_all(),
                                  DatasetStore(single).image("codex", "slide", 1.0).read_all())

    rerun = _run(cmd)
    assert "already complete" in rerun.stdout
