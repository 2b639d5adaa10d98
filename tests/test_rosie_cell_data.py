"""Per-cell tables for ROSIE's downstream science, the training H&E histograms in the checkpoint,
and the quality-control filter analysis, against direct computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import rosie_checkpoint, save_untrained

from analysis.rosie_metrics import he_histograms
from analysis.rosie_qc import filter_table, per_sample_quality
from datamodules.he_histograms import tissue_he_histogram, training_he_histograms
from datamodules.rosie_cell_data import (
    cell_centroids_um,
    per_cell_means,
    read_sample_cells,
)
from datamodules.store import DatasetStore
from lightning_modules.rosie import load_rosie_checkpoint
from lightning_modules.rosie_inference import PatchPredictor


class ArrayImage:
    """An in-memory image with the store's read interface."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def read(self, y: int, x: int, h: int, w: int, channels=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        out = self.array[:, y:y + h, x:x + w]
        return out if channels is None else out[list(channels)]


def test_per_cell_means_equal_brute_force_at_native_and_stride_grids() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((37, 45), np.int32)
    for k in range(1, 9):
        y, x = rng.integers(0, 30), rng.integers(0, 38)
        mask[y:y + rng.integers(3, 8), x:x + rng.integers(3, 8)] = k
    ids = np.unique(mask[mask > 0])
    native = rng.random((3, 37, 45))
    got = per_cell_means(ArrayImage(native), [2, 0], mask, ids)
    want = np.array([[native[c][mask == k].mean() for c in (2, 0)] for k in ids])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    coarse = rng.random((2, 5, 6))  # stride 8: native pixel (y, x) reads coarse[:, y // 8, x // 8]
    upsampled = np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :37, :45]
    got = per_cell_means(ArrayImage(coarse), [0, 1], mask, ids, scale=8)
    want = np.array([[upsampled[c][mask == k].mean() for c in (0, 1)] for k in ids])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_centroids_are_in_micrometres_x_then_y() -> None:
    mask = np.zeros((10, 20), np.int32)
    mask[2:4, 10:14] = 5
    np.testing.assert_allclose(cell_centroids_um(mask, np.array([5]), 0.5), [[11.5 * 0.5, 2.5 * 0.5]])


def test_sample_cells_of_the_synthetic_dataset(synthetic_dataset: Path) -> None:
    store = DatasetStore(synthetic_dataset)
    tid = store.tissue_ids("test")[0]
    cells = read_sample_cells(store, tid, ["CD45", "PanCK"], label_column="cell_type")
    mask = store.cell_mask(tid, 0.5)
    assert cells.n_cells == len(np.unique(mask[mask > 0]))
    codex = store.image("codex", tid, 0.5)
    k = int(cells.cell_ids[len(cells.cell_ids) // 2])
    row = int(np.searchsorted(cells.cell_ids, k))
    panck = codex.read_all()[list(codex.channel_names).index("PanCK")]
    assert cells.measured[row, 1] == pytest.approx(panck[mask == k].mean())
    assert cells.features.shape == (cells.n_cells, 22) and np.isfinite(cells.features).all()
    truth = store.cells().set_index(["tissue_id", "cell_id"])["cell_type"]
    assert cells.labels[row] == truth.loc[(tid, k)]
    assert cells.predicted is None and cells.mask_source == "truth"


def test_training_histograms_equal_direct_ones_and_travel_in_the_checkpoint(synthetic_dataset: Path, tmp_path) -> None:
    store = DatasetStore(synthetic_dataset)
    tid = store.tissue_ids("train")[0]
    image = store.image("he", tid)
    np.testing.assert_allclose(tissue_he_histogram(store, tid), he_histograms(image.read_all(),
                                                                               store.tissue_mask(tid, image.mpp)))
    hists = training_he_histograms([str(synthetic_dataset)])
    assert hists.shape == (len(store.tissue_ids("train")), 3, 256)
    ckpt = tmp_path / "m.ckpt"
    rosie_checkpoint(ckpt, ["CD45", "PanCK"])
    loaded = load_rosie_checkpoint(str(ckpt))
    assert loaded.reference_he_histograms is None  # an untrained module carries none
    loaded.set_reference_histograms(hists)
    save_untrained(loaded, ckpt)
    predictor = PatchPredictor.from_checkpoint(ckpt, device="cpu")
    np.testing.assert_allclose(np.asarray(predictor.meta["reference_he_histograms"]), hists)


def test_quality_filters_keep_the_samples_the_paper_describes() -> None:
    markers = ["A", "B"]
    per_sample_marker = pd.DataFrame({
        "method": "rosie", "tissue_id": np.repeat(["s1", "s2", "s3", "s4"], 2), "marker": markers * 4,
        "pearson_r": [0.8, 0.6, 0.5, 0.3, 0.2, 0.0, 0.9, 0.7]})
    qc = pd.DataFrame({"tissue_id": np.repeat(["s1", "s2", "s3", "s4"], 2), "marker": markers * 4,
                       "dynamic_range": [10, 10, 5, 5, 1, 1, 20, 0.1],
                       "w1_to_training_he": np.repeat([1.0, 2.0, 9.0, 3.0], 2)})
    samples = per_sample_quality(per_sample_marker, qc)
    assert samples.set_index("tissue_id")["pearson_r"].to_dict() == pytest.approx({"s1": 0.7, "s2": 0.4, "s3": 0.1, "s4": 0.8})
    table = filter_table(samples).set_index("filter")
    assert table.loc["all samples", "mean_pearson_r"] == pytest.approx(0.5)
    assert table.loc["W1 <= median", "n_samples"] == 2  # W1 1, 2 (median 2.5)
    assert table.loc["W1 <= median", "mean_pearson_r"] == pytest.approx(0.55)
    assert table.loc["dynamic range >= median", "mean_pearson_r"] == pytest.approx(0.75)  # s1 (10), s4 (10.05)
    thresholded = per_sample_quality(per_sample_marker, qc, dynamic_range_threshold=1.0).set_index("tissue_id")
    assert thresholded.loc["s4", "pearson_r"] == pytest.approx(0.9) and thresholded.loc["s4", "n_markers"] == 1
