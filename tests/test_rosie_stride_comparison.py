"""Stride 8 vs stride 1 comparison: the scores are computed on the units the docstring names.

A fine map equal to the measurement must score 1 at native resolution and on 8-px patches; a coarse
map made of the measurement's 8-px block means scores 1 on patches but less at native resolution
(it lost the detail inside each block), and the two agree exactly on patches.
"""

from __future__ import annotations

import numpy as np
import pytest

from experiments.rosie_stride_comparison import block_mean, compare, main


def test_block_mean_is_the_mean_of_each_block() -> None:
    image = np.arange(2 * 16 * 24, dtype=np.float32).reshape(2, 16, 24)
    out = block_mean(image, 8)
    assert out.shape == (2, 2, 3)
    assert out[1, 1, 2] == pytest.approx(image[1, 8:16, 16:24].mean())


def test_a_perfect_fine_map_and_a_block_mean_coarse_map() -> None:
    rng = np.random.default_rng(0)
    measured = rng.random((3, 64, 64)).astype(np.float32)
    coarse = block_mean(measured, 8)
    table = compare(measured, coarse, measured.copy(), np.ones((64, 64), bool), coarse_stride=8)
    np.testing.assert_allclose(table["pearson_native_fine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(table["pearson_patch_fine"], 1.0, atol=1e-6)
    np.testing.assert_allclose(table["pearson_patch_coarse"], 1.0, atol=1e-6)
    np.testing.assert_allclose(table["pearson_coarse_vs_fine"], 1.0, atol=1e-6)
    assert (table["pearson_native_coarse"] < 0.6).all()  # white noise: block means keep little per-pixel detail


def test_bad_strides_are_one_line(synthetic_dataset, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--ckpt", "none.ckpt", "--data", str(synthetic_dataset), "--out", str(tmp_path / "o"),
                 "--coarse", "8", "--fine", "8"]) == 2
    assert "--fine 8 / --coarse 8" in capsys.readouterr().err
