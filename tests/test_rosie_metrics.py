"""ROSIE metrics, QC, baselines, Grad-CAM and figures against references and known inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from lifelines.utils import concordance_index
from torch import nn

from analysis.gradcam import find_last_stage, gradcam, plot_gradcam
from analysis.rosie_baselines import (
    CELL_FEATURES,
    MorphologyBaseline,
    cell_features,
    grid_origins,
    he_expression_baseline,
    patch_morphology_features,
)
from analysis.rosie_figures import (
    SamplePanel,
    composite_rgb,
    plot_per_marker_pearson,
    plot_predicted_vs_measured,
    select_percentile_samples,
)
from analysis.rosie_metrics import (
    SamplePatches,
    background_thresholds,
    c_index_per_marker,
    dynamic_range,
    evaluate_samples,
    exclude_background,
    he_histograms,
    pearson_per_marker,
    spearman_per_marker,
    w1_to_reference,
)


# ----------------------------------------------------------------------------- correlations


def test_pearson_spearman_match_scipy_with_mask():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 4))
    pred = truth * np.array([1.0, -0.3, 0.0, 2.0]) + rng.normal(size=(200, 4))
    pred[:, 3] = np.round(pred[:, 3])  # ties for Spearman
    valid = rng.random((200, 4)) > 0.25
    pr = pearson_per_marker(truth, pred, valid)
    sr = spearman_per_marker(truth, pred, valid)
    for m in range(4):
        v = valid[:, m]
        assert pr[m] == pytest.approx(scipy.stats.pearsonr(truth[v, m], pred[v, m])[0], abs=1e-6)
        assert sr[m] == pytest.approx(scipy.stats.spearmanr(truth[v, m], pred[v, m])[0], abs=1e-6)


def test_correlation_nan_for_constant_or_too_few():
    truth = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    pred = np.array([[1.0, 2.0], [2.0, 3.0], [4.0, 4.0]])
    valid = np.array([[True, True], [False, True], [False, True]])
    r = pearson_per_marker(truth, pred, valid)
    assert np.isnan(r).all()  # marker 0: one valid patch; marker 1: constant truth
    assert np.isnan(spearman_per_marker(truth, pred, valid)).all()


# ----------------------------------------------------------------------------- C-index


def _brute_c_index(t, p):
    num = den = 0.0
    for i in range(len(t)):
        for j in range(i + 1, len(t)):
            if t[i] == t[j]:
                continue
            den += 1
            d = (t[i] - t[j]) * (p[i] - p[j])
            num += 1.0 if d > 0 else 0.5 if p[i] == p[j] else 0.0
    return num / den


def test_c_index_matches_lifelines_and_brute_force():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(30, 3))
    p = t + rng.normal(size=(30, 3))
    p[:5, 2] = 0.0  # tied predictions
    ci = c_index_per_marker(t, p)
    for m in range(3):
        assert ci[m] == pytest.approx(concordance_index(t[:, m], p[:, m]), abs=1e-6)
        assert ci[m] == pytest.approx(_brute_c_index(t[:, m], p[:, m]), abs=1e-6)


def test_sample_level_c_index_uses_p75_per_sample():
    rng = np.random.default_rng(2)
    samples, tq, pq = [], [], []
    for s in range(12):
        truth = rng.gamma(2.0, 1.0 + s / 4, size=(50, 2))
        pred = truth * 0.5 + rng.normal(scale=1.0, size=(50, 2))
        samples.append(SamplePatches(f"s{s}", truth, pred))
        tq.append(np.percentile(truth, 75, axis=0))
        pq.append(np.percentile(pred, 75, axis=0))
    tabs = evaluate_samples(samples, ["A", "B"], background=None)
    tq, pq = np.array(tq), np.array(pq)
    for m, name in enumerate(["A", "B"]):
        got = tabs.per_marker.set_index("marker").loc[name, "c_index"]
        assert got == pytest.approx(concordance_index(tq[:, m], pq[:, m]), abs=1e-6)
    # per-marker Pearson is the mean of the per-sample Pearson values
    ps = tabs.per_sample_marker
    assert tabs.per_marker.set_index("marker").loc["A", "pearson_r"] == pytest.approx(ps[ps.marker == "A"].pearson_r.mean())
    assert list(tabs.summary.columns[:5]) == ["method", "pearson_r", "spearman_r", "c_index", "n_patches"]
    assert tabs.summary.loc[0, "n_patches"] == 12 * 50


# ----------------------------------------------------------------------------- background


def test_background_exclusion_removes_patches_below_p90_of_background():
    bg = np.arange(10, dtype=float)[:, None]  # p90 of 0..9 = 8.1
    thr = background_thresholds(bg, 90)
    assert thr[0] == pytest.approx(8.1)
    truth_in = np.array([1.0, 5.0, 8.0, 9.0, 20.0])[:, None]
    keep = exclude_background(truth_in, thr)
    assert keep[:, 0].tolist() == [False, False, False, True, True]

    # Through evaluate_samples with a tissue mask: background = out-of-tissue patches of the sample.
    truth = np.concatenate([bg, truth_in, [[30.0]]])
    pred = truth + np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, -2.0, 0.5])[:, None]
    in_tissue = np.array([False] * 10 + [True] * 6)
    tabs = evaluate_samples([SamplePatches("s0", truth, pred, in_tissue=in_tissue)], ["M"])
    row = tabs.per_sample_marker.iloc[0]
    assert row.n_patches == 3  # 9, 20, 30
    kept_t, kept_p = truth[[13, 14, 15], 0], pred[[13, 14, 15], 0]
    assert row.pearson_r == pytest.approx(scipy.stats.pearsonr(kept_t, kept_p)[0], abs=1e-9)


def test_background_falls_back_to_pooled_and_marker_absence_respected():
    rng = np.random.default_rng(3)
    a_t = rng.random((40, 2))
    a_in = np.ones(40, bool)
    a_in[:20] = False
    b_t = rng.random((40, 2)) + 0.5
    b_in = np.ones(40, bool)
    b_in[:2] = False  # too few background patches -> pooled threshold
    present = np.array([True, False])
    tabs = evaluate_samples(
        [SamplePatches("a", a_t, a_t, a_in), SamplePatches("b", b_t, b_t, b_in, present=present)], ["x", "y"]
    )
    pooled = np.percentile(np.concatenate([a_t[:20], b_t[:2]])[:, 0], 90)
    rows = tabs.per_sample_marker.set_index(["sample_id", "marker"])
    assert rows.loc[("b", "x"), "n_patches"] == int((b_t[2:, 0] >= pooled).sum())
    assert rows.loc[("b", "y"), "n_patches"] == 0
    assert np.isnan(rows.loc[("b", "y"), "pearson_r"])


# ----------------------------------------------------------------------------- QC


def test_dynamic_range_known_input():
    img = np.stack([np.arange(101, dtype=float).reshape(1, 101), np.full((1, 101), 3.0)])
    np.testing.assert_allclose(dynamic_range(img), [98.0, 0.0])


def test_he_histograms_and_w1():
    img = np.zeros((3, 4, 4), np.uint8)
    img[0] = 10
    img[1, :2] = 200
    img[2] = np.arange(16).reshape(4, 4)
    h = he_histograms(img)
    assert h.shape == (3, 256)
    np.testing.assert_allclose(h.sum(1), 1.0)
    assert h[0, 10] == 1.0 and h[1, 200] == 0.5 and h[1, 0] == 0.5
    np.testing.assert_allclose(he_histograms(np.moveaxis(img, 0, -1)), h)
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    assert he_histograms(img, mask)[1, 200] == 1.0

    a = np.zeros(256)
    a[0] = 1
    b = np.zeros(256)
    b[10] = 1
    c = np.zeros(256)
    c[4] = 1
    assert w1_to_reference(a, np.stack([b, c])) == pytest.approx(7.0)  # mean(10, 4)

    rng = np.random.default_rng(4)
    hist = rng.random((3, 256))
    refs = rng.random((5, 3, 256))
    centres = np.arange(256) + 0.5
    expected = np.mean(
        [[scipy.stats.wasserstein_distance(centres, centres, hist[ch], refs[r, ch]) for ch in range(3)] for r in range(5)]
    )
    assert w1_to_reference(hist, refs) == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- baselines


def test_he_expression_baseline_known_image():
    he = np.full((16, 16, 3), 255, np.uint8)
    # top-left 8x8: half dark (mean 30 -> dropped by the >50 threshold), half (200,100,150) -> 150
    he[:8, :4] = 30
    he[:8, 4:8] = (200, 100, 150)
    he[:8, 8:16] = 20  # all dark -> 0
    origins = grid_origins((16, 16), 8)
    out = he_expression_baseline(he, origins, num_markers=3)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out[:, 0], [150.0, 0.0, 255.0, 255.0])
    assert (out == out[:, :1]).all()
    np.testing.assert_allclose(he_expression_baseline(np.moveaxis(he, -1, 0), origins, 1)[:, 0], out[:, 0])


def _ellipse_mask():
    from skimage.draw import ellipse

    mask = np.zeros((64, 64), np.int32)
    rr, cc = ellipse(30, 32, 9, 16, shape=mask.shape, rotation=0.6)
    mask[rr, cc] = 1
    rr, cc = ellipse(12, 10, 4, 4, shape=mask.shape)
    mask[rr, cc] = 2
    return mask


def test_morphology_features_of_ellipse_match_regionprops():
    from skimage.measure import regionprops

    mask = _ellipse_mask()
    he = np.zeros((64, 64, 3), np.uint8)
    he[..., 0], he[..., 1], he[..., 2] = 100, 50, 200
    labels, feats = cell_features(mask, he)
    assert feats.shape == (2, 22) and len(CELL_FEATURES) == 22
    p = regionprops(mask)[0]
    f = dict(zip(CELL_FEATURES, feats[0]))
    assert labels[0] == 1
    assert f["Area"] == p.area and f["ConvexHullArea"] == p.area_convex
    assert f["Orientation"] == pytest.approx(p.orientation)
    assert f["MajorAxisLength"] == pytest.approx(p.axis_major_length)
    assert f["MinorMajorAxisRatio"] == pytest.approx(p.axis_minor_length / p.axis_major_length)
    assert f["Circularity"] == pytest.approx(4 * np.pi * p.area / p.perimeter**2)
    assert f["Eccentricity"] == pytest.approx(p.eccentricity)
    assert f["Solidity"] == pytest.approx(p.solidity) and f["Extent"] == pytest.approx(p.extent)
    np.testing.assert_allclose(feats[0, 12:19], p.moments_hu)
    np.testing.assert_allclose(feats[0, 19:22], [100, 50, 200])
    assert 2 * 16 * 0.95 < f["MajorAxisLength"] < 2 * 16 * 1.1  # an ellipse of semi-axis 16

    # Patch features: inside the ellipse = its features; over both cells = area-weighted mean;
    # empty = zeros and HasCell 0.
    origins = np.array([[26, 28], [8, 6], [56, 56]])
    pf = patch_morphology_features(mask, he, origins)
    np.testing.assert_allclose(pf[0, :22], feats[0])
    assert pf[0, 22] == 1
    assert 0 < (mask[8:16, 6:14] == 2).sum() < 64 and not (mask[8:16, 6:14] == 1).any()
    np.testing.assert_allclose(pf[1, :22], feats[1])  # cell 2 partly covers it, background ignored
    assert pf[1, 22] == 1
    assert pf[2].tolist() == [0.0] * 23
    # Two cells sharing one window: 40 px of cell 1, 24 px of cell 2 -> area-weighted mean.
    two = np.zeros((16, 16), np.int32)
    two[2:14, 0:6] = 1
    two[2:14, 6:10] = 2
    _, f2 = cell_features(two, np.zeros((16, 16, 3), np.uint8))
    got = patch_morphology_features(two, None, np.array([[4, 1]]))[0]
    np.testing.assert_allclose(got[:19], (40 * f2[0, :19] + 24 * f2[1, :19]) / 64)
    assert got[22] == 1


def test_morphology_mlp_learns_and_keeps_best_weights():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1500, 23)) * 5 + 3
    x[:, -1] = 1.0
    x[:100, -1] = 0.0
    y = np.stack([x[:, 1] * 0.2 + 1, -x[:, 2] * 0.1], 1)
    base = MorphologyBaseline(num_markers=2, epochs=50, lr=1e-3, seed=0)
    base.fit(x[:1000], y[:1000], None, x[1000:], y[1000:])
    pred = base.predict(x[1000:])
    mse = ((pred - y[1000:]) ** 2).mean()
    assert mse < 0.2 * ((y[1000:] - y[:1000].mean(0)) ** 2).mean()
    hist = [h["val_mse"] for h in base.history]
    assert len(hist) == 50
    assert ((pred - y[1000:]) ** 2).mean() == pytest.approx(min(hist), rel=1e-4)
    layers = [m for m in base.model.net if isinstance(m, nn.Linear)]
    assert [l.out_features for l in layers] == [100, 100, 100, 2]


# ----------------------------------------------------------------------------- Grad-CAM


class _ToyCNN(nn.Module):
    """Bright-spot detector: conv -> ReLU -> conv -> global mean -> linear (positive weights)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.fill_(1 / 27)
            self.conv1.bias.fill_(-0.5)
            self.conv2.weight.zero_()
            for c in range(4):
                self.conv2.weight[c, c, 1, 1] = 1.0
            self.conv2.bias.zero_()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.fill_(1.0)

    def forward(self, x):
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(a.mean((2, 3)))


def test_gradcam_peaks_at_synthetic_signal(tmp_path):
    model = _ToyCNN()
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, 5:9, 20:24] = 3.0
    x[1, :, 22:26, 4:8] = 3.0
    heat = gradcam(model, x, [0, 1])
    assert heat.shape == (2, 2, 32, 32)
    for b, (y, xx) in enumerate([(7, 22), (24, 6)]):
        py, px = np.unravel_index(int(heat[b, 0].argmax()), (32, 32))
        assert abs(py - y) <= 2 and abs(px - xx) <= 2
        assert heat[b, 0].max() == pytest.approx(1.0)
        assert heat[b, 0, 31 - y, 31 - xx] < 0.05  # far from the spot: cold
    out = plot_gradcam(x, heat, ["m0", "m1"], tmp_path / "gc.png")
    assert out.exists() and out.stat().st_size > 1000


def test_gradcam_hooks_convnext_last_stage():
    import timm

    m = timm.create_model("convnext_atto", pretrained=False, num_classes=3)
    assert find_last_stage(m) is m.stages[-1]
    heat = gradcam(m, torch.randn(1, 3, 64, 64), 2)
    assert heat.shape == (1, 1, 64, 64) and torch.isfinite(heat).all()


# ----------------------------------------------------------------------------- figures


def test_figures_write_pngs(tmp_path):
    names = ["PanCK", "CD45", "CD68", "DAPI"]
    bar = plot_per_marker_pearson({"PanCK": 0.5, "CD45": 0.2, "CD68": -0.1, "DAPI": np.nan}, tmp_path / "bars.png")
    assert bar.exists()
    picks = select_percentile_samples({f"s{i}": i / 10 for i in range(11)}, (99, 70, 50, 20))
    assert [p[1] for p in picks] == ["s10", "s7", "s5", "s2"]
    rng = np.random.default_rng(0)
    truth = rng.random((4, 16, 16))
    rgb = composite_rgb(truth, names, ["PanCK", "CD45", "Missing"])
    assert rgb.shape == (16, 16, 3) and rgb.max() <= 1.0 and rgb[..., 2].max() == 0  # no third colour used
    panel = SamplePanel("s0", rng.integers(0, 255, (3, 128, 128), dtype=np.uint8), truth, truth * 0.8, 0.4)
    out = plot_predicted_vs_measured([panel, panel], names, tmp_path / "panels.png")
    assert out.exists() and out.stat().st_size > 1000
