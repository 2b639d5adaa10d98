"""Whole-slide files through ``python -m experiments.rosie_predict``: an Aperio .svs (OpenSlide) and a
pyramidal OME-TIFF H&E predict end to end, the output OME-Zarr carries NGFF multiscales levels, the
``--ome-tiff`` copy is a tiled pyramid with channel names and pixel size, and level 0 equals the
prediction of the same pixels given as a plain TIFF (so the pyramids change nothing that readers of
the prediction folder see).

Sizes: a 160×192 px H&E at stride 8 gives a 20×24 px output; ``--pyramid-min-side 8`` makes its
pyramid 24 → 12 → 6 px (3 levels) — the default rule (halve until the longer side is ≤ 512 px)
gives slides larger than 512 output px (4096 H&E px at stride 8) at least two levels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from benchmarks.slide_readers import he_like, write_aperio_svs
from datamodules.pyramids import ngff_level_paths, write_pyramidal_ome_tiff
from datamodules.slide_readers import block_mean, open_slide
from datamodules.store import DatasetStore
from experiments.rosie_predict import main
from lightning_modules import rosie_inference as ri
from tests.conftest import rosie_checkpoint

MARKERS = ["CD3", "CD20", "PanCK"]
H, W, MPP = 160, 192, 0.25


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    rgb = he_like(H, W, seed=7)
    svs = write_aperio_svs(folder / "case1.svs", H, W, mpp=MPP, read=lambda y, x, h, w: rgb[y : y + h, x : x + w],
                           compression="zlib")
    ome = folder / "case2.ome.tif"
    write_pyramidal_ome_tiff(rgb.transpose(2, 0, 1), ome, MPP, ["R", "G", "B"], tile=32, min_top_side=32)
    plain = folder / "plain.tif"
    tifffile.imwrite(plain, rgb, photometric="rgb")  # no pixel size, one level
    ckpt = rosie_checkpoint(folder / "m.ckpt", MARKERS, input_center_crop=32)
    return {"svs": svs, "ome": ome, "plain": plain, "ckpt": ckpt, "rgb": rgb, "folder": folder}


def _predict(slides, he, out, *extra: str) -> dict:
    rc = main(["--ckpt", str(slides["ckpt"]), "--he", str(he), "--out", str(out), "--tissue-id", "t", "--device", "cpu",
               "--no-progress", "--batch-size", "256", "--ome-tiff", "--pyramid-min-side", "8", *extra])
    assert rc == 0
    return json.loads((out / "qc.json").read_text())["tissues"]["t"]


def test_pyramid_inputs_are_opened_as_slides(slides):
    with open_slide(slides["svs"]) as r:
        assert r.backend == "openslide" and r.level_count == 2 and r.mpp == pytest.approx(MPP)
    image, mpp = ri.open_he_image(slides["ome"])
    assert image.backend == "tifffile" and image.level_count == 4 and mpp == pytest.approx(MPP)
    np.testing.assert_array_equal(image.read(10, 20, 30, 40), slides["rgb"][10:40, 20:60].transpose(2, 0, 1))
    image.close()


def test_foreground_thumbnail_comes_from_a_reduced_level(slides):
    """A slide's Otsu thumbnail is read from its pyramid, never from full resolution when a level fits."""
    image, _ = ri.open_he_image(slides["svs"])
    levels: list[int] = []
    read_level = image.read_level
    image.read_level = lambda level, *a, **k: levels.append(level) or read_level(level, *a, **k)  # type: ignore[method-assign]
    fg = ri.foreground_grid(image, 8, "otsu", thumbnail_max_px=40)  # 192 / 40 = 4.8: level 1 (4×), then 2× block means
    assert set(levels) == {1} and fg.shape == (20, 24) and 0 < fg.sum() < fg.size
    image.close()


@pytest.mark.parametrize("kind", ["svs", "ome"])
def test_slide_predicts_end_to_end_with_pyramids(slides, tmp_path, kind):
    entry = _predict(slides, slides[kind], tmp_path / "out")
    assert entry["he_shape"] == [H, W] and entry["he_mpp"] == pytest.approx(MPP) and entry["output_mpp"] == pytest.approx(2.0)
    assert entry["ome_tiff_levels"] == 3

    # NGFF multiscales: 3 datasets, scale doubling per level, level k = 2× block means of level k-1
    path = tmp_path / "out" / entry["image"]
    assert ngff_level_paths(path) == ["0", "1", "2"]
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    ms = (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[1.0, 2.0, 2.0], [1.0, 4.0, 4.0], [1.0, 8.0, 8.0]]
    level0 = np.asarray(group["0"][:])
    assert [tuple(group[p].shape) for p in ("0", "1", "2")] == [(3, 20, 24), (3, 10, 12), (3, 5, 6)]
    np.testing.assert_allclose(group["1"][:], block_mean(level0, 2), rtol=1e-6)

    # the prediction folder still reads as one resolution whose image is level 0
    store = DatasetStore(tmp_path / "out")
    assert store.resolutions("codex") == [2.0] and store.image_ids("codex") == ["t"]
    assert [p for p in store.validate() if p.severity == "error"] == []
    np.testing.assert_array_equal(store.image("codex", "t").read_all(), level0)

    # the OME-TIFF: tiled pyramid (SubIFDs), channel names, pixel size, provenance; level 0 = the Zarr image
    with tifffile.TiffFile(tmp_path / "out" / "t.ome.tif") as tif:
        series = tif.series[0]
        assert tif.is_ome and series.axes == "CYX" and len(series.levels) == 3 and tif.pages[0].is_tiled
        xml = tif.ome_metadata
        assert all(f'Name="{m}"' in xml for m in MARKERS) and 'PhysicalSizeX="2.0"' in xml
        assert entry["checkpoint_sha256"] in xml
        np.testing.assert_array_equal(series.levels[0].asarray(), level0)
        np.testing.assert_allclose(series.levels[1].asarray(), block_mean(level0, 2), rtol=1e-6)

    # the same pixels as a plain TIFF (one level, --mpp) predict the same level 0
    plain = _predict(slides, slides["plain"], tmp_path / "plain", "--mpp", str(MPP))
    np.testing.assert_array_equal(DatasetStore(tmp_path / "plain").image("codex", "t").read_all(), level0)
    assert plain["foreground_blocks"] == entry["foreground_blocks"] and 0 < entry["foreground_blocks"] < 20 * 24


def test_default_rule_keeps_one_valid_level_for_small_outputs(slides, tmp_path):
    """Without --pyramid-min-side a 24-px output is below 512 px: one level, still valid NGFF multiscales."""
    rc = main(["--ckpt", str(slides["ckpt"]), "--he", str(slides["svs"]), "--out", str(tmp_path / "o"), "--tissue-id", "t",
               "--device", "cpu", "--no-progress", "--ome-tiff", "--foreground", "all"])
    assert rc == 0
    entry = json.loads((tmp_path / "o" / "qc.json").read_text())["tissues"]["t"]
    assert ngff_level_paths(tmp_path / "o" / entry["image"]) == ["0"] and entry["ome_tiff_levels"] == 1
    with tifffile.TiffFile(tmp_path / "o" / "t.ome.tif") as tif:
        assert len(tif.series[0].levels) == 1 and tif.series[0].shape == (3, 20, 24)
    assert main(["--ckpt", str(slides["ckpt"]), "--he", str(slides["svs"]), "--out", str(tmp_path / "p"),
                 "--pyramid-min-side", "2"]) == 2
