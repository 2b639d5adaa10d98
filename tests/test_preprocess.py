"""Each VirTues/ROSIE preprocessing step against a direct numpy / scikit-image / torchvision computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur
from torchvision.transforms.functional import normalize as tv_normalize

from datamodules import preprocess as pp
from datamodules import statistics
from datamodules.preprocess import HENormalize, MultiplexPreprocessor, gaussian_blur, otsu_tissue_mask
from datamodules.statistics import (
    compute_and_store_statistics,
    dataset_mean_std,
    load_statistics,
    upper_quantiles,
    upper_quantiles_streaming,
)


def _tv_blur(x: np.ndarray) -> np.ndarray:
    return tv_gaussian_blur(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), [3, 3], [1.0, 1.0]).numpy()


def _image(rng: np.random.Generator, c: int = 4, h: int = 90, w: int = 70) -> np.ndarray:
    img = rng.gamma(0.6, 15.0, size=(c, h, w)).astype(np.float32)
    img[0] = rng.integers(0, 6, size=(h, w))  # heavy ties, like low-count IMC channels
    return img


def _mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.4 * min(h, w)) ** 2


# --------------------------------------------------------------------------- blur


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 5, 37), (1, 128, 128)])
def test_gaussian_blur_equals_torchvision(shape):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 3
    np.testing.assert_allclose(gaussian_blur(x), _tv_blur(x), atol=2e-6, rtol=0)


def test_gaussian_kernel_is_torchvisions():
    k = pp.gaussian_kernel1d(3, 1.0)
    expected = np.exp(-0.5 * np.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(k, expected / expected.sum(), rtol=1e-12)


# --------------------------------------------------------------------------- quantiles


def test_upper_quantiles_equal_numpy_inside_mask():
    rng = np.random.default_rng(2)
    img = _image(rng)
    mask = _mask(*img.shape[1:])
    expected = np.array([np.quantile(img[c][mask], 0.99) for c in range(img.shape[0])])
    np.testing.assert_allclose(upper_quantiles(img, mask), expected, rtol=1e-6)
    # the mask matters: the whole-image quantile differs for the gamma channels
    assert not np.allclose(upper_quantiles(img, None)[1:], expected[1:])


@pytest.mark.parametrize("q", [0.99, 0.5, 0.37, 1.0, 0.0])
def test_streaming_quantiles_equal_numpy(q):
    rng = np.random.default_rng(3)
    img = _image(rng, c=3, h=101, w=57)
    mask = _mask(101, 57)
    expected = np.array([np.quantile(img[c][mask], q) for c in range(3)])
    # tiny bins / collect budget force several refinement passes
    got = upper_quantiles_streaming(img, mask, q=q, block_rows=13, bins=8, max_collect=20)
    np.testing.assert_allclose(got, expected, rtol=2e-6)


def test_streaming_quantiles_uint8_and_empty_mask():
    img = np.random.default_rng(4).integers(0, 256, size=(2, 40, 50)).astype(np.uint8)
    expected = np.quantile(img.reshape(2, -1), 0.99, axis=1)
    np.testing.assert_allclose(upper_quantiles_streaming(img, None, bins=16, max_collect=5), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="empty"):
        upper_quantiles_streaming(img, np.zeros((40, 50), bool))
    with pytest.raises(ValueError, match="shape"):
        upper_quantiles(img, np.ones((41, 50), bool))


# --------------------------------------------------------------------------- dataset mean / std


def test_dataset_mean_std_pooled_over_tissue_pixels():
    rng = np.random.default_rng(5)
    images = [_image(rng, h=60 + 7 * i, w=50 + 3 * i) for i in range(3)]
    masks = [_mask(*im.shape[1:]) for im in images]
    uqs = [upper_quantiles(im, m) for im, m in zip(images, masks)]
    means, stds = dataset_mean_std(zip(images, masks, uqs), block_rows=11)
    for c in range(4):
        pooled = np.concatenate([np.log1p(np.clip(im[c], 0, np.float32(uq[c])))[m] for im, m, uq in zip(images, masks, uqs)])
        assert means[c] == pytest.approx(np.mean(pooled.astype(np.float64)), rel=1e-9)
        assert stds[c] == pytest.approx(np.std(pooled.astype(np.float64)), rel=1e-9)  # population std


def test_dataset_mean_std_with_channel_subsets():
    rng = np.random.default_rng(6)
    a, b = _image(rng, c=3), _image(rng, c=2)
    ma, mb = _mask(*a.shape[1:]), np.ones(b.shape[1:], bool)
    ua, ub = upper_quantiles(a, ma), upper_quantiles(b, mb)
    # b measures dataset channels 2 and 0 (in that order); dataset channel 3 is never measured
    means, stds = dataset_mean_std([(a, ma, ua, [0, 1, 2]), (b, mb, ub, [2, 0])], n_channels=4)
    ch2 = np.concatenate([np.log1p(np.clip(a[2], 0, np.float32(ua[2])))[ma], np.log1p(np.clip(b[0], 0, np.float32(ub[0])))[mb]])
    ch1 = np.log1p(np.clip(a[1], 0, np.float32(ua[1])))[ma]
    assert means[2] == pytest.approx(ch2.astype(np.float64).mean(), rel=1e-9)
    assert stds[1] == pytest.approx(ch1.astype(np.float64).std(), rel=1e-9)
    assert np.isnan(means[3]) and np.isnan(stds[3])


# --------------------------------------------------------------------------- crop preprocessor


def test_preprocessor_equals_direct_pipeline():
    rng = np.random.default_rng(7)
    img = _image(rng)
    mask = _mask(*img.shape[1:])
    uq = upper_quantiles(img, mask)
    means, stds = dataset_mean_std([(img, mask, uq)])
    crop = img[:, 10:42, 5:37]
    direct = np.log1p(np.clip(crop, 0, uq[:, None, None].astype(np.float32)))
    direct = (direct - means[:, None, None].astype(np.float32)) / (stds[:, None, None].astype(np.float32) + np.float32(1e-8))
    direct = _tv_blur(direct)
    out = MultiplexPreprocessor(uq, means, stds)(crop)
    assert out.dtype == np.float32 and out.shape == crop.shape
    np.testing.assert_allclose(out, direct, atol=1e-5)
    # the crop border is blurred with reflect padding of the crop (as official tiles are)
    assert not np.allclose(out[:, 0], MultiplexPreprocessor(uq, means, stds)(img[:, 9:42, 5:37])[:, 1], atol=1e-3)
    # without blur, the inverse recovers the clipped intensities / upper quantile
    pre = MultiplexPreprocessor(uq, means, stds, blur=False)
    back = pre.invert(pre(crop))
    np.testing.assert_allclose(back, np.clip(crop / uq[:, None, None], 0, 1), atol=1e-4)


def test_preprocessor_rejects_bad_stats():
    with pytest.raises(ValueError, match="NaN"):
        MultiplexPreprocessor([1.0, np.nan], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="lengths"):
        MultiplexPreprocessor([1.0], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="crop must be"):
        MultiplexPreprocessor([1.0], [0.0], [1.0])(np.zeros((2, 8, 8)))


# --------------------------------------------------------------------------- tissue masks


def _synthetic_tissue(rng: np.random.Generator, h: int = 120, w: int = 140):
    truth = _mask(h, w)
    img = rng.gamma(0.3, 2.0, size=(3, h, w)).astype(np.float32)
    img[:, truth] += rng.gamma(2.0, 20.0, size=(3, int(truth.sum()))).astype(np.float32)
    hole = np.zeros_like(truth)
    hole[55:62, 65:72] = True  # a lumen inside the tissue: must be filled
    img[:, hole] = 0
    return img, truth


def test_otsu_mask_equals_direct_skimage_computation():
    rng = np.random.default_rng(8)
    img, _ = _synthetic_tissue(rng)
    got = otsu_tissue_mask(img, "imc", smooth_sigma=0, min_object_px=0, min_object_fraction=0)
    grey, darker = pp.tissue_signal(img, "imc")
    assert not darker
    scale = np.quantile(img.reshape(3, -1), 0.99, axis=1)
    np.testing.assert_allclose(grey, np.log1p(img / scale[:, None, None].astype(np.float32)).sum(0), rtol=1e-5)
    expected = ndimage.binary_fill_holes(grey > threshold_otsu(grey))
    np.testing.assert_array_equal(got, expected)


def test_otsu_mask_recovers_tissue_and_fills_holes():
    rng = np.random.default_rng(9)
    img, truth = _synthetic_tissue(rng)
    mask = otsu_tissue_mask(img, "codex")
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert mask[58, 68]  # the lumen is filled
    # H&E: tissue is darker than the glass
    he = np.full((3,) + truth.shape, 235, np.uint8)
    he[0][truth], he[1][truth], he[2][truth] = 150, 80, 160
    he_mask = otsu_tissue_mask(np.moveaxis(he, 0, -1), "he")
    assert ((he_mask & truth).sum() / (he_mask | truth).sum()) > 0.95
    grey = pp.tissue_signal(he, "he")[0]
    np.testing.assert_array_equal(
        otsu_tissue_mask(he, "he", smooth_sigma=0, min_object_px=0, min_object_fraction=0),
        ndimage.binary_fill_holes(grey < threshold_otsu(grey)),
    )


def test_remove_small_components():
    m = np.zeros((20, 20), bool)
    m[1:3, 1:3] = True  # 4 px
    m[10:16, 10:16] = True  # 36 px
    out = pp.remove_small_components(m, 5)
    assert not out[1:3, 1:3].any() and out[10:16, 10:16].all()


# --------------------------------------------------------------------------- H&E normalisation


def test_he_normalize_matches_torchvision_and_inverts():
    rgb = np.random.default_rng(10).integers(0, 256, size=(3, 17, 19)).astype(np.uint8)
    out = HENormalize()(rgb)
    ref = tv_normalize(torch.from_numpy(rgb).float() / 255.0, list(pp.IMAGENET_MEAN), list(pp.IMAGENET_STD)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    t = HENormalize(channels_last=True)(torch.from_numpy(np.moveaxis(rgb, 0, -1).copy()))
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-6)
    np.testing.assert_array_equal(HENormalize().inverse(out, channels_last=False), rgb)
    with pytest.raises(TypeError, match="uint8"):
        HENormalize()(rgb.astype(np.uint16))


# --------------------------------------------------------------------------- statistics in the store


@pytest.fixture()
def small_store(tmp_path: Path):
    from datamodules.store import DatasetWriter

    rng = np.random.default_rng(11)
    names = ["CD3", "CD20", "H3", "Ki67"]
    root = tmp_path / "toy"
    images, masks = {}, {}
    with DatasetWriter.create(root) as w:
        for i, tid in enumerate(["t0", "t1", "t2"]):
            img = _image(rng, c=4, h=70 + 10 * i, w=60)
            mask = _mask(*img.shape[1:])
            if tid == "t2":
                img[3] = 0  # Ki67 not measured in t2 (zero-filled)
            w.write_image("imc", tid, img, 1.0, names)
            if tid != "t1":
                w.write_tissue_mask(tid, 1.0, mask)
            images[tid], masks[tid] = img, mask
        w.write_channels("imc", pd.DataFrame({"channel_name": names, "uniprot_id": ["P07766", "P11836", None, "P46013"],
                                              "is_nuclear_marker": [False, False, True, True], "qc_pass": True}))
        cpt = pd.DataFrame(True, index=pd.Index(["t0", "t1", "t2"], name="tissue_id"), columns=names)
        cpt.loc["t2", "Ki67"] = False
        w.write_channels_per_tissue("imc", cpt)
        w.write_tissues(pd.DataFrame({"tissue_id": ["t0", "t1", "t2"], "patient_id": ["p0", "p1", "p2"], "split": "train"}))
    return root, names, images, masks


def test_statistics_written_and_read_back_through_store(small_store, monkeypatch):
    from datamodules.store import DatasetStore

    root, names, images, masks = small_store
    masks["t1"] = otsu_tissue_mask(images["t1"], "imc")  # no stored mask: Otsu on the fly
    stats = compute_and_store_statistics(str(root), "imc", 1.0)
    again = DatasetStore(root).standardization("imc", 1.0)
    assert again is not None and list(again.upper_quantiles.index) == ["t0", "t1", "t2"]
    pd.testing.assert_frame_equal(again.upper_quantiles, stats.upper_quantiles)
    for tid in ("t0", "t1", "t2"):
        exp = [np.quantile(images[tid][c][masks[tid]], 0.99) for c in range(4)]
        if tid == "t2":
            exp[3] = np.nan
        np.testing.assert_allclose(again.upper_quantiles.loc[tid, names].to_numpy(np.float64), exp, rtol=1e-6)
    for c, name in enumerate(names):
        tids = ["t0", "t1"] if name == "Ki67" else ["t0", "t1", "t2"]
        pooled = np.concatenate([
            np.log1p(np.clip(images[t][c], 0, np.float32(again.upper_quantiles.loc[t, name])))[masks[t]] for t in tids
        ]).astype(np.float64)
        assert again.means[name] == pytest.approx(pooled.mean(), rel=1e-5)
        assert again.stds[name] == pytest.approx(pooled.std(), rel=1e-5)
    # computed once, reused: a second call must not touch the pixels
    monkeypatch.setattr(statistics, "upper_quantiles", lambda *a, **k: pytest.fail("recomputed although stored"))
    reused = compute_and_store_statistics(str(root), "imc", 1.0)
    pd.testing.assert_series_equal(reused.means, again.means)
    pd.testing.assert_frame_equal(load_statistics(str(root), "imc", 1.0).upper_quantiles, again.upper_quantiles)
    with pytest.raises(pytest.fail.Exception):
        compute_and_store_statistics(str(root), "imc", 1.0, force=True)


def test_preprocessor_from_stored_stats_on_store_crop(small_store):
    from datamodules.store import DatasetStore

    root, names, images, masks = small_store
    stats = compute_and_store_statistics(str(root), "imc", 1.0)
    store = DatasetStore(root)
    crop = store.image("imc", "t0", 1.0).read(5, 7, 32, 32, channels=[2, 0])
    pre = MultiplexPreprocessor.from_stats(stats, "t0", ["H3", "CD3"])
    uq = stats.upper_quantiles.loc["t0", ["H3", "CD3"]].to_numpy(np.float32)
    direct = np.log1p(np.clip(images["t0"][[2, 0], 5:37, 7:39], 0, uq[:, None, None]))
    direct = (direct - stats.means[["H3", "CD3"]].to_numpy(np.float32)[:, None, None]) / (
        stats.stds[["H3", "CD3"]].to_numpy(np.float32)[:, None, None] + np.float32(1e-8))
    np.testing.assert_allclose(pre(crop), _tv_blur(direct), atol=1e-5)
