"""Streaming ingest: a slide enters the layout shard by shard and ends up as the in-memory ingest would write it."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from benchmarks.slide_readers import write_aperio_svs
from benchmarks.streaming_ingest import SyntheticPlex, measure, write_plex
from datamodules.ingest import IngestError, ingest
from datamodules.ingest_streaming import should_stream
from datamodules.registration import warp_to
from datamodules.store import DatasetStore


def _plex(c: int, h: int, w: int, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    tissue = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.4 * min(h, w)) ** 2
    img = rng.gamma(0.8, 5.0, size=(c, h, w))
    img[:, tissue] += rng.gamma(2.0, 300.0, size=(c, int(tissue.sum())))
    return img.astype(dtype)


def _ome(path, arr, names, mpp=0.5, tile=(256, 256)):
    tifffile.imwrite(path, arr, ome=True, tile=tile, compression="zlib",
                     metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
    return path


def test_streamed_equals_in_memory_ingest(tmp_path):
    """Multi-shard image (crosses the 1024 px shard edges): same pixels, mask, channels and statistics."""
    arr = _plex(3, 1300, 1100)
    src = _ome(tmp_path / "a.ome.tif", arr, ["DAPI", "CD3", "CD20"])
    assert not should_stream(src, None) and should_stream(src, True)
    stores = []
    for stream in (False, True):
        res = ingest(src, "codex", f"d{int(stream)}", "s1", tmp_path / "out", split="train", stream=stream)
        assert res.shape == (3, 1300, 1100) and res.mpp == 0.5
        stores.append(DatasetStore(tmp_path / "out" / f"d{int(stream)}"))
    mem, streamed = stores
    np.testing.assert_array_equal(streamed.image("codex", "s1").read_all(), arr)
    assert streamed.image("codex", "s1").channel_names == ["DAPI", "CD3", "CD20"]
    m0, m1 = mem.tissue_mask("s1", 0.5), streamed.tissue_mask("s1", 0.5)
    assert m1.shape == (1300, 1100) and (m0 == m1).mean() > 0.98  # Otsu of a thumbnail vs of the full image
    s0, s1 = mem.standardization("codex", 0.5), streamed.standardization("codex", 0.5)
    np.testing.assert_allclose(s1.means.to_numpy(float), s0.means.to_numpy(float), rtol=0.02)


def test_streamed_ingest_refuses_nan_and_leaves_no_dataset(tmp_path):
    arr = _plex(2, 1100, 1200, dtype=np.float32)
    arr[1, 1090, 1150] = np.nan  # in the last shard row: found on the way, after other shards were written
    src = _ome(tmp_path / "nan.ome.tif", arr, ["DAPI", "CD3"])
    with pytest.raises(IngestError, match=r"NaN/inf pixels .*channels \[1\]"):  # seen by the tissue mask's overview
        ingest(src, "codex", "d", "s1", tmp_path / "out", stream=True)
    mask = _mask(tmp_path, (1100, 1200))  # with a given mask no overview is made: found while copying, mid-write
    with pytest.raises(IngestError, match=r"NaN/inf pixels in the region y=1024 x=1024 .*channels \[1\]"):
        ingest(src, "codex", "d", "s1", tmp_path / "out", stream=True, mask=mask)
    assert not (tmp_path / "out" / "d").exists()
    assert not [p.name for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_streamed_ingest_into_existing_panel_reorders_and_checks(tmp_path):
    out = tmp_path / "out"
    ingest(_ome(tmp_path / "a.ome.tif", _plex(3, 300, 300), ["DAPI", "CD3", "CD20"]), "codex", "d", "s1", out)
    b = _plex(2, 300, 400, seed=1)
    ingest(_ome(tmp_path / "b.ome.tif", b, ["CD20", "DAPI"]), "codex", "d", "s2", out, stream=True)
    img = DatasetStore(out / "d").image("codex", "s2")
    got = img.read_all()
    np.testing.assert_array_equal(got[0], b[1])
    np.testing.assert_array_equal(got[2], b[0])
    assert not got[1].any()  # CD3 not measured: zero
    with pytest.raises(IngestError, match="image has 2 channels .* lists 3"):
        tifffile.imwrite(tmp_path / "plain.tif", b, tile=(128, 128), metadata={"axes": "CYX"})  # no names: the table's
        ingest(tmp_path / "plain.tif", "codex", "d", "s3", out, stream=True, channels=_csv(tmp_path))
    with pytest.raises(IngestError, match="mask shape"):
        ingest(tmp_path / "b.ome.tif", "codex", "d", "s4", out, stream=True, mask=_mask(tmp_path, (10, 10)))


def _csv(tmp_path):
    import pandas as pd

    p = tmp_path / "ch.csv"
    pd.DataFrame({"channel_name": ["A", "B", "C"], "uniprot_id": [None] * 3}).to_csv(p, index=False)
    return p


def _mask(tmp_path, shape):
    p = tmp_path / "m.npy"
    np.save(p, np.ones(shape, bool))
    return p


def test_svs_ingests_as_he_streamed(tmp_path):
    rgb = np.full((500, 700, 3), 235, np.uint8)
    rgb[100:400, 150:550] = (170, 90, 160)
    svs = write_aperio_svs(tmp_path / "he.svs", 500, 700, mpp=0.25, read=lambda y, x, h, w: rgb[y : y + h, x : x + w],
                           compression="zlib")
    res = ingest(svs, "he", "d", "s1", tmp_path / "out")  # .svs always streams (OpenSlide reads regions)
    assert res.mpp == 0.25 and res.shape == (3, 500, 700)
    store = DatasetStore(tmp_path / "out" / "d")
    np.testing.assert_array_equal(store.image("he", "s1").read_all(), rgb.transpose(2, 0, 1))
    mask = store.tissue_mask("s1", 0.25)
    assert mask[250, 350] and not mask[20, 20]


def test_streamed_he_registration_matches_in_memory(tmp_path):
    from tests.test_ingest import _render_he, _similarity, _synthetic_nuclei

    out = tmp_path / "out"
    nuclear = _synthetic_nuclei((400, 400), 700, seed=5)
    truth = _similarity(4.0, 1.0, 15.0, -9.0)
    dapi = warp_to(nuclear, truth, (400, 400))
    codex = np.stack([dapi, _plex(1, 400, 400, dtype=np.float32)[0]])
    ingest(_ome(tmp_path / "codex.ome.tif", codex, ["DAPI", "CD3"]), "codex", "d", "s1", out)
    eosin = ndimage.gaussian_filter(np.random.default_rng(6).random((400, 400)), 6).astype(np.float32) * 2
    tifffile.imwrite(tmp_path / "he.tif", _render_he(nuclear, eosin), photometric="rgb", tile=(128, 128))
    a = ingest(tmp_path / "he.tif", "he", "d", "s1", out, register_to_dapi="s1", stream=False)
    first = DatasetStore(out / "d").image("he", "s1").read_all()
    b = ingest(tmp_path / "he.tif", "he", "d", "s1", out, register_to_dapi="s1", stream=True, overwrite=True)
    second = DatasetStore(out / "d").image("he", "s1").read_all()
    assert b.registration.residual_px < 1.5 and abs(b.registration.rotation_deg - 4.0) < 0.5
    np.testing.assert_allclose(b.registration.transform, a.registration.transform, atol=0.6)
    inner = (slice(None), slice(40, 360), slice(40, 360))
    assert np.abs(first[inner].astype(int) - second[inner]).mean() < 3


def test_synthetic_plex_generator_is_what_it_writes(tmp_path):
    plex = SyntheticPlex(2, 1100, tissue_fraction=0.5)
    with tifffile.TiffFile(write_plex(tmp_path / "p.ome.tif", plex)) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray()[:, 300:900, 100:1000], plex.crop(300, 100, 600, 900))


@pytest.mark.slow
def test_20k_40_channel_ome_tiff_ingests_under_2gb(tmp_path):
    r = measure(size=20_000, channels=40, workdir=tmp_path)
    print(r)
    assert r["stored_shape"] == [40, 20_000, 20_000]
    assert r["crops_bit_identical"]
    assert r["peak_rss_mb"] < 2048, r
