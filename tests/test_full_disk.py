"""A real full disk (a small tmpfs, not a simulated write error) and an interrupted ingest.

Both must leave nothing half-written, and rerunning the same command must complete the work. The
tmpfs tests need permission to mount (root, as on the project's CI machines); elsewhere they skip.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from experiments.data_ingest import main as ingest_main
from datamodules.store import DatasetStore, DatasetWriter


def _mount(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system; unmounted after the test."""
    folder = tmp_path / "disk"
    if not _mount(folder, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated disk-full case still runs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _image(path: Path, size: int, seed: int = 0) -> Path:
    data = (np.random.default_rng(seed).random((4, size, size)) * 60000).astype(np.uint16)  # incompressible
    tifffile.imwrite(path, data, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45", "PanCK", "CD3e"]}})
    return path


def _ingest(image: Path, out: Path, tissue: str) -> list[str]:
    return ["--image", str(image), "--modality", "imc", "--dataset", "ds", "--tissue-id", tissue, "--out", str(out),
            "--split", "train", "--resolution", "1.0"]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")]


def test_full_disk_on_a_new_dataset_leaves_nothing_and_the_rerun_completes(small_disk: Path, tmp_path: Path, capsys) -> None:
    image = _image(tmp_path / "big.ome.tif", 512)  # 2 MiB of pixels > 1 MiB disk
    argv = _ingest(image, small_disk, "t0")
    assert ingest_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "No space left on device" in err or "disk is full" in err, err
    assert not (small_disk / "ds").exists() and not _leftovers(small_disk), list(small_disk.rglob("*"))
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert ingest_main(argv) == 0, capsys.readouterr().err
    assert DatasetStore(small_disk / "ds").tissue_ids() == ["t0"]


def test_full_disk_while_adding_to_a_dataset_keeps_it_intact(small_disk: Path, tmp_path: Path, capsys) -> None:
    assert ingest_main(_ingest(_image(tmp_path / "small.ome.tif", 64), small_disk, "t0")) == 0
    before = {p.relative_to(small_disk): p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    argv = _ingest(_image(tmp_path / "big.ome.tif", 512, seed=1), small_disk, "t1")
    capsys.readouterr()
    assert ingest_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and ("No space left on device" in err or "disk is full" in err), err
    after = {p.relative_to(small_disk): p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    assert after == before, "the dataset changed although the ingest failed"
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert ingest_main(argv) == 0
    assert sorted(DatasetStore(small_disk / "ds").tissue_ids()) == ["t0", "t1"]


def test_interrupted_ingest_is_completed_by_rerunning_the_same_command(tmp_path: Path, monkeypatch, capsys) -> None:
    """Killed after the image was written but before the tables: the rerun replaces the orphan image."""
    argv = _ingest(_image(tmp_path / "img.ome.tif", 64), tmp_path / "out", "t0")
    assert ingest_main(argv) == 0
    argv2 = _ingest(_image(tmp_path / "img2.ome.tif", 64, seed=2), tmp_path / "out", "t1")

    def killed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(DatasetWriter, "update_channels_per_tissue", killed)
        assert ingest_main(argv2) == 130
    store = DatasetStore(tmp_path / "out" / "ds")
    assert "t1" in store.image_ids("imc", 1.0) and store.tissue_ids() == ["t0"]  # the orphan image
    capsys.readouterr()
    assert ingest_main(argv2) == 0, capsys.readouterr().err
    assert "interrupted ingest" in capsys.readouterr().err
    store = DatasetStore(tmp_path / "out" / "ds")
    assert sorted(store.tissue_ids()) == ["t0", "t1"]
    assert sorted(store.channels_per_tissue("imc").index) == ["t0", "t1"]
    assert ingest_main(argv2) == 2  # now complete: a second rerun is a duplicate
