"""The tile engine in one process: chunk-aligned regions written once, resumable records, the authors'
stitching against a re-implementation of their script, on-the-fly resampling, provenance on outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from test_rosie_predict import MARKERS, TinyNet, he_like, save_png

from lightning_modules import rosie_inference as ri

P = ri.PATCH_SIZE


def tiny_predictor(seed: int = 0) -> ri.PatchPredictor:
    torch.manual_seed(seed)
    return ri.PatchPredictor(TinyNet(), MARKERS, device="cpu")


def authors_script(img: np.ndarray, predictor: ri.PatchPredictor, stride: int) -> np.ndarray:
    """Their stitching as their script documents it, one patch at a time: points every stride//2 px,
    patch centred on the point, black outside the image, 2s×2s Gaussian (sigma s/2) cut from its
    top-left corner where the window is clipped, weighted sum / max(weights, 1e-8)."""
    h, w, _ = img.shape
    g, k = max(1, stride // 2), 2 * stride
    yy, xx = np.mgrid[0:k, 0:k]
    kernel = np.exp(-((xx - k // 2) ** 2 + (yy - k // 2) ** 2) / (2 * (k / 4) ** 2))
    pad = np.pad(img, ((P, P), (P, P), (0, 0)), constant_values=0)
    out = np.zeros((len(MARKERS), h, w))
    weight = np.zeros((h, w))
    for y in range(0, h, g):
        for x in range(0, w, g):
            patch = pad[y - P // 2 + P : y + P // 2 + P, x - P // 2 + P : x + P // 2 + P]
            pred = predictor(torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1)))[None])[0].numpy()
            t, b = np.clip(y - k // 2, 0, h), np.clip(y + k // 2, 0, h)
            left, r = np.clip(x - k // 2, 0, w), np.clip(x + k // 2, 0, w)
            wk = kernel[: b - t, : r - left]
            out[:, t:b, left:r] += pred[:, None, None] * wk
            weight[t:b, left:r] += wk
    return (out / np.maximum(weight, 1e-8)).astype(np.float32)


@pytest.mark.parametrize("stride", [4, 1])
def test_official_stitching_matches_the_authors_script(stride, tmp_path):
    from datamodules.store import DatasetStore

    img = he_like(40, 52, blobs=2, seed=stride)
    predictor = tiny_predictor()
    opts = ri.PredictOptions(stride=stride, foreground="all", stitching="official", tile_size=8, progress=False)
    entry = ri.predict_to_dataset(img, predictor, tmp_path / "out", "t", 0.5, opts)
    ours = DatasetStore(tmp_path / "out").image("codex", "t", 0.5).read_all()
    expected = authors_script(img, predictor, stride)
    assert ours.shape == expected.shape == (len(MARKERS), 40, 52)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert entry["stitching"] == "official" and entry["grid_stride"] == max(1, stride // 2)
    # the project's stitching differs (white padding, block centres): the option really changes the result
    grid = ri.predict_image(img, predictor, stride=stride, foreground="all", blend=True)
    assert np.abs(grid.image - expected).max() > 1e-3


def _count_chunk_writes(monkeypatch) -> list[str]:
    writes: list[str] = []
    original = zarr.storage.LocalStore.set

    async def counting(self, key, value):  # type: ignore[no-untyped-def]
        if "grid.zarr/0/c/" in f"{self.root}/{key}":
            writes.append(f"{self.root}/{key}")
        return await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting)
    return writes


def test_two_simulated_ranks_write_each_chunk_once_and_equal_one_process(tmp_path, monkeypatch):
    """Regions shared out r, r+2, ... as Lightning's predict sampler does; the result is the one-process result."""
    img = he_like(120, 150, blobs=4)
    cells = np.zeros((120, 150), np.uint32)
    cells[10:50, 20:90], cells[60:115, 70:140] = 4, 7
    predictor = tiny_predictor()
    opts = ri.PredictOptions(stride=4, foreground="all", tile_size=8, progress=False)
    one = ri.predict_to_dataset(img, predictor, tmp_path / "one", "t", 0.5, opts, cell_mask=cells)

    writes = _count_chunk_writes(monkeypatch)
    out = tmp_path / "two"
    plan = ri.plan_tissue(ri.as_he_image(img), predictor, out, "t", 0.5, opts, source={"kind": "memory"}, fresh=True,
                          cell_mask=cells)
    image = ri.as_he_image(img)
    pending = ri.PlanFiles(plan).pending()  # listed once, before any rank writes (the DataModule's barrier)
    for rank in (1, 0):  # rank 1 first: the order regions are written in does not matter
        files = ri.PlanFiles(plan)
        for k in pending[rank::2]:
            region, tfg, hist = files.read_inputs(image, k)
            pred, values = ri.predict_tile(region, tfg, predictor, plan.grid_stride, 64)
            files.write_region(k, pred, values, hist, 0.0, rank=rank)
    files = ri.PlanFiles(plan)
    records = [files.read_record(k) for k in range(len(plan.regions))]
    chunks = [tuple(c) for r in records for c in r["chunks"].tolist()]
    assert len(plan.regions) == 20 and len(chunks) == len(set(chunks)) == 20
    assert sorted({int(r["rank"]) for r in records}) == [0, 1]
    assert len(writes) == len(set(writes)) == 20, "every chunk file written exactly once"
    two = ri.tissue_finish.finish_tissue(files)

    from datamodules.store import DatasetStore
    a, b = DatasetStore(tmp_path / "one"), DatasetStore(out)
    np.testing.assert_array_equal(a.image("codex", "t", 2.0).read_all(), b.image("codex", "t", 2.0).read_all())
    assert one["dynamic_range"] == two["dynamic_range"] and one["he_histogram"] == two["he_histogram"]
    import anndata as ad
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "one" / "t.cells.h5ad").X, ad.read_h5ad(out / "t.cells.h5ad").X)
    assert not (out / ri.WORK_DIR).exists()


def test_interrupted_regions_resume_without_recomputing(tmp_path):
    img = he_like(96, 96, blobs=3)
    predictor = tiny_predictor()
    opts = ri.PredictOptions(stride=8, foreground="all", tile_size=4, progress=False)
    image = ri.as_he_image(img)
    calls: list[int] = []

    def failing_after_three(region, fg, pred, stride, batch_size, on_batch=None):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # the run dies mid-way
        return ri.predict_tile(region, fg, pred, stride, batch_size)

    source = {"kind": "file", "path": "x"}
    plan = ri.plan_tissue(image, predictor, tmp_path / "out", "t", 0.5, opts, source=source, fresh=False)
    with pytest.raises(KeyboardInterrupt):
        ri.run_regions(ri.PlanFiles(plan), image, predictor, 64, progress=False, tile_fn=failing_after_three)
    files = ri.PlanFiles(plan)
    assert len(files.pending()) == len(plan.regions) - 3
    first = {k: files.read_record(k)["written_at"] for k in range(3)}
    again = ri.plan_tissue(image, predictor, tmp_path / "out", "t", 0.5, opts, source=source, fresh=False)
    assert again.fingerprint == plan.fingerprint  # same settings: the work folder is resumed, not redone
    calls.clear()
    done = ri.run_regions(ri.PlanFiles(again), image, predictor, 64, progress=False,
                          tile_fn=lambda *a, **k: (calls.append(1), ri.predict_tile(*a, **k))[1])
    assert done == len(calls) == len(plan.regions) - 3
    assert {k: ri.PlanFiles(again).read_record(k)["written_at"] for k in range(3)} == first
    ri.tissue_finish.finish_tissue(ri.PlanFiles(again))
    fresh = ri.predict_image(img, predictor, stride=8, foreground="all")
    from datamodules.store import DatasetStore
    np.testing.assert_allclose(DatasetStore(tmp_path / "out").image("codex", "t", 4.0).read_all(), fresh.image,
                               rtol=1e-5, atol=1e-6)


def test_resampled_regions_fit_together_and_average_areas():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, size=(3, 60, 44), dtype=np.uint8)
    he = ri.as_he_image(src)
    half = ri.ResampledHE(he, 0.25, 0.5)  # 2 source px per model px: a 2×2 area mean
    assert half.shape == (3, 30, 22)
    expected = src.reshape(3, 30, 2, 22, 2).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_array_equal(half.read(0, 0, 30, 22), np.clip(np.rint(expected), 0, 255).astype(np.uint8))
    for factor in (0.75, 1.51):
        r = ri.ResampledHE(he, 1.0, factor)
        _, h, w = r.shape
        whole = r.read(0, 0, h, w)
        pieces = np.concatenate([np.concatenate([r.read(y, x, min(7, h - y), min(9, w - x)) for x in range(0, w, 9)], axis=2)
                                 for y in range(0, h, 7)], axis=1)
        np.testing.assert_array_equal(pieces, whole)
    assert ri.resample_he(he, 0.3775, 0.378) is he


def test_resolution_mismatch_is_refused_or_resampled_and_outputs_carry_provenance(tmp_path, capsys):
    import tifffile
    from conftest import rosie_checkpoint

    from experiments.rosie_predict import main

    ckpt = rosie_checkpoint(tmp_path / "m.ckpt", MARKERS, he_mpp=0.5)
    png = save_png(tmp_path / "slide.png", he_like(160, 160, blobs=4))
    base = ["--ckpt", str(ckpt), "--he", str(png), "--device", "cpu", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a"), "--mpp", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "slide.png" in err and "0.25 µm/px" in err and "0.5 µm/px" in err and "--resample" in err
    assert not (tmp_path / "a" / "codex").exists()
    assert main(base + ["--out", str(tmp_path / "b"), "--mpp", "0.25", "--resample", "--ome-tiff"]) == 0
    qc = json.loads((tmp_path / "b" / "qc.json").read_text())["tissues"]["slide"]
    sha = ri.file_sha256(ckpt)
    assert qc["he_shape"] == [80, 80] and qc["he_mpp"] == 0.5 and qc["source_mpp"] == 0.25
    assert qc["checkpoint_sha256"] == sha and qc["model_mpp"] == 0.5 and qc["output_mpp"] == 4.0
    attrs = zarr.open_group(str(tmp_path / "b" / qc["image"]), mode="r").attrs
    assert attrs["virtuplex"]["checkpoint_sha256"] == sha
    assert [c["label"] for c in attrs["omero"]["channels"]] == MARKERS if "omero" in attrs else True
    with tifffile.TiffFile(tmp_path / "b" / "slide.ome.tif") as tif:
        assert sha in tif.ome_metadata and 'PhysicalSizeX="4.0"' in tif.ome_metadata and 'Name="CD45"' in tif.ome_metadata
