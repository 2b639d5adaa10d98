"""Ingest of user files into the layout, its errors, and H&E→DAPI co-registration (ROSIE Methods)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import REPO, shared_data
from scipy import ndimage

from datamodules.ingest import IngestError, ingest
from datamodules.registration import register_he_to_dapi, warp_to
from datamodules.store import DatasetStore

RNG = np.random.default_rng(0)
MIBI_UNIPROT = {"CD45": "P08575", "CD20": "P11836", "CD3": "P07766", "CD4": "P01730", "CD8": "P01732",
                "CD68": "P34810", "CD31": "P16284", "VIM": "P08670", "ECAD": "P12830"}
PANCREAS_UNIPROT = {"H3": "P68431", "CD99": "P14209", "PIN": "P01308", "CD8a": "P01732", "CDH": "P12830"}


# --------------------------------------------------------------------------- helpers


def _tissue_image(c: int, h: int, w: int, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    tissue = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.42 * min(h, w)) ** 2
    img = rng.gamma(0.8, 5.0, size=(c, h, w))
    img[:, tissue] += rng.gamma(2.0, 300.0, size=(c, int(tissue.sum())))
    return img.astype(dtype)


def _write_ome(path: Path, arr: np.ndarray, names: list[str], mpp: float | None = 0.5) -> Path:
    meta = {"axes": "CYX", "Channel": {"Name": names}}
    if mpp is not None:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
    tifffile.imwrite(path, arr, ome=True, metadata=meta)
    return path


def _channels_csv(path: Path, mapping: dict[str, str | None]) -> Path:
    pd.DataFrame({"channel_name": list(mapping), "uniprot_id": list(mapping.values())}).to_csv(path, index=False)
    return path


def _he_rgb(h: int, w: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    tissue = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.4 * min(h, w)) ** 2
    rgb = np.full((h, w, 3), 240, np.uint8)
    rgb[tissue] = (np.array([180, 90, 170]) + rng.integers(-25, 25, size=(int(tissue.sum()), 3))).clip(0, 255)
    return rgb


# --------------------------------------------------------------------------- good inputs


def test_ome_tiff_ingests_bit_identical(tmp_path):
    names = ["DAPI", "CD3", "CD20", "Ki67"]
    arr = _tissue_image(4, 300, 260)
    src = _write_ome(tmp_path / "s1.ome.tif", arr, names, mpp=0.5)
    csv = _channels_csv(tmp_path / "ch.csv", {"CD3": "P07766", "CD20": "P11836", "Ki67": "P46013"})
    res = ingest(src, "codex", "lung", "s1", tmp_path / "out", channels=csv, split="val", patient_id="p7")
    store = DatasetStore(tmp_path / "out" / "lung")
    img = store.image("codex", "s1")
    assert img.mpp == 0.5 and res.mpp == 0.5  # from OME PhysicalSizeX
    assert img.channel_names == names and img.dtype == np.uint16
    crop = img.read(37, 51, 128, 100)
    assert crop.dtype == arr.dtype
    np.testing.assert_array_equal(crop, arr[:, 37:165, 51:151])
    np.testing.assert_array_equal(img.read(0, 0, 300, 260, channels=[2]), arr[[2]])
    ch = store.channels("codex")
    assert list(ch["channel_name"]) == names
    assert pd.isna(ch["uniprot_id"][0]) and list(ch["uniprot_id"][1:]) == ["P07766", "P11836", "P46013"]
    assert ch["is_nuclear_marker"].tolist() == [True, False, False, False]
    t = store.tissues().set_index("tissue_id").loc["s1"]
    assert (t["split"], t["patient_id"]) == ("val", "p7")
    mask = store.tissue_mask("s1", 0.5)
    assert mask.shape == (300, 260) and 0.3 < mask.mean() < 0.8
    stats = store.standardization("codex", 0.5)
    expected = [np.quantile(arr[c][mask], 0.99) for c in range(4)]
    np.testing.assert_allclose(stats.upper_quantiles.loc["s1", names].to_numpy(np.float64), expected, rtol=1e-6)
    assert any("DAPI" in w and "UniProt" in w for w in res.warnings)  # DAPI has no UniProt id: warned
    assert any("embedding" in w for w in res.warnings)
    assert not [p for p in store.validate() if p.severity == "error"]


def test_pyramidal_ome_tiff_reads_level0(tmp_path):
    arr = _tissue_image(3, 512, 384, seed=3)
    src = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(src) as tw:
        tw.write(arr, subifds=1, tile=(128, 128), metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3", "CD8"]}})
        tw.write(arr[:, ::2, ::2], subfiletype=1, tile=(128, 128))
    ingest(src, "codex", "d", "p1", tmp_path / "out", resolution=0.5)
    np.testing.assert_array_equal(DatasetStore(tmp_path / "out" / "d").image("codex", "p1").read_all(), arr)


def test_rgb_he_tiff_ingests_as_he(tmp_path):
    rgb = _he_rgb(200, 240)
    src = tmp_path / "he.tif"
    tifffile.imwrite(src, rgb, photometric="rgb")
    ingest(src, "he", "ds", "s1", tmp_path / "out", resolution=0.25)
    store = DatasetStore(tmp_path / "out" / "ds")
    img = store.image("he", "s1")
    assert img.shape == (3, 200, 240) and img.dtype == np.uint8 and img.channel_names == ["R", "G", "B"]
    np.testing.assert_array_equal(img.read(10, 20, 64, 64), np.moveaxis(rgb, -1, 0)[:, 10:74, 20:84])
    mask = store.tissue_mask("s1", 0.25)
    assert mask[100, 120] and not mask[2, 2]  # tissue is the darker part
    assert store.standardization("he", 0.25) is None  # H&E is normalised with ImageNet stats, not stored stats
    # (3,Y,X) H&E is accepted as well
    cyx = tmp_path / "he_cyx.tif"
    tifffile.imwrite(cyx, np.moveaxis(rgb, -1, 0), photometric="minisblack")
    ingest(cyx, "he", "ds", "s2", tmp_path / "out", resolution=0.25)
    np.testing.assert_array_equal(DatasetStore(tmp_path / "out" / "ds").image("he", "s2").read_all(), np.moveaxis(rgb, -1, 0))


def test_real_mibi_folder_ingests(tmp_path):
    folder = shared_data("mibi_dcis") / "Point2203_pt1072_31606"
    csv = _channels_csv(tmp_path / "mibi.csv", {**MIBI_UNIPROT, "NotAMarker": "P99999"})
    res = ingest(folder, "mibi", "dcis", "pt1072", tmp_path / "out", channels=csv, resolution=0.5, split="test")
    store = DatasetStore(tmp_path / "out" / "dcis")
    img = store.image("mibi", "pt1072")
    files = sorted(folder.glob("*.tif"), key=lambda f: f.name.lower())
    assert img.shape == (len(files), 1024, 1024) and img.channel_names == [f.stem for f in files]
    i = img.channel_names.index("CD45")
    np.testing.assert_array_equal(img.read(300, 400, 128, 128, channels=[i])[0], tifffile.imread(folder / "CD45.tif")[300:428, 400:528])
    ch = store.channels("mibi").set_index("channel_name")
    assert ch.loc["CD45", "uniprot_id"] == "P08575" and ch.loc["ECAD", "uniprot_id"] == "P12830"
    assert pd.isna(ch.loc["Ki67", "uniprot_id"])
    assert bool(ch.loc["HH3", "is_nuclear_marker"]) and not bool(ch.loc["CD45", "is_nuclear_marker"])
    no_id = next(w for w in res.warnings if "without a UniProt id" in w)
    assert "Ki67" in no_id and "CD45" not in no_id
    assert any("NotAMarker" in w for w in res.warnings)  # a table row matching no image channel
    assert store.standardization("mibi", 0.5) is not None


def test_real_imc_pancreas_with_masks_ingests(tmp_path):
    folder = shared_data("imc_pancreas_cytomapper")
    emb = shared_data("imc_example") / "marker_embeddings"
    csv = _channels_csv(tmp_path / "panc.csv", PANCREAS_UNIPROT)
    images = {}
    for k, tid in enumerate(("E34", "G01", "J02")):
        res = ingest(folder / f"{tid}_imc.tiff", "imc", "pancreas", tid, tmp_path / "out", channels=csv,
                     cell_mask=folder / f"{tid}_mask.tiff", split=("train", "train", "test")[k], embeddings=emb)
        images[tid] = tifffile.imread(folder / f"{tid}_imc.tiff")
        assert res.created_dataset == (k == 0)
    store = DatasetStore(tmp_path / "out" / "pancreas")
    assert store.tissue_ids() == ["E34", "G01", "J02"] and store.tissue_ids("test") == ["J02"]
    for tid, arr in images.items():
        np.testing.assert_array_equal(store.image("imc", tid).read_all(), arr)
        np.testing.assert_array_equal(store.cell_mask(tid, 1.0), tifffile.imread(folder / f"{tid}_mask.tiff"))
    cells = store.cells()
    labels = np.unique(tifffile.imread(folder / "J02_mask.tiff"))
    assert set(cells[cells.tissue_id == "J02"]["cell_id"]) == set(labels[labels > 0].tolist())
    assert store.embedding_ids() == ["P01732", "P68431"]  # the two with an ESM-2 file in imc_example
    assert "CD99 (P14209)" in next(w for w in res.warnings if "embedding" in w)
    stats = store.standardization("imc", 1.0)
    assert list(stats.upper_quantiles.index) == ["E34", "G01", "J02"]
    # pooled over the three tissues' masks, after clip + log1p
    pooled = np.concatenate([
        np.log1p(np.clip(images[t][0], 0, np.float32(stats.upper_quantiles.loc[t, "H3"])))[store.tissue_mask(t, 1.0)]
        for t in images]).astype(np.float64)
    assert stats.means["H3"] == pytest.approx(pooled.mean(), rel=1e-5)
    assert stats.stds["H3"] == pytest.approx(pooled.std(), rel=1e-5)
    assert not [p for p in store.validate() if p.severity == "error"]


# --------------------------------------------------------------------------- panels, duplicates, overwrite


def test_panel_order_subset_and_extension(tmp_path):
    out = tmp_path / "out"
    names = ["DAPI", "CD3", "CD20"]
    a = _tissue_image(3, 64, 64, seed=1)
    ingest(_write_ome(tmp_path / "a.ome.tif", a, names), "codex", "d", "a", out)
    b = _tissue_image(3, 64, 64, seed=2)  # same panel, other order: stored in panel order
    csv = _channels_csv(tmp_path / "ids.csv", {"CD3": "P07766"})
    ingest(_write_ome(tmp_path / "b.ome.tif", b[[2, 0, 1]], ["CD20", "DAPI", "CD3"]), "codex", "d", "b", out, channels=csv)
    store = DatasetStore(out / "d")
    np.testing.assert_array_equal(store.image("codex", "b").read_all(), b)
    assert store.channels("codex").set_index("channel_name").loc["CD3", "uniprot_id"] == "P07766"  # id filled in
    c = _tissue_image(2, 64, 64, seed=3)  # subset: CD20 missing -> zero channel, marked unmeasured
    res = ingest(_write_ome(tmp_path / "c.ome.tif", c, ["DAPI", "CD3"]), "codex", "d", "c", out)
    assert any("CD20" in w and "unmeasured" in w for w in res.warnings)
    store = DatasetStore(out / "d")
    got = store.image("codex", "c").read_all()
    np.testing.assert_array_equal(got[:2], c)
    assert not got[2].any()
    cpt = store.channels_per_tissue("codex")
    assert bool(cpt.loc["a", "CD20"]) and not bool(cpt.loc["c", "CD20"])
    assert np.isnan(store.standardization("codex", 0.5).upper_quantiles.loc["c", "CD20"])
    d = _tissue_image(4, 64, 64, seed=4)
    src = _write_ome(tmp_path / "d.ome.tif", d, names + ["CD68"])
    with pytest.raises(IngestError, match=r"d\.ome\.tif: channels: 1 channels not in the dataset's codex panel: CD68"):
        ingest(src, "codex", "d", "d", out)
    ingest(src, "codex", "d", "d", out, extend_panel=True)
    store = DatasetStore(out / "d")
    assert list(store.channels("codex")["channel_name"]) == names + ["CD68"]
    assert store.image("codex", "a").shape == (4, 64, 64) and not store.image("codex", "a").read_all()[3].any()
    np.testing.assert_array_equal(store.image("codex", "a").read_all()[:3], a)
    assert not bool(store.channels_per_tissue("codex").loc["a", "CD68"])
    assert not [p for p in store.validate() if p.severity == "error"]


def test_duplicate_tissue_is_refused_and_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    names = ["DAPI", "CD3"]
    first = _write_ome(tmp_path / "a.ome.tif", _tissue_image(2, 64, 64, seed=1), names)
    ingest(first, "codex", "d", "t1", out)
    before = {p: p.stat().st_mtime_ns for p in (out / "d").rglob("*") if p.is_file()}
    second_arr = _tissue_image(2, 64, 64, seed=9)
    second = _write_ome(tmp_path / "b.ome.tif", second_arr, names)
    with pytest.raises(IngestError, match=r"b\.ome\.tif: tissue id: 't1' already has a codex image.*--overwrite"):
        ingest(second, "codex", "d", "t1", out)
    after = {p: p.stat().st_mtime_ns for p in (out / "d").rglob("*") if p.is_file()}
    assert after == before  # nothing written
    ingest(second, "codex", "d", "t1", out, overwrite=True, split="test")
    store = DatasetStore(out / "d")
    np.testing.assert_array_equal(store.image("codex", "t1").read_all(), second_arr)
    assert store.tissues()["split"].tolist() == ["test"]
    # an H&E of the same tissue is a new modality of a co-stained sample, not a duplicate, but it
    # must share the CODEX pixel grid at that resolution
    he_big = tmp_path / "he_big.tif"
    tifffile.imwrite(he_big, _he_rgb(80, 64), photometric="rgb")
    with pytest.raises(IngestError, match=r"he_big\.tif: shape: .*share a pixel grid"):
        ingest(he_big, "he", "d", "t1", out, resolution=0.5)
    he = tmp_path / "he.tif"
    tifffile.imwrite(he, _he_rgb(64, 64), photometric="rgb")
    mask_before = DatasetStore(out / "d").tissue_mask("t1", 0.5)
    ingest(he, "he", "d", "t1", out, resolution=0.5)
    store = DatasetStore(out / "d")
    assert store.tissue_ids() == ["t1"] and store.image("he", "t1").shape == (3, 64, 64)
    np.testing.assert_array_equal(store.tissue_mask("t1", 0.5), mask_before)  # the CODEX mask is kept


def test_tissue_and_cell_tables(tmp_path):
    out = tmp_path / "out"
    arr = _tissue_image(2, 50, 40)
    src = _write_ome(tmp_path / "a.ome.tif", arr, ["DAPI", "CD3"])
    cmask = np.zeros((50, 40), np.uint16)
    cmask[5:10, 5:10], cmask[20:30, 20:30] = 3, 8
    cpath = tmp_path / "cells.tif"
    tifffile.imwrite(cpath, cmask)
    tissues = tmp_path / "tissues.csv"
    pd.DataFrame({"tissue_id": ["a", "b"], "patient_id": ["P1", "P2"], "split": ["val", "train"], "grade": [2, 3]}).to_csv(tissues, index=False)
    cells = tmp_path / "cells.csv"
    pd.DataFrame({"cell_id": [3, 8], "cell_type": ["T cell", "Tumor"]}).to_csv(cells, index=False)
    ingest(src, "codex", "d", "a", out, cell_mask=cpath, tissues_csv=tissues, cells_csv=cells)
    store = DatasetStore(out / "d")
    row = store.tissues().iloc[0]
    assert (row["patient_id"], row["split"], row["grade"]) == ("P1", "val", 2)
    assert store.cells()[["tissue_id", "cell_id", "cell_type"]].values.tolist() == [["a", 3, "T cell"], ["a", 8, "Tumor"]]
    bad_cells = tmp_path / "bad_cells.csv"
    pd.DataFrame({"cell_id": [3, 99]}).to_csv(bad_cells, index=False)
    with pytest.raises(IngestError, match=r"bad_cells\.csv: cell_id: 1 cell ids not in the cell mask"):
        ingest(src, "codex", "d", "b", out, cell_mask=cpath, cells_csv=bad_cells)


# --------------------------------------------------------------------------- bad inputs


def _bad_cases(tmp: Path) -> dict[str, tuple[dict, str, str]]:
    """name -> (ingest kwargs, file expected in the message, field/problem regex)."""
    cases: dict[str, tuple[dict, str, str]] = {}
    five = _channels_csv(tmp / "five.csv", {n: None for n in ["H3", "CD99", "PIN", "CD8a", "CDH"]})
    yxc = tmp / "yxc.tif"
    tifffile.imwrite(yxc, np.moveaxis(_tissue_image(5, 60, 48, np.float32), 0, -1))
    cases["channels_last"] = (dict(image=yxc, modality="imc", channels=five), "yxc.tif", "dimension order: .*channels-last")
    cyx = tmp / "cyx.tif"
    tifffile.imwrite(cyx, _tissue_image(5, 60, 48, np.float32))
    four = _channels_csv(tmp / "four.csv", {n: None for n in ["H3", "CD99", "PIN", "CD8a"]})
    cases["count"] = (dict(image=cyx, modality="imc", channels=four), "cyx.tif", "channels: image has 5 channels .* lists 4")
    cases["no_names"] = (dict(image=cyx, modality="imc"), "cyx.tif", "channel names: .*--channels")
    rgba = tmp / "rgba.tif"
    tifffile.imwrite(rgba, np.dstack([_he_rgb(40, 40), np.full((40, 40), 255, np.uint8)]), photometric="rgb")
    cases["rgba"] = (dict(image=rgba, modality="he"), "rgba.tif", "channels: .*RGBA.*alpha")
    he16 = tmp / "he16.tif"
    tifffile.imwrite(he16, _he_rgb(40, 40).astype(np.uint16) * 257, photometric="rgb")
    cases["he_16bit"] = (dict(image=he16, modality="he"), "he16.tif", "dtype: H&E must be 8-bit.*16-bit")
    good = _write_ome(tmp / "good.ome.tif", _tissue_image(2, 60, 48), ["DAPI", "CD3"])
    small_mask = tmp / "mask.tif"
    tifffile.imwrite(small_mask, np.ones((59, 48), np.uint8))
    cases["mask_shape"] = (dict(image=good, modality="codex", mask=small_mask), "mask.tif", r"shape: mask shape \(59, 48\) disagrees")
    cases["cell_mask_shape"] = (dict(image=good, modality="codex", cell_mask=small_mask), "mask.tif", "shape: .*disagrees")
    float_cells = tmp / "float_cells.tif"
    tifffile.imwrite(float_cells, np.full((60, 48), 1.5, np.float32))
    cases["cell_mask_float"] = (dict(image=good, modality="codex", cell_mask=float_cells), "float_cells.tif", "dtype: .*non-integer")
    nan_img = _tissue_image(2, 60, 48, np.float32)
    nan_img[1, 3, 4] = np.nan
    nan_img[0, 5, 5] = np.inf
    nanf = _write_ome(tmp / "nan.ome.tif", nan_img, ["DAPI", "CD3"])
    cases["nan"] = (dict(image=nanf, modality="codex"), "nan.ome.tif", "pixels: 2 NaN/inf pixels")
    dup = _write_ome(tmp / "dup.ome.tif", _tissue_image(2, 60, 48), ["CD3", "CD3"])
    cases["duplicate_names"] = (dict(image=dup, modality="codex"), "dup.ome.tif", "Channel Name: duplicate channel names")
    blank = tmp / "blank.csv"
    blank.write_text("channel_name,uniprot_id\nH3,P68431\n,\nPIN,P01308\nCD8a,\nCDH,\n")
    cases["empty_name"] = (dict(image=cyx, modality="imc", channels=blank), "blank.csv", "channel_name: empty channel name")
    return cases


CASES = ["channels_last", "count", "no_names", "rgba", "he_16bit", "mask_shape", "cell_mask_shape", "cell_mask_float",
         "nan", "duplicate_names", "empty_name"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_ingest_error(tmp_path, case):
    kwargs, file, pattern = _bad_cases(tmp_path)[case]
    with pytest.raises(IngestError) as info:
        ingest(dataset="d", tissue_id="t", out=tmp_path / "out", **kwargs)
    msg = str(info.value)
    assert file in msg and "fix:" in msg
    assert re.search(pattern, msg), msg
    assert not (tmp_path / "out" / "d").exists()  # nothing half-written
    assert not list(tmp_path.glob("out/.d.tmp-*"))


def test_cli_error_is_one_line_exit_2(tmp_path):
    cyx = tmp_path / "cyx.tif"
    tifffile.imwrite(cyx, _tissue_image(5, 30, 30, np.float32))
    four = _channels_csv(tmp_path / "four.csv", {n: None for n in ["H3", "CD99", "PIN", "CD8a"]})
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.data_ingest", "--image", str(cyx), "--modality", "imc", "--dataset", "d",
         "--tissue-id", "t", "--out", str(tmp_path / "out"), "--channels", str(four)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cyx.tif: channels:" in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- registration


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def _render_he(nuclear: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Beer–Lambert H&E from a nuclear density and an eosin density."""
    od = (nuclear / nuclear.max() * 1.5)[..., None] * np.array([0.65, 0.70, 0.29]) + eosin[..., None] * np.array([0.07, 0.99, 0.11])
    return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)


def _synthetic_nuclei(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    img[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = rng.uniform(0.5, 1.5, n)
    return ndimage.gaussian_filter(img, 2.5) * 40


def _check_recovery(nuclear: np.ndarray, eosin: np.ndarray, truth: np.ndarray, seed: int = 0):
    he = _render_he(nuclear, eosin)
    h, w = nuclear.shape
    dapi = warp_to(nuclear, truth, (h, w))
    dapi = dapi + np.random.default_rng(seed).normal(0, 0.02 * dapi.max(), dapi.shape).astype(np.float32)
    reg = register_he_to_dapi(he, dapi)
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float).T
    corner_err = float(np.abs(reg.transform @ corners - truth @ corners).max())
    angle_err = abs(reg.rotation_deg - math.degrees(math.atan2(truth[1, 0], truth[0, 0])))
    print(f"registration: {reg.signal} {reg.n_inliers}/{reg.n_matches} inliers, residual {reg.residual_px:.3f} px, "
          f"angle error {angle_err:.4f} deg, scale {reg.scale:.4f}, corner error {corner_err:.3f} px")
    assert reg.residual_px < 1.0
    assert angle_err < 0.5
    assert corner_err < 1.0
    assert reg.n_inliers >= 50
    return reg


def test_registration_recovers_known_similarity_synthetic():
    nuclear = _synthetic_nuclei((512, 512), 900, seed=0)
    eosin = ndimage.gaussian_filter(np.random.default_rng(1).random((512, 512)), 6).astype(np.float32) * 2
    _check_recovery(nuclear, eosin, _similarity(7.0, 0.92, 30.0, -12.0))


def test_registration_recovers_known_similarity_real_mibi_texture():
    folder = shared_data("mibi_dcis") / "Point2203_pt1072_31606"
    dna = ndimage.gaussian_filter(tifffile.imread(folder / "HH3.tif").astype(np.float32)[:640, :640], 1.0)
    vim = ndimage.gaussian_filter(tifffile.imread(folder / "VIM.tif").astype(np.float32)[:640, :640], 2.0)
    _check_recovery(dna, vim / max(vim.max(), 1) + 0.3, _similarity(-12.0, 1.07, -40.0, 55.0))


def test_ingest_registers_he_to_codex_dapi(tmp_path):
    out = tmp_path / "out"
    nuclear = _synthetic_nuclei((400, 400), 700, seed=5)
    truth = _similarity(4.0, 1.0, 15.0, -9.0)
    dapi = warp_to(nuclear, truth, (400, 400))
    codex = np.stack([dapi, _tissue_image(1, 400, 400, np.float32)[0]])
    ingest(_write_ome(tmp_path / "codex.ome.tif", codex, ["DAPI", "CD3"], mpp=0.5), "codex", "d", "s1", out)
    he_path = tmp_path / "he.tif"
    eosin = ndimage.gaussian_filter(np.random.default_rng(6).random((400, 400)), 6).astype(np.float32) * 2
    tifffile.imwrite(he_path, _render_he(nuclear, eosin), photometric="rgb")
    res = ingest(he_path, "he", "d", "s1", out, register_to_dapi="s1")
    assert res.registration.residual_px < 1.0 and abs(res.registration.rotation_deg - 4.0) < 0.5
    he = DatasetStore(out / "d").image("he", "s1")
    assert he.shape == (3, 400, 400) and he.mpp == 0.5  # stored in the CODEX pixel grid
    inv_grey = 255.0 - he.read_all().astype(np.float32).mean(0)
    inner = (slice(40, 360), slice(40, 360))
    assert np.corrcoef(inv_grey[inner].ravel(), dapi[inner].ravel())[0, 1] > 0.8


@pytest.mark.parametrize("encoding, sep", [("utf-8", ","), ("utf-8-sig", ";"), ("utf-16", "\t"), ("cp1252", "|")])
def test_tables_from_other_tools_are_read_as_meant(tmp_path, encoding, sep):
    """Excel/R/LIMS exports: separators, BOMs, UTF-16, Latin-1, TRUE/yes booleans, 'Train'/'validation' splits."""
    image = _write_ome(tmp_path / "m.ome.tif", _tissue_image(3, 64, 64), ["DAPI", "CD45", "PanCK"])
    rows = [["channel_name", "uniprot_id", "is_nuclear_marker", "qc_pass"],
            ["DAPI", "", "TRUE", "yes"], ["CD45", "P08575", "FALSE", "no"], ["PanCK", "P05787", "0", "1"]]
    (tmp_path / "c.csv").write_bytes("\n".join(sep.join(r) for r in rows).encode(encoding))
    clinical = [["tissue_id", "split", "site"], ["t0", "Validation", "Zürich"], ["t1", "Train", "Genève"]]
    (tmp_path / "clinical.csv").write_bytes("\n".join(sep.join(r) for r in clinical).encode(encoding))
    ingest(image, "imc", "ds", "t0", tmp_path / "out", channels=tmp_path / "c.csv", tissues_csv=tmp_path / "clinical.csv")
    store = DatasetStore(tmp_path / "out" / "ds")
    channels = store.channels("imc")
    assert channels["is_nuclear_marker"].tolist() == [True, False, False]
    assert channels["qc_pass"].tolist() == [True, False, True]
    assert channels["uniprot_id"].tolist()[1:] == ["P08575", "P05787"]
    row = store.tissues().iloc[0]
    assert row["split"] == "val" and row["site"] == "Zürich"
    assert store.tissue_ids("validation") == ["t0"]


def test_split_spellings_in_a_foreign_tissues_table(tmp_path):
    """A tissues.parquet written by another tool with 'Train'/'Test' labels is read with the canonical splits."""
    image = _write_ome(tmp_path / "m.ome.tif", _tissue_image(3, 64, 64), ["DAPI", "CD45", "PanCK"])
    for i, split in enumerate(["Train", "TESTING", " val "]):
        ingest(image, "imc", "ds", f"t{i}", tmp_path / "out", split="train")
    path = tmp_path / "out" / "ds" / "metadata" / "tissues.parquet"
    table = pd.read_parquet(path)
    table["split"] = ["Train", "TESTING", " val "]
    table.to_parquet(path)
    store = DatasetStore(tmp_path / "out" / "ds")
    assert (store.tissue_ids("train"), store.tissue_ids("test"), store.tissue_ids("val")) == (["t0"], ["t1"], ["t2"])
