"""Dense (shift-and-stitch) ROSIE mode against exact per-patch inference.

The planted check: with every ConvNeXt block's layer scale set to 0 the blocks are identities, the
network has no spatial context beyond its own non-overlapping cells, and dense mode must equal
exact mode to float rounding at every stride -- any phase/offset bookkeeping error moves windows by
whole cells and breaks it. With the blocks on, a region of exactly one window has the same (zero)
context in both modes and must also agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.components.rosie_backbone import RosieInputAdapter, RosieRegressor, build_rosie_regressor
from lightning_modules.components.rosie_dense import DenseConvNeXt
from lightning_modules.rosie_inference.dense import dense_network, predict_tile_dense
from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.tiles import predict_tile


def _atto(outputs: int = 4, gamma: float | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_rosie_regressor("convnext_atto", num_outputs=outputs).eval()
    if gamma is not None:
        for mod in model.modules():
            if isinstance(getattr(mod, "gamma", None), torch.nn.Parameter):
                mod.gamma.data.fill_(gamma)
    return model


def _exact(model: torch.nn.Module, x: torch.Tensor, stride: int, ni: int, nj: int) -> torch.Tensor:
    with torch.no_grad():
        rows = [torch.cat([x[:, :, i * stride : i * stride + 128, j * stride : j * stride + 128] for j in range(nj)])
                for i in range(ni)]
        return torch.stack([model(r) for r in rows])


@pytest.mark.parametrize("stride", [8, 4, 16, pytest.param(6, marks=pytest.mark.slow)])
def test_dense_equals_exact_without_spatial_context(stride):
    model = _atto(gamma=0.0)
    dense = DenseConvNeXt(model)
    x = torch.randn(1, 3, 128 + stride + (stride - 1) // 2, 128 + 2 * stride)
    with torch.no_grad():
        out = dense(x, stride)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, _exact(model, x, stride, 2, 3), rtol=1e-4, atol=1e-5)


def test_phase_counts_reuse_early_stages():
    dense = DenseConvNeXt(_atto())
    assert dense.phase_counts(8) == [1, 1, 2, 2]  # stem + stages 0-1 once, stage 2 ×4, stage 3 ×16
    assert dense.phase_counts(32) == [1, 1, 1, 1]
    assert dense.phase_counts(4) == [1, 2, 2, 2]
    assert dense.phase_counts(1) == [4, 2, 2, 2]


def test_single_window_region_matches_exact_with_blocks_on():
    model = _atto(gamma=1.0)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(DenseConvNeXt(model)(x, 8)[0, 0], model(x)[0], rtol=1e-4, atol=1e-4)


def test_context_changes_dense_predictions_with_blocks_on():
    """The one intended difference: real neighbours instead of zero padding (so agreement is measured, not assumed)."""
    model = _atto(gamma=1.0)
    x = torch.randn(1, 3, 128 + 16, 128 + 16)
    with torch.no_grad():
        diff = (DenseConvNeXt(model)(x, 8) - _exact(model, x, 8, 3, 3)).abs().max()
    assert diff > 1e-3


def test_predict_tile_dense_keeps_the_predict_tile_contract():
    markers = ["a", "b", "c"]
    predictor = PatchPredictor(_atto(3, gamma=0.0), markers, device="cpu", scales=[1.0, 2.0, 0.5])
    rng = np.random.default_rng(0)
    th, tw, s = 3, 4, 8
    region = rng.integers(0, 256, size=(3, (th - 1) * s + 128, (tw - 1) * s + 128), dtype=np.uint8)
    fg = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=bool)
    seen = []
    pred, values = predict_tile_dense(region, fg, predictor, s, batch_size=4, on_batch=seen.append)
    ref_pred, ref_values = predict_tile(region, fg, predictor, s, batch_size=4)
    assert pred.dtype == np.float32 and pred.shape == (3, th, tw) and values.shape == (int(fg.sum()), 3)
    assert sum(seen) == fg.sum()
    assert (pred[:, ~fg] == 0).all()
    np.testing.assert_array_equal(values, pred[:, fg].T)  # row-major foreground order
    np.testing.assert_allclose(pred, ref_pred, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-4)
    empty_pred, empty_values = predict_tile_dense(region, np.zeros_like(fg), predictor, s, 4)
    assert empty_values.shape == (0, 3) and not empty_pred.any()


def test_resizing_networks_are_refused():
    official_like = RosieRegressor(_atto(), RosieInputAdapter(224, (0.5,) * 3, (0.2,) * 3))
    with pytest.raises(ValueError, match="--mode exact"):
        dense_network(official_like)
    normalise_only = RosieRegressor(_atto(), RosieInputAdapter(None, (0.5,) * 3, (0.2,) * 3))
    net = dense_network(normalise_only)
    assert isinstance(net.dense, DenseConvNeXt) and net.mean is not None and net.inset == 0


def test_centre_crop_network_pools_the_crop():
    model = RosieRegressor(_atto(3, gamma=0.0), RosieInputAdapter(None, (0.5,) * 3, (0.2,) * 3, center_crop=64))
    predictor = PatchPredictor(model, ["a", "b", "c"], input_scale="unit", device="cpu")
    assert dense_network(model).inset == 32
    region = np.random.default_rng(1).integers(0, 256, size=(3, 128 + 16, 128 + 8), dtype=np.uint8)
    fg = np.ones((3, 2), dtype=bool)
    pred, _ = predict_tile_dense(region, fg, predictor, 8, 4)
    np.testing.assert_allclose(pred, predict_tile(region, fg, predictor, 8, 4)[0], rtol=1e-4, atol=1e-4)
