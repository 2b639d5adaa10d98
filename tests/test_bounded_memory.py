"""Bounded memory on a slide-sized input: 20,000 × 20,000 px H&E predicted with peak RSS < 2 GB.

The slide is generated tile by tile into a tiled TIFF and predicted by `rosie_predict` in a child
process (benchmarks/rosie_predict_memory.py); the child's peak RSS is what is bounded. The figure
is quoted in the README with the command that prints it.
"""

from __future__ import annotations

import pytest

from benchmarks.rosie_predict_memory import measure

PEAK_RSS_BOUND_MB = 2048


@pytest.mark.slow
def test_20k_slide_predicts_under_2gb_peak_rss(tmp_path):
    result = measure(size=20_000, tissue_fraction=0.04, workdir=tmp_path)
    print(result)
    assert result["output_shape"] == [50, 2500, 2500]
    assert result["n_patches"] > 100_000, "the islands must cover a real share of the slide"
    assert result["peak_rss_mb"] < PEAK_RSS_BOUND_MB, result


def test_slide_generator_is_tiled_and_bounded(tmp_path):
    """Fast check of the same code path on a small slide (runs in `make test`)."""
    result = measure(size=1024, tissue_fraction=0.3, workdir=tmp_path, batch_size=64)
    assert result["output_shape"] == [50, 128, 128]
    assert 0 < result["n_patches"] < 128 * 128
    assert result["peak_rss_mb"] < PEAK_RSS_BOUND_MB
