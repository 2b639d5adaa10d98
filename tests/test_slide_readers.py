"""Lazy slide readers: every backend returns the pixels written, at every level, one region at a time."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from benchmarks.slide_readers import he_like, write_aperio_svs
from datamodules.image_files import DamagedImageError
from datamodules.slide_readers import SlideReadError, block_mean, open_slide


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    rgb = he_like(700, 900, seed=3)
    write_aperio_svs(path, 700, 900, mpp=0.25, read=lambda y, x, h, w: rgb[y : y + h, x : x + w], compression="zlib")
    return path, rgb


def test_svs_is_read_by_openslide_with_levels_and_mpp(svs):
    path, rgb = svs
    import openslide

    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    with open_slide(path) as r:
        assert r.backend == "openslide"
        assert r.shape == (3, 700, 900) and r.dtype == np.uint8 and r.mpp == pytest.approx(0.25)
        assert r.level_shapes == [(700, 900), (175, 225)] and r.level_downsamples == pytest.approx([1.0, 4.0])
        np.testing.assert_array_equal(r.read(123, 456, 77, 99), rgb[123:200, 456:555].transpose(2, 0, 1))
        np.testing.assert_array_equal(r.read_level(1, 10, 20, 5, 6), rgb[::4, ::4][10:15, 20:26].transpose(2, 0, 1))
        with pytest.raises(ValueError, match="outside level 0"):
            r.read(690, 0, 20, 5)


def test_tifffile_backend_reads_the_same_svs(svs):
    path, rgb = svs
    with open_slide(path, backend="tifffile") as r:
        assert r.backend == "tifffile" and r.mpp == pytest.approx(0.25) and r.channel_names == ["R", "G", "B"]
        np.testing.assert_array_equal(r.read(5, 6, 300, 301), rgb[5:305, 6:307].transpose(2, 0, 1))


def test_ome_tiff_multichannel_names_mpp_and_crops(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 60000, (4, 300, 500)).astype(np.uint16)
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, img, tile=(128, 128), ome=True, metadata={"axes": "CYX", "Channel": {"Name": list("ABCD")},
                                                                     "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65})
    with open_slide(path) as r:
        assert r.shape == (4, 300, 500) and r.channel_names == list("ABCD") and r.mpp == pytest.approx(0.65)
        np.testing.assert_array_equal(r.read(17, 33, 100, 200), img[:, 17:117, 33:233])
        np.testing.assert_array_equal(r.read(0, 0, 10, 10, channels=[2]), img[2:3, :10, :10])


def test_generic_tiff_resolution_tags_and_plain_2d(tmp_path):
    plane = np.arange(200 * 300, dtype=np.uint16).reshape(200, 300)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, plane, tile=(64, 64), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(path) as r:
        assert r.shape == (1, 200, 300) and r.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(r.read(50, 60, 7, 8)[0], plane[50:57, 60:68])


def test_png_and_jpeg(tmp_path):
    from PIL import Image

    rgb = he_like(64, 80)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png") as r:
        assert r.backend == "raster" and r.shape == (3, 64, 80)
        np.testing.assert_array_equal(r.read(0, 0, 64, 80), rgb.transpose(2, 0, 1))
    smooth = np.stack(np.broadcast_arrays(*np.ogrid[0:64, 0:80], 100), -1).astype(np.uint8) * 2  # JPEG-friendly
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    with open_slide(tmp_path / "a.jpg") as r:
        assert np.abs(r.read(0, 0, 64, 80).astype(int) - smooth.transpose(2, 0, 1)).max() < 8


def test_thumbnail_uses_a_pyramid_level_and_block_means(svs):
    path, rgb = svs
    with open_slide(path) as r:
        thumb, factor = r.thumbnail(max_side=120)
        assert factor == 8 and thumb.shape == (3, 88, 113)  # level 1 (4×), then 2× block means
        level1 = r.read_level(1, 0, 0, 175, 225)
        np.testing.assert_array_equal(thumb, block_mean(level1, 2))


def test_errors_are_one_line_with_the_file(tmp_path):
    (tmp_path / "x.czi").write_bytes(b"abc")
    with pytest.raises(SlideReadError, match=r"x\.czi: unsupported slide type"):
        open_slide(tmp_path / "x.czi")
    (tmp_path / "bad.svs").write_bytes(b"not a slide at all" * 10)
    with pytest.raises((SlideReadError, DamagedImageError), match=r"bad\.svs"):
        open_slide(tmp_path / "bad.svs")
    with pytest.raises(FileNotFoundError, match="no such slide"):
        open_slide(tmp_path / "missing.tif")
    stack = np.zeros((2, 3, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "zc.tif", stack, metadata={"axes": "ZCYX"})
    with pytest.raises(SlideReadError, match="several non-spatial axes"):
        open_slide(tmp_path / "zc.tif")


def test_svs_and_pyramidal_ome_tiff_predict_end_to_end(tmp_path):
    """The reader is what rosie_predict's H&E input expects: both files predict through predict_to_dataset."""
    from datamodules.pyramids import write_pyramidal_ome_tiff
    from lightning_modules import rosie_inference as ri
    from tests.conftest import rosie_checkpoint

    rgb = he_like(96, 128, seed=5)
    path = write_aperio_svs(tmp_path / "small.svs", 96, 128, mpp=0.25, read=lambda y, x, h, w: rgb[y : y + h, x : x + w],
                            compression="zlib")
    ckpt = rosie_checkpoint(tmp_path / "m.ckpt", ["CD3", "CD20"], input_center_crop=32)
    predictor = ri.PatchPredictor.from_checkpoint(str(ckpt), device="cpu")
    ome = tmp_path / "he.ome.tif"
    with open_slide(path) as r:
        assert r.backend == "openslide"
        write_pyramidal_ome_tiff(r, ome, r.mpp, r.channel_names, tile=32, min_top_side=32)
    opts = ri.PredictOptions(stride=8, batch_size=128, tile_size=64, foreground="all", progress=False)
    results = []
    for i, source in enumerate((path, ome)):
        with open_slide(source) as r:
            entry = ri.predict_to_dataset(r, predictor, tmp_path / f"out{i}", "slide", r.mpp, opts)
        assert entry["output_shape"] == [2, 12, 16] and entry["he_mpp"] == pytest.approx(0.25)
        results.append(ri.open_zarr_image(*ri.fsspec_root(tmp_path / f"out{i}" / entry["image"]))[:])
    assert np.isfinite(results[0]).all() and results[0].std() > 0
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)  # lossless files: the same prediction


@pytest.mark.slow
def test_100k_slide_predicts_at_stride_8_under_2gb(tmp_path):
    from benchmarks.slide_100k import measure

    r = measure(size=100_000, islands=1, radius=2300, workdir=tmp_path)
    print(r)
    assert r["output_shape"] == [50, 12_500, 12_500] and len(r["levels"]) >= 5
    assert r["n_patches"] > 10_000
    assert r["peak_rss_mb"] < 2048, r


def test_synthetic_slide_regions_are_reproducible():
    from benchmarks.slide_100k import SyntheticSlide

    s = SyntheticSlide(size=4000, islands=2, radius=300)
    cy, cx = (int(v) for v in s.centres[0])
    a = s.read(cy - 50, cx - 50, 100, 100)
    np.testing.assert_array_equal(a, s.read(cy - 50, cx - 50, 100, 100))
    assert (a != 242).any()  # tissue at an island centre
    assert (s.read(0, 0, 8, 8) == 242).all()  # glass in the corner (seed 0 puts no island there)
    assert s.level_shapes[3] == (63, 63)
