"""Pyramids for viewers: NGFF multiscales in OME-Zarr and SubIFD levels in OME-TIFF, checked by real readers."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import tifffile

from datamodules.ome_zarr import write_ome_zarr
from datamodules.pyramids import level_count, ngff_level_paths, write_ngff_pyramid, write_pyramidal_ome_tiff
from datamodules.slide_readers import block_mean, open_slide


def _expected_levels(img: np.ndarray, n: int) -> list[np.ndarray]:
    levels = [img]
    for _ in range(n - 1):
        levels.append(block_mean(levels[-1], 2))
    return levels


def test_level_count_halves_to_the_top_side():
    assert level_count(512, 300) == 1
    assert level_count(1100, 1300, 256) == 4  # 1300 -> 650 -> 325 -> 163
    assert level_count(100_000, 100_000) == 9


def test_block_mean_is_an_area_average_with_edge_padding():
    a = np.array([[[1, 3, 10], [5, 7, 20]]], dtype=np.uint8)
    np.testing.assert_array_equal(block_mean(a, 2), [[[4, 15]]])
    f = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_allclose(block_mean(f, 2), [[[2.5, 4.5], [8.5, 10.5]]])


def test_ngff_pyramid_levels_and_metadata_read_by_ome_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    rng = np.random.default_rng(0)
    img = rng.random((3, 1100, 700), dtype=np.float32)
    path = tmp_path / "t.ome.zarr"
    write_ome_zarr(fsspec.filesystem("file"), str(path), img, 0.8, ["a", "b", "c"])
    shapes = write_ngff_pyramid(path, min_top_side=256)
    assert shapes == [(3, 1100, 700), (3, 550, 350), (3, 275, 175), (3, 138, 88)]
    assert ngff_level_paths(path) == ["0", "1", "2", "3"]
    node = list(Reader(parse_url(str(path)))())[0]
    assert [tuple(d.shape) for d in node.data] == shapes
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[1.0, 0.8, 0.8], [1.0, 1.6, 1.6], [1.0, 3.2, 3.2], [1.0, 6.4, 6.4]]
    for got, want in zip(node.data, _expected_levels(img, 4)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # the store's reader still sees level 0 and its channel names
    from datamodules.ome_zarr import ImageArray

    image = ImageArray(fsspec.filesystem("file"), str(path), 0.8)
    assert image.channel_names == ["a", "b", "c"] and image.shape == (3, 1100, 700)


def test_pyramidal_ome_tiff_multichannel(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 4000, (5, 1100, 1300)).astype(np.uint16)
    path = tmp_path / "p.ome.tif"
    shapes = write_pyramidal_ome_tiff(img, path, 0.5, [f"m{i}" for i in range(5)], tile=256, min_top_side=256)
    assert len(shapes) == 4 and shapes[1] == (5, 550, 650)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff
        series = tif.series[0]
        assert len(series.levels) == 4 and series.axes == "CYX"
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and len(page.subifds) == 3
        assert 'Name="m3"' in tif.ome_metadata and 'PhysicalSizeX="0.5"' in tif.ome_metadata
        for level, want in zip(series.levels, _expected_levels(img, 4)):
            np.testing.assert_array_equal(level.asarray(), want)
    with open_slide(path) as r:  # our reader sees the levels, names and pixel size
        assert r.level_count == 4 and r.mpp == pytest.approx(0.5) and r.channel_names[3] == "m3"


def test_pyramidal_ome_tiff_rgb_opens_in_openslide(tmp_path):
    import openslide

    rgb = np.random.default_rng(2).integers(0, 255, (3, 700, 900), dtype=np.uint8)
    path = tmp_path / "he.ome.tif"
    write_pyramidal_ome_tiff(rgb, path, 0.25, ["R", "G", "B"], tile=256, min_top_side=256)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].photometric == 2 and len(tif.series[0].levels) == 3
    slide = openslide.OpenSlide(str(path))  # generic-tiff: reads the full-resolution pages, with the mpp from the tags
    assert slide.dimensions == (900, 700)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    region = np.asarray(slide.read_region((0, 0), 0, (900, 700)))[..., :3].transpose(2, 0, 1)
    np.testing.assert_array_equal(region, rgb)
    slide.close()


def test_writer_leaves_no_partial_file_on_failure(tmp_path):
    class Broken:
        shape, dtype = (2, 600, 600), np.dtype(np.uint16)

        def read(self, y, x, h, w, channels=None):
            if y > 300:
                raise OSError("disk gone")
            return np.zeros((len(channels) if channels else 2, h, w), np.uint16)

    with pytest.raises(OSError, match="disk gone"):
        write_pyramidal_ome_tiff(Broken(), tmp_path / "x.ome.tif", 1.0, ["a", "b"], tile=256, min_top_side=256)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
