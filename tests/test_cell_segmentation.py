"""Cell segmentation: object F1, the classical segmenter against the generator's masks, tiling, µm
sizes, refusals, the Cellpose adapter, and ``rosie_predict --segment``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import anndata as ad
import cv2
import numpy as np
import pytest
import torch
from conftest import rosie_checkpoint, shared_data

from analysis import cell_segmentation as cs
from analysis import cell_segmentation_cellpose as cp
from benchmarks.cell_segmentation import generator_nuclei
from datamodules import layout
from datamodules.store import DatasetStore
from lightning_modules.components.model_files import UnsafeModelFileError

MPP = 0.5
MARKERS = ["DAPI", "CD45", "PanCK", "CD3e", "Ki67"]


def disk_labels(shape: tuple[int, int], centres: list[tuple[int, int]], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        out[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius) & (out == 0)] = i
    return out


@pytest.fixture(scope="module")
def tissues(synthetic_dataset: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(id, H&E (H,W,3), DAPI, generator nuclei, generator cells) of the 4 synthetic 256-px tissues."""
    store = DatasetStore(str(synthetic_dataset))
    out = []
    for tid in store.tissue_ids():
        he = np.moveaxis(store.image("he", tid, MPP).read_all(), 0, -1)
        codex = store.image("codex", tid, MPP)
        dapi = codex.read_all()[list(codex.channel_names).index("DAPI")]
        cells = store.cell_mask(tid, MPP).astype(np.int64)
        nuclei = generator_nuclei(tid, he.shape[0], cells)
        assert nuclei is not None, "the generator's nuclei could not be redrawn from the tissue's seed"
        out.append((tid, he, dapi, nuclei, cells))
    return out


def pooled_f1(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    matches = [cs.object_f1(p, t) for p, t in pairs]
    return 2 * sum(m.n_matched for m in matches) / sum(m.n_pred + m.n_true for m in matches)


# ------------------------------------------------------------------------------------ object F1


def test_object_f1_counts_one_to_one_matches_at_iou_half():
    true = disk_labels((64, 64), [(16, 16), (16, 40), (44, 28)], 6)
    assert cs.object_f1(true, true).f1 == 1.0
    merged = true.copy()
    merged[(true == 1) | (true == 2)] = 1
    merged[10:22, 16:40][merged[10:22, 16:40] == 0] = 1  # one blob over two nuclei: matches at most one
    m = cs.object_f1(merged, true)
    assert (m.n_true, m.n_pred, m.n_matched) == (3, 2, 1)
    assert m.precision == pytest.approx(0.5) and m.recall == pytest.approx(1 / 3) and m.f1 == pytest.approx(0.4)
    shifted = np.roll(true, 5, axis=1)  # IoU of a radius-6 disk shifted by 5 px is < 0.5
    assert cs.object_f1(shifted, true).n_matched == 0
    assert cs.object_f1(shifted, true, iou=0.2).n_matched == 3
    empty = np.zeros_like(true)
    assert cs.object_f1(empty, empty).f1 == 1.0 and cs.object_f1(empty, true).f1 == 0.0
    relabelled = np.where(true > 0, 10 - true, 0)  # ids need not agree
    assert cs.object_f1(relabelled, true).f1 == 1.0
    with pytest.raises(ValueError, match="shape"):
        cs.object_f1(true[:10], true)
    with pytest.raises(ValueError, match="iou"):
        cs.object_f1(true, true, iou=0)
    with pytest.raises(ValueError, match="integer"):
        cs.object_f1(true.astype(float), true)


# --------------------------------------------------------------------------- classical segmenter


def test_he_segmentation_against_the_generators_masks(tissues):
    segs = [cs.segment_cells_he(he, MPP) for _, he, _, _, _ in tissues]
    nuclei_f1 = pooled_f1([(s.nuclei, t[3]) for s, t in zip(segs, tissues)])
    cells_f1 = pooled_f1([(s.cells, t[4]) for s, t in zip(segs, tissues)])
    assert nuclei_f1 >= 0.8, nuclei_f1  # measured 0.85 (benchmarks.cell_segmentation)
    assert cells_f1 >= 0.75, cells_f1  # measured 0.80
    for seg in segs:
        assert seg.nuclei.dtype == np.int32 and seg.cells.dtype == np.int32
        inside = seg.nuclei > 0
        assert np.array_equal(seg.cells[inside], seg.nuclei[inside])  # a cell keeps its nucleus' id
        assert set(np.unique(seg.cells)) == set(np.unique(seg.nuclei))


def test_dapi_segmentation_against_the_generators_nuclei(tissues):
    f1 = pooled_f1([(cs.segment_nuclei_dapi(dapi, MPP), nuclei) for _, _, dapi, nuclei, _ in tissues])
    assert f1 >= 0.75, f1  # measured 0.81


def test_tiles_give_the_whole_image_result_and_are_deterministic(tissues):
    _, he, _, nuclei, _ = tissues[1]
    whole = cs.segment_nuclei_he(he, MPP)
    tiled = cs.segment_nuclei_he(he, MPP, cs.NucleusSettings(tile_px=64, overlap_um=16))
    assert cs.object_f1(tiled, whole).f1 >= 0.97  # only objects across a tile edge may differ
    assert abs(cs.object_f1(tiled, nuclei).f1 - cs.object_f1(whole, nuclei).f1) < 0.02
    assert np.array_equal(whole, cs.segment_nuclei_he(he, MPP))
    cells = cs.nuclei_to_cells(whole, MPP, 2.0)
    assert np.array_equal(cs.nuclei_to_cells(whole, MPP, 2.0, tile_px=50), cells)  # growth is exact per tile


def test_sizes_are_micrometres(tissues):
    """The same tissue scanned at twice the resolution gives the same nuclei (settings in µm)."""
    _, he, _, nuclei, _ = tissues[2]
    fine = cv2.resize(he, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    fine_nuclei = cs.segment_nuclei_he(fine, MPP / 2)
    coarse = cs.segment_nuclei_he(he, MPP)
    ratio = (len(np.unique(fine_nuclei)) - 1) / (len(np.unique(coarse)) - 1)
    assert 0.85 <= ratio <= 1.15, ratio
    down = fine_nuclei[::2, ::2]
    assert cs.object_f1(down, nuclei).f1 >= 0.7


def test_nuclei_grow_by_the_stated_micrometres():
    nuclei = disk_labels((80, 80), [(20, 20), (20, 32), (60, 60)], 4)
    cells = cs.nuclei_to_cells(nuclei, mpp=0.5, expand_um=3.0)  # 6 px
    area = np.bincount(cells.reshape(-1))
    assert np.sqrt(area[3] / np.pi) == pytest.approx(10, abs=0.5)  # isolated: radius 4 + 6 px
    assert area[1] < area[3] and area[2] < area[3]  # touching neighbours split the space between them
    assert np.array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
    within = np.zeros((80, 80), bool)
    within[:, :60] = True
    limited = cs.nuclei_to_cells(nuclei, 0.5, 3.0, within=within)
    assert not ((limited > 0) & ~within & (nuclei == 0)).any()
    assert np.array_equal(cs.nuclei_to_cells(nuclei, 0.25, 1.5), cells)  # 1.5 µm at 0.25 µm/px is 6 px too


def test_an_empty_slide_has_no_nuclei():
    white = np.full((128, 128, 3), 242, np.uint8)
    seg = cs.segment_cells_he(white, MPP)
    assert seg.nuclei.max() == 0 and seg.cells.max() == 0


def test_refusals():
    class HugeLazyImage:  # a slide header claiming 40,000² px: refused before any pixel is read
        shape, dtype = (3, 40_000, 40_000), np.dtype(np.uint8)

        def read(self, y, x, h, w):  # type: ignore[no-untyped-def]
            raise AssertionError("read before the size check")

    with pytest.raises(cs.SegmentationTooLargeError, match="segment regions"):
        cs.segment_nuclei_he(HugeLazyImage(), MPP)
    rgb = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cs.segment_nuclei_he(rgb.astype(np.float32), MPP)
    with pytest.raises(ValueError, match="RGB"):
        cs.segment_nuclei_he(np.zeros((32, 32), np.uint8), MPP)
    with pytest.raises(ValueError, match="2-D"):
        cs.segment_nuclei_dapi(rgb, MPP)
    with pytest.raises(ValueError, match="mpp"):
        cs.segment_nuclei_he(rgb, 0.0)
    with pytest.raises(ValueError, match="local_fraction"):
        cs.segment_nuclei_he(rgb, MPP, cs.NucleusSettings(local_fraction=1.5))
    with pytest.raises(ValueError, match="expand_um"):
        cs.nuclei_to_cells(np.zeros((8, 8), np.int32), MPP, -1)


# ------------------------------------------------------------------------------------- Cellpose


def test_cellpose_weights_must_be_a_safe_local_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        cp.CellposeSegmenter("cpsam")  # a model *name* is not a file: refused, never downloaded
    with pytest.raises(FileNotFoundError, match="no such Cellpose weights"):
        cp.segment_cellpose(np.zeros((8, 8, 3), np.uint8), MPP, tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    class RunsCode:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    torch.save({"w": RunsCode()}, evil)
    with pytest.raises(UnsafeModelFileError, match="run code"):
        cp.check_weights_file(evil)
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1)}, weights)
    monkeypatch.setitem(sys.modules, "cellpose", None)  # the extra is not installed
    monkeypatch.setitem(sys.modules, "cellpose.models", None)
    with pytest.raises(ImportError, match=r"virtuplex\[segment\]"):
        cp.CellposeSegmenter(weights)
    with pytest.raises(ValueError, match="diameter_um"):
        cp.segment_cellpose(np.zeros((8, 8, 3), np.uint8), MPP, weights, settings=cp.CellposeSettings(diameter_um=0))


@pytest.mark.skipif(importlib.util.find_spec("cellpose") is None, reason="cellpose is not installed (extra 'segment')")
def test_cellpose_runs_from_a_local_weights_file(tmp_path, tissues):
    major = int(importlib.metadata.version("cellpose").split(".")[0])
    weights = os.environ.get("VIRTUPLEX_CELLPOSE_WEIGHTS")
    if weights is None and major >= 4:
        pytest.skip("Cellpose 4 weights are a ~1 GB file: set VIRTUPLEX_CELLPOSE_WEIGHTS to run this test")
    if weights is None:  # Cellpose 3: a randomly initialised network of the real architecture, saved as users do
        from cellpose.resnet_torch import CPnet

        torch.manual_seed(0)
        weights = tmp_path / "cp3.pth"
        CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, diam_mean=17.0).save_model(str(weights))
    _, he, dapi, _, _ = tissues[0]
    settings = cp.CellposeSettings(diameter_um=7.0, tile_px=128, overlap_um=16)
    segmenter = cp.CellposeSegmenter(weights)
    for labels in (segmenter.segment_he(he, MPP, settings), segmenter.segment_plane(dapi, MPP, settings)):
        assert labels.shape == he.shape[:2] and labels.dtype == np.int32 and labels.min() >= 0
        ids = np.unique(labels)
        assert np.array_equal(ids, np.arange(len(ids)))  # 1..n, each object once


# ------------------------------------------------------------------------ rosie_predict --segment


@pytest.fixture(scope="module")
def atto_ckpt(tmp_path_factory) -> Path:
    return rosie_checkpoint(tmp_path_factory.mktemp("ckpt") / "atto.ckpt", MARKERS)


def check_cells_output(out: Path, tid: str, mpp: float, source: str) -> np.ndarray:
    """The written mask and its .h5ad agree: one row per segmented cell; the record names both."""
    mask = DatasetStore(str(out)).cell_mask(tid, mpp)
    assert mask is not None and mask.max() > 0
    cells = ad.read_h5ad(out / f"{tid}.cells.h5ad")
    assert sorted(cells.obs["cell_id"].astype(int)) == sorted(int(i) for i in np.unique(mask) if i)
    assert list(cells.var_names) == MARKERS and np.isfinite(cells.X).all()
    entry = json.loads((out / "qc" / "tissues" / f"{tid}.json").read_text())["entry"]
    assert entry["cell_segmentation"]["source"] == source and entry["n_cells"] == cells.n_obs
    assert entry["cell_mask"] == layout.cell_mask_path(mpp, tid)
    return mask


def test_predict_segments_a_synthetic_he_file(tmp_path, atto_ckpt, tissues, capsys):
    from experiments.rosie_predict import main

    tid, he, _, _, true_cells = tissues[3]
    png = tmp_path / "synthetic_he.png"
    assert cv2.imwrite(str(png), he[..., ::-1])
    out = tmp_path / "out"
    args = ["--ckpt", str(atto_ckpt), "--he", str(png), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args + ["--segment", "he"]) == 0
    mask = check_cells_output(out, "synthetic_he", MPP, "he")
    assert cs.object_f1(mask, true_cells).f1 >= 0.75  # measured 0.90 for this tissue
    assert main(args + ["--segment", "he"]) == 0  # a rerun finds it complete
    assert "already complete" in capsys.readouterr().out
    assert main(args + ["--segment", "he", "--cell-mask", str(png)]) == 2
    assert main(args + ["--segment", "dapi"]) == 2  # a file has no DAPI
    assert main(args + ["--segment", "he", "--expand-um", "-1"]) == 2


def test_predict_segments_a_datasets_dapi_when_it_has_no_cell_mask(tmp_path, atto_ckpt, synthetic_dataset, tissues):
    from experiments.rosie_predict import main

    data = tmp_path / "measured"
    shutil.copytree(synthetic_dataset, data)
    tid, _, _, nuclei, _ = tissues[2]
    (data / "segmentations" / "0_5mpp" / "cell_masks" / "instances" / f"{tid}.npz").unlink()
    out = tmp_path / "out"
    assert main(["--ckpt", str(atto_ckpt), "--he", str(data), "--tissue-id", tid, "--out", str(out), "--device", "cpu",
                 "--no-progress", "--segment", "dapi", "--expand-um", "0"]) == 0
    mask = check_cells_output(out, tid, MPP, "dapi")
    assert cs.object_f1(mask, nuclei).f1 >= 0.75  # no growth: the cells are the DAPI nuclei


def test_predict_segments_real_he_patches(tmp_path, atto_ckpt):
    from experiments.rosie_predict import main

    patches = sorted((shared_data("he_codex_lung_hex") / "he_patches").glob("*/*.png"))
    if not patches:
        pytest.skip("he_codex_lung_hex has no H&E patches")
    png = patches[0]
    out = tmp_path / "out"
    assert main(["--ckpt", str(atto_ckpt), "--he", str(png), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--mpp", "0.5", "--segment", "he"]) == 0
    mask = check_cells_output(out, png.stem, 0.5, "he")
    assert 5 <= len(np.unique(mask)) - 1 <= 500  # a 112 µm field of lung tissue
