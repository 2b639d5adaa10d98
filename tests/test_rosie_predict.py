"""ROSIE whole-image inference: geometry, padding, streaming, atomic outputs, cells, QC, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import rosie_checkpoint
from scipy import ndimage
from torch import nn

from lightning_modules import rosie_inference as ri

MARKERS = ["DAPI", "CD45", "PanCK", "CD3e", "Ki67"]
P = ri.PATCH_SIZE


class TinyNet(nn.Module):
    """~1k parameters: fast enough to run every pixel of a 512² image at stride 1 on a CPU."""

    def __init__(self, m: int = len(MARKERS)):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(16)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8 * 4 * 4, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(self.pool(x))).flatten(1))


def he_like(h: int = 512, w: int = 512, blobs: int = 5, seed: int = 0) -> np.ndarray:
    """Light smooth noise (glass/stroma) with a few dark purple nuclei-like blobs, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w, 3)), (6, 6, 0))
    noise /= noise.std()
    img = 225 + 8 * noise
    yy, xx = np.mgrid[:h, :w]
    for _ in range(blobs):
        cy, cx = rng.integers(min(40, h // 3), max(h - 40, h // 3 + 1)), rng.integers(min(40, w // 3), max(w - 40, w // 3 + 1))
        r = rng.integers(10, 18)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[blob] = np.array([110, 50, 130]) + 10 * noise[blob]
    return np.clip(img, 0, 255).astype(np.uint8)


def save_png(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), rgb[..., ::-1] if rgb.ndim == 3 and rgb.shape[2] >= 3 else rgb)
    return path


def tiny_predictor(seed: int = 0) -> ri.PatchPredictor:
    torch.manual_seed(seed)
    return ri.PatchPredictor(TinyNet(), MARKERS, device="cpu")


def direct(img: np.ndarray, predictor: ri.PatchPredictor, i: int, j: int, s: int) -> np.ndarray:
    """The specification: the 128 px patch centred on block (i, j), white outside the image."""
    pad = np.pad(img, ((P, P), (P, P), (0, 0)), constant_values=255)
    top, left = i * s + s // 2 - P // 2 + P, j * s + s // 2 - P // 2 + P
    patch = torch.from_numpy(np.ascontiguousarray(pad[top : top + P, left : left + P].transpose(2, 0, 1)))[None]
    return predictor(patch)[0].numpy()


def no_temp_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def atto_ckpt(tmp_path_factory) -> Path:
    return rosie_checkpoint(tmp_path_factory.mktemp("ckpt") / "atto.ckpt", MARKERS)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_png_to_ome_tiff_stride8(atto_ckpt, tmp_path, capsys):
    import tifffile

    from analysis.rosie_metrics import he_histograms, w1_to_reference
    from datamodules.store import DatasetStore
    from experiments.rosie_predict import main

    img = he_like()
    png = save_png(tmp_path / "slide_A.png", img)
    ref = np.stack([he_histograms(he_like(seed=s)) for s in (1, 2)])
    np.save(tmp_path / "ref.npy", ref)
    out = tmp_path / "pred"
    rc = main(["--ckpt", str(atto_ckpt), "--he", str(png), "--out", str(out), "--ome-tiff", "--device", "cpu",
               "--reference-hist", str(tmp_path / "ref.npy"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "patches in" in text and "patches/s" in text

    with tifffile.TiffFile(out / "slide_A.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"
        tiff = tif.asarray()
        assert "Name=\"PanCK\"" in tif.ome_metadata
    assert tiff.shape == (len(MARKERS), 64, 64) and tiff.dtype == np.float32

    store = DatasetStore(out)
    assert [p for p in store.validate() if p.severity == "error"] == []
    zimg = store.image("codex", "slide_A", 4.0)
    assert zimg.channel_names == MARKERS and zimg.mpp == 4.0
    np.testing.assert_array_equal(zimg.read_all(), tiff)
    assert list(store.channels("codex")["channel_name"]) == MARKERS
    fg = store.tissue_mask("slide_A", 4.0)
    assert fg.shape == (64, 64) and 10 < fg.sum() < 64 * 64 // 4  # the blobs, not the glass
    assert (tiff[:, ~fg] == 0).all() and np.abs(tiff[:, fg]).sum() > 0

    predictor = ri.PatchPredictor.from_checkpoint(atto_ckpt, device="cpu")
    for i, j in np.argwhere(fg)[:3]:
        np.testing.assert_allclose(tiff[:, i, j], direct(img, predictor, int(i), int(j), 8), rtol=1e-4, atol=1e-5)

    qc = json.loads((out / "qc.json").read_text())["tissues"]["slide_A"]
    assert qc["n_patches"] == int(fg.sum()) and qc["patches_per_s"] > 0
    dr = np.percentile(tiff[:, fg], 99, axis=1) - np.percentile(tiff[:, fg], 1, axis=1)
    np.testing.assert_allclose([qc["dynamic_range"][m] for m in MARKERS], dr, rtol=1e-5)
    assert qc["w1_to_training_he"] == pytest.approx(w1_to_reference(he_histograms(img), ref), rel=1e-6)
    assert len(pd.read_csv(out / "qc.csv")) == len(MARKERS)
    assert no_temp_leftovers(out) == []

    # a second run skips the complete tissue (resumable) without touching it; --overwrite redoes it
    args = ["--ckpt", str(atto_ckpt), "--he", str(png), "--out", str(out), "--device", "cpu", "--no-progress"]
    before = (out / "slide_A.ome.tif").stat().st_mtime_ns
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "slide_A.ome.tif").stat().st_mtime_ns == before
    assert main(args + ["--overwrite"]) == 0


def test_cli_dataset_split_with_stored_masks(atto_ckpt, tmp_path):
    import anndata as ad

    from datamodules.store import DatasetStore, DatasetWriter
    from experiments.rosie_predict import main

    src = tmp_path / "src"
    with DatasetWriter.create(src) as w:
        for k, tid in enumerate(["t1", "t2"]):
            img = he_like(40, 56, blobs=1, seed=k)
            w.write_image("he", tid, img.transpose(2, 0, 1), 0.5, ["R", "G", "B"])
            w.write_tissue_mask(tid, 0.5, np.ones((40, 56), bool))
            cells = np.zeros((40, 56), np.uint32)
            cells[5:15, 5:20], cells[20:35, 30:50] = 3, 9
            w.write_cell_mask(tid, 0.5, cells)
        w.write_tissues(pd.DataFrame({"tissue_id": ["t1", "t2", "t3"], "split": ["test", "test", "train"],
                                      "patient_id": ["p1", "p2", "p3"]}))
        w.write_channels("codex", pd.DataFrame({"channel_name": ["Hoechst", "CD45", "Pan-Cytokeratin"],
                                                "uniprot_id": [None, "P08575", "P05787"]}))
    out = tmp_path / "pred"
    assert main(["--ckpt", str(atto_ckpt), "--he", str(src), "--split", "test", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    store = DatasetStore(out)
    tissues = store.tissues().set_index("tissue_id")
    assert sorted(tissues.index) == ["t1", "t2"] and set(tissues["split"]) == {"test"}
    channels = store.channels("codex").set_index("channel_name")
    assert channels.loc["PanCK", "uniprot_id"] == "P05787" and channels.loc["CD45", "uniprot_id"] == "P08575"
    assert channels.loc["DAPI", "uniprot_id"] is None and channels.loc["DAPI", "is_nuclear_marker"]
    assert set(tissues["patient_id"]) == {"p1", "p2"}
    for tid in ("t1", "t2"):
        assert store.image("codex", tid, 4.0).shape == (len(MARKERS), 5, 7)
        assert store.tissue_mask(tid, 4.0).all()  # the stored (all-tissue) mask was used, not Otsu
        cells = ad.read_h5ad(out / f"{tid}.cells.h5ad")
        assert list(cells.obs["cell_id"]) == [3, 9] and list(cells.var_names) == MARKERS
    assert no_temp_leftovers(out) == []


def test_cli_bad_inputs_give_clear_errors(atto_ckpt, tmp_path, capsys):
    import tifffile

    from experiments.rosie_predict import main

    img = he_like(64, 64)
    rgba = np.concatenate([img, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    cases = {
        "rgba.png": (lambda p: cv2.imwrite(str(p), rgba), "RGBA"),
        "gray.png": (lambda p: cv2.imwrite(str(p), img[..., 0]), "grayscale"),
        "deep.png": (lambda p: cv2.imwrite(str(p), img.astype(np.uint16) * 257), "16-bit"),
        "deep.tif": (lambda p: tifffile.imwrite(p, img.astype(np.uint16) * 257, photometric="rgb"), "img_as_ubyte"),
    }
    for name, (make, expected) in cases.items():
        make(tmp_path / name)
        rc = main(["--ckpt", str(atto_ckpt), "--he", str(tmp_path / name), "--out", str(tmp_path / "o"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and name in err, (name, err)
    assert main(["--ckpt", str(atto_ckpt), "--he", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    save_png(tmp_path / "ok.png", img)
    assert main(["--ckpt", str(atto_ckpt), "--he", str(tmp_path / "ok.png"), "--out", str(tmp_path / "o"), "--stride", "9"]) == 2
    assert "stride" in capsys.readouterr().err
    assert not (tmp_path / "o" / "codex").exists()


def test_measured_dataset_as_out_is_refused_and_left_byte_identical(atto_ckpt, synthetic_dataset, tmp_path, capsys):
    """The reported data loss: --out at a measured dataset blanked clinical fields and dropped a channel column."""
    import shutil

    from experiments.rosie_predict import main

    measured = tmp_path / "measured"
    shutil.copytree(synthetic_dataset, measured)
    before = {p.relative_to(measured): p.read_bytes() for p in measured.rglob("*") if p.is_file()}
    save_png(tmp_path / "he.png", he_like(96, 96))
    for extra in ([], ["--overwrite"]):
        rc = main(["--ckpt", str(atto_ckpt), "--he", str(tmp_path / "he.png"), "--out", str(measured), "--device", "cpu",
                   "--no-progress", *extra])
        assert rc == 2 and "is a measured dataset" in capsys.readouterr().err
    after = {p.relative_to(measured): p.read_bytes() for p in measured.rglob("*") if p.is_file()}
    assert after == before


def test_rerun_into_own_prediction_folder_and_small_image_warning(atto_ckpt, tmp_path, caplog):
    """A prediction folder is reused (resume); an image smaller than a patch is predicted with a warning."""
    from experiments.rosie_predict import main

    save_png(tmp_path / "small.png", he_like(64, 80, blobs=1))
    argv = ["--ckpt", str(atto_ckpt), "--he", str(tmp_path / "small.png"), "--out", str(tmp_path / "pred"),
            "--device", "cpu", "--no-progress", "--foreground", "all"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert any("smaller than the model's 128-px patch" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "pred" / "metadata" / "dataset.json").read_text())["kind"] == "prediction"
    assert main(argv) == 0  # its own prediction folder: skipped as complete, not refused


# ------------------------------------------------------------------------------------------ core


@pytest.mark.parametrize("stride", [8, 3])
def test_every_block_is_the_patch_centred_on_it(stride):
    img = he_like(70, 90, blobs=2)
    predictor = tiny_predictor()
    pred = ri.predict_image(img, predictor, stride=stride, foreground="all")
    assert pred.image.shape == (len(MARKERS), -(-70 // stride), -(-90 // stride))
    hout, wout = pred.image.shape[1:]
    for i, j in [(0, 0), (hout - 1, wout - 1), (hout // 2, wout // 3), (0, wout - 1)]:
        np.testing.assert_allclose(pred.image[:, i, j], direct(img, predictor, i, j, stride), rtol=1e-5, atol=1e-6)


def test_image_smaller_than_a_patch():
    img = he_like(60, 90, blobs=1)
    predictor = tiny_predictor()
    pred = ri.predict_image(img, predictor, stride=8, foreground="all")
    assert pred.image.shape == (len(MARKERS), 8, 12) and pred.stats.n_patches == 96
    np.testing.assert_allclose(pred.image[:, 7, 11], direct(img, predictor, 7, 11, 8), rtol=1e-5, atol=1e-6)


def test_stride1_full_resolution_grid():
    img = he_like()
    predictor = tiny_predictor()
    pred = ri.predict_image(img, predictor, stride=1, batch_size=512)
    assert pred.image.shape == (len(MARKERS), 512, 512)
    fg = pred.foreground
    assert 1000 < fg.sum() < 40_000 and pred.stats.n_patches == fg.sum()
    assert (pred.image[:, ~fg] == 0).all()
    for i, j in np.argwhere(fg)[[0, len(np.argwhere(fg)) // 2, -1]]:
        np.testing.assert_allclose(pred.image[:, i, j], direct(img, predictor, int(i), int(j), 1), rtol=1e-5, atol=1e-6)
    # the stride-8 grid is the stride-1 prediction sampled at the 8 px block centres (4, 12, ...)
    p8 = ri.predict_image(img, predictor, stride=8, foreground=fg)  # a native mask, sampled at block centres
    fg8 = fg[4::8, 4::8]
    np.testing.assert_array_equal(p8.foreground, fg8)
    np.testing.assert_allclose(p8.image[:, fg8], pred.image[:, 4::8, 4::8][:, fg8], rtol=1e-5, atol=1e-6)


def test_streamed_tiles_equal_one_tile_and_the_writer(tmp_path):
    from datamodules.store import DatasetStore

    img = he_like(90, 130, blobs=3)
    predictor = tiny_predictor()
    one = ri.predict_image(img, predictor, stride=4, foreground="all", tile_size=10_000)
    many = ri.predict_image(img, predictor, stride=4, foreground="all", tile_size=7, batch_size=32)
    np.testing.assert_allclose(many.image, one.image, rtol=1e-5, atol=1e-6)
    opts = ri.PredictOptions(stride=4, foreground="all", tile_size=9, progress=False)
    ri.predict_to_dataset(img, predictor, tmp_path / "out", "t", 0.5, opts)
    written = DatasetStore(tmp_path / "out").image("codex", "t", 2.0).read_all()
    np.testing.assert_allclose(written, one.image, rtol=1e-5, atol=1e-6)


def test_failed_run_leaves_nothing_behind(tmp_path):
    img = he_like(100, 100, blobs=2)

    class Exploding(nn.Module):
        calls = 0

        def forward(self, x):
            Exploding.calls += 1
            if Exploding.calls > 2:
                raise RuntimeError("boom")
            return torch.zeros(x.shape[0], len(MARKERS))

    predictor = ri.PatchPredictor(Exploding(), MARKERS, device="cpu")
    opts = ri.PredictOptions(stride=8, foreground="all", tile_size=3, batch_size=4, ome_tiff=True, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        ri.predict_to_dataset(img, predictor, tmp_path / "out", "t", 0.5, opts)
    assert not (tmp_path / "out" / "codex" / "4_0mpp" / "images" / "t.ome.zarr").exists()
    assert not (tmp_path / "out" / "t.ome.tif").exists()
    assert no_temp_leftovers(tmp_path / "out") == []


def test_cell_expression_equals_direct_per_cell_mean(tmp_path):
    import anndata as ad

    img = he_like(96, 120, blobs=3)
    rng = np.random.default_rng(3)
    cells = np.zeros((96, 120), np.uint32)
    ids = rng.permutation(np.arange(1, 400))[:30]
    for k, cid in enumerate(ids):  # irregular rectangles crossing block and tile borders, one overwrites another
        y, x = rng.integers(0, 90), rng.integers(0, 110)
        cells[y : y + rng.integers(3, 17), x : x + rng.integers(3, 23)] = cid
    predictor = tiny_predictor()
    stride = 8
    opts = ri.PredictOptions(stride=stride, tile_size=5, progress=False)
    ri.predict_to_dataset(img, predictor, tmp_path / "out", "t", 0.5, opts, cell_mask=cells)
    adata = ad.read_h5ad(tmp_path / "out" / "t.cells.h5ad")

    from datamodules.store import DatasetStore

    grid = DatasetStore(tmp_path / "out").image("codex", "t", 4.0).read_all()
    fg = DatasetStore(tmp_path / "out").tissue_mask("t", 4.0)
    up = grid.repeat(stride, 1).repeat(stride, 2)[:, :96, :120]
    up_fg = fg.repeat(stride, 0).repeat(stride, 1)[:96, :120]
    present = np.unique(cells[cells > 0])
    assert sorted(adata.obs["cell_id"]) == sorted(present.tolist())
    assert list(adata.var_names) == MARKERS and set(adata.obs["tissue_id"]) == {"t"}
    for row, cid in enumerate(adata.obs["cell_id"]):
        m = cells == cid
        np.testing.assert_allclose(adata.X[row], up[:, m].mean(axis=1), rtol=1e-5, atol=1e-7)
        yy, xx = np.nonzero(m)
        np.testing.assert_allclose(adata.obsm["spatial"][row], [xx.mean(), yy.mean()])
        assert adata.obs["n_pixels"].iloc[row] == m.sum()
        assert adata.obs["fg_fraction"].iloc[row] == pytest.approx(up_fg[m].mean())
    assert np.abs(adata.X).sum() > 0


def test_blend_matches_brute_force_gaussian_splat():
    rng = np.random.default_rng(0)
    stride, h, w = 4, 30, 37
    hout, wout = ri.output_shape(h, w, stride)
    grid = rng.normal(size=(3, hout, wout)).astype(np.float32)
    fg = rng.random((hout, wout)) > 0.3
    out = ri.blend_region(grid, fg, 0, 0, h, w, stride)
    assert out.shape == (3, h, w)
    num, den = np.zeros((3, h, w)), np.zeros((h, w))
    k = 2 * stride
    yy, xx = np.mgrid[:h, :w] + 0.5
    for i, j in np.argwhere(fg):  # official: each prediction spread over a k×k window, sigma k/4
        cy, cx = i * stride + stride / 2, j * stride + stride / 2
        inside = (np.abs(yy - cy) < k / 2) & (np.abs(xx - cx) < k / 2)
        wgt = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (k / 4) ** 2)) * inside
        num += grid[:, i, j][:, None, None] * wgt
        den += wgt
    expected = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # a tile of the image is the same as the whole image cut
    np.testing.assert_allclose(ri.blend_region(grid, fg, 7, 11, 13, 20, stride), out[:, 7:20, 11:31], rtol=1e-5, atol=1e-6)


def test_blend_output_written_at_native_resolution(tmp_path):
    from datamodules.store import DatasetStore

    img = he_like(64, 80, blobs=2)
    opts = ri.PredictOptions(stride=8, blend=True, foreground="all", ome_tiff=True, progress=False)
    entry = ri.predict_to_dataset(img, tiny_predictor(), tmp_path / "out", "t", 0.5, opts)
    store = DatasetStore(tmp_path / "out")
    blended = store.image("codex", "t", 0.5)
    assert blended.shape == (len(MARKERS), 64, 80) and entry["output_shape"] == [len(MARKERS), 64, 80]
    grid = store.image("codex", "t", 4.0).read_all()
    full = blended.read_all()
    # all blocks foreground: each 8 px block centre sees only its own block at peak weight -> close to it
    assert np.abs(full[:, 4::8, 4::8] - grid).max() < np.abs(grid).max()
    np.testing.assert_allclose(full, ri.blend_region(grid, np.ones(grid.shape[1:], bool), 0, 0, 64, 80, 8), rtol=1e-5, atol=1e-6)
    import tifffile

    assert tifffile.imread(tmp_path / "out" / "t.ome.tif").shape == (len(MARKERS), 64, 80)


def test_lazy_tiff_reads_regions_and_pixel_size(tmp_path):
    import tifffile

    img = he_like(300, 260, blobs=4)
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), metadata={"axes": "YXS", "PhysicalSizeX": 0.25,
                                                                             "PhysicalSizeY": 0.25})
    he, mpp = ri.open_he_image(path)
    assert mpp == pytest.approx(0.25) and he.shape == (3, 300, 260)
    np.testing.assert_array_equal(he.read(10, 20, 30, 40), img[10:40, 20:60].transpose(2, 0, 1))
    predictor = tiny_predictor()
    a = ri.predict_image(he, predictor, stride=8)
    b = ri.predict_image(img, predictor, stride=8)
    np.testing.assert_array_equal(a.foreground, b.foreground)
    np.testing.assert_allclose(a.image, b.image, rtol=1e-6, atol=1e-7)
    he.close()


def test_foreground_from_thumbnail_agrees_with_full_resolution():
    img = he_like(400, 400, blobs=6)
    he = ri.as_he_image(img)
    full = ri.foreground_grid(he, 8, "otsu", thumbnail_max_px=4096)
    thumb = ri.foreground_grid(he, 8, "otsu", thumbnail_max_px=100)  # 4x downsampled thumbnail
    assert full.sum() > 10
    assert (full == thumb).mean() > 0.97


def _authors_preprocess(patch_chw_uint8: np.ndarray) -> torch.Tensor:
    """The official script: ToTensor (/255), Resize(224) bilinear, ImageNet Normalize."""
    x = torch.from_numpy(patch_chw_uint8.copy()).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_official_checkpoint_path_uses_the_authors_preprocessing(tmp_path, monkeypatch):
    """Fast: the released network is replaced by a tiny one behind the same official adapter."""
    from lightning_modules.components import rosie_backbone as rb

    torch.manual_seed(0)
    tiny = TinyNet(50).eval()
    monkeypatch.setattr(rb, "load_official_rosie_checkpoint", lambda path, with_preprocess=False, **kw:
                        rb.RosieRegressor(tiny, rb.RosieInputAdapter(224, rb.IMAGENET_MEAN, rb.IMAGENET_STD)))
    path = tmp_path / "ROSIE.pth"
    torch.save({"model_state_dict": {"module.features.0.0.weight": torch.zeros(1)}}, path)
    predictor = ri.PatchPredictor.from_checkpoint(path, device="cpu")  # told apart from Lightning by content
    assert predictor.meta["kind"] == "official" and predictor.marker_names == list(ri.ROSIE_PANEL)
    img = he_like(20, 30, blobs=0)
    pred = ri.predict_image(img, predictor, stride=8, foreground="all")
    pad = np.pad(img, ((P, P), (P, P), (0, 0)), constant_values=255)
    for i, j in [(0, 0), (2, 3)]:
        top, left = i * 8 + 4 - P // 2 + P, j * 8 + 4 - P // 2 + P
        with torch.no_grad():
            ref = tiny(_authors_preprocess(pad[top : top + P, left : left + P].transpose(2, 0, 1)))[0].numpy()
        np.testing.assert_allclose(pred.image[:, i, j], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_official_checkpoint_is_detected_and_preprocessed_like_the_authors(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.convnext_small(num_classes=50).eval()
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.1, 1.0)
    path = tmp_path / "ROSIE.pth"
    torch.save({"model_state_dict": {"module." + k: v for k, v in tv.state_dict().items()}}, path)
    predictor = ri.PatchPredictor.from_checkpoint(path, device="cpu")  # no --official: told apart by content
    assert predictor.meta["kind"] == "official" and predictor.marker_names[:3] == ["DAPI", "CD45", "CD68"]
    img = he_like(8, 16, blobs=0)
    pred = ri.predict_image(img, predictor, stride=8, foreground="all")
    pad = np.pad(img, ((P, P), (P, P), (0, 0)), constant_values=255)
    top, left = 4 - P // 2 + P, 12 - P // 2 + P
    with torch.no_grad():
        ref = tv(_authors_preprocess(pad[top : top + P, left : left + P].transpose(2, 0, 1)))[0].numpy()
    assert np.abs(ref).mean() > 1e-2
    np.testing.assert_allclose(pred.image[:, 0, 1], ref, rtol=1e-3, atol=1e-3)
