"""ROSIE evaluation: fabricated predictions (truth block means + noise) against a synthetic truth
dataset at stride 8 and 4, marker aliases and unmatched markers, the background exclusion, atomic
outputs, and patch-level ground truth (the real HEX sample folder) with a tiny random RosieModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import rosie_checkpoint, shared_data

from analysis.rosie_evaluation import EvaluationError, detect_stride
from analysis.rosie_patch_level import predict_patch_mean
from datamodules.markers import ROSIE_PANEL
from datamodules.provenance import PREDICTION
from datamodules.rosie_evaluation_data import load_tissue, match_panel
from datamodules.sampling import block_means
from datamodules.store import DatasetStore, DatasetWriter
from experiments.rosie_evaluation_pipeline import evaluate

SUMMARY = ["method", "pearson_r", "spearman_r", "c_index", "n_patches"]
RENAME = {"PanCK": "Pan-Cytokeratin", "ECad": "E-cadherin"}  # aliases of ROSIE's names
DROPPED = "CD66"  # measured, not predicted
EXTRA = "MysteryMarker"  # predicted, not measured


def fabricate_prediction(truth_root: Path, out: Path, stride: int, noise: float = 0.3, seed: int = 0) -> Path:
    """A prediction dataset as rosie_predict writes it: codex at 0.5 × stride µm/px, one image per tissue."""
    truth = DatasetStore(str(truth_root))
    rng = np.random.default_rng(seed)
    names = [str(n) for n in truth.channels("codex")["channel_name"]]
    keep = [i for i, n in enumerate(names) if n != DROPPED]
    out_names = [RENAME.get(names[i], names[i]) for i in keep] + [EXTRA]
    with DatasetWriter.create(out, overwrite=True, kind=PREDICTION) as w:
        for tid in truth.tissue_ids():
            img = truth.image("codex", tid, 0.5)
            bm = block_means(img, stride)[keep]
            sd = bm.reshape(len(keep), -1).std(1)[:, None, None]
            pred = bm + noise * sd * rng.standard_normal(bm.shape).astype(np.float32)
            pred = np.concatenate([pred, rng.random((1, *bm.shape[1:]), dtype=np.float32)])
            w.write_image("codex", tid, pred.astype(np.float32), 0.5 * stride, out_names)
        w.write_channels("codex", pd.DataFrame({"channel_name": out_names, "uniprot_id": [None] * len(out_names),
                                                "is_nuclear_marker": False, "qc_pass": True}))
        w.write_tissues(pd.DataFrame({"tissue_id": truth.tissue_ids()}))
    return out


@pytest.fixture(scope="module")
def pred8(synthetic_dataset: Path, tmp_path_factory) -> Path:
    return fabricate_prediction(synthetic_dataset, tmp_path_factory.mktemp("pred") / "pred8", 8)


@pytest.fixture(scope="module")
def result8(synthetic_dataset: Path, pred8: Path, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("eval") / "eval8"
    res = evaluate(pred8, synthetic_dataset, out, morphology_epochs=5, seed=0)
    return res, out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return rosie_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", list(ROSIE_PANEL))


def test_detect_stride():
    assert detect_stride(4.0, 0.5) == 8
    assert detect_stride(2.0, 0.5) == 4
    assert detect_stride(0.5, 0.5) == 1
    with pytest.raises(EvaluationError, match="whole multiple"):
        detect_stride(0.75, 0.5)


def test_match_panel_aliases_and_unmatched():
    t = match_panel(["Pan-Cytokeratin", "CD3", "Foo"], ["PanCK", "CD3e", "CD66"]).set_index("marker")
    assert t.loc["PanCK", "status"] == "matched" and t.loc["PanCK", "measured_channel"] == "PanCK"
    assert t.loc["CD3e", "predicted_channel"] == "CD3"
    assert t.loc["Foo", "status"] == "not_measured"
    assert t.loc["CD66", "status"] == "not_predicted"


def test_stride8_scores_outputs_and_markers(result8, synthetic_dataset):
    res, out = result8
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY
    s = summary.set_index("method")
    assert set(s.index) == {"rosie", "he_expression", "cell_morphology"}
    assert s.loc["rosie", "pearson_r"] > 0.8
    assert s.loc["rosie", "pearson_r"] > s.loc["he_expression", "pearson_r"] + 0.3
    assert s.loc["rosie", "pearson_r"] > s.loc["cell_morphology", "pearson_r"]
    assert s["n_patches"].nunique() == 1  # every method on the same patches

    per_marker = pd.read_csv(out / "per_marker.csv")
    assert list(per_marker.columns) == ["method", "marker", "pearson_r", "spearman_r", "c_index", "n_patches"]
    rosie = per_marker[per_marker["method"] == "rosie"].set_index("marker")
    assert len(rosie) == 49 and "PanCK" in rosie.index and "ECad" in rosie.index  # aliases matched
    assert rosie.loc["PanCK", "pearson_r"] > 0.8
    assert DROPPED not in rosie.index and EXTRA not in rosie.index
    per_sample = pd.read_csv(out / "per_sample.csv")
    assert list(per_sample.columns) == ["method", "tissue_id", "pearson_r", "spearman_r", "n_patches"]
    assert len(per_sample) == 3 * len(DatasetStore(str(synthetic_dataset)).tissue_ids())

    markers = pd.read_csv(out / "markers.csv").set_index("marker")
    assert markers.loc["PanCK", "predicted_channel"] == "Pan-Cytokeratin"
    assert markers.loc[DROPPED, "status"] == "not_predicted"
    assert markers.loc[EXTRA, "status"] == "not_measured"
    log_text = (out / "evaluate.log").read_text()
    assert DROPPED in log_text and EXTRA in log_text
    meta = json.loads((out / "evaluation.json").read_text())
    assert meta["strides"] == [8] and meta["markers_not_predicted"] == [DROPPED] and meta["markers_not_measured"] == [EXTRA]
    assert (res["tissues"]["stride"] == 8).all()
    for fig in ("per_marker_pearson.png", "per_marker_pearson_rosie.png", "predicted_vs_measured.png"):
        assert (out / fig).stat().st_size > 1000
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_background_exclusion_matches_the_rule(result8, synthetic_dataset, pred8):
    """Kept patches of a marker = in-tissue blocks whose truth >= p90 of that tissue's background blocks."""
    res, _ = result8
    truth, pred = DatasetStore(str(synthetic_dataset)), DatasetStore(str(pred8))
    tp = next(t for t in (load_tissue(pred, truth, tid, res["markers"]) for tid in truth.tissue_ids())
              if (~t.in_tissue).sum() >= 10)
    markers = res["markers"].loc[res["markers"]["status"] == "matched", "marker"].tolist()
    m = markers.index("CD45")
    thr = np.percentile(tp.truth[~tp.in_tissue, m], 90)
    expected = int((tp.in_tissue & (tp.truth[:, m] >= thr)).sum())
    psm = res["per_sample_marker"]
    got = psm[(psm.method == "rosie") & (psm.tissue_id == tp.tissue_id) & (psm.marker == "CD45")]["n_patches"].item()
    assert got == expected and 0 < got < tp.in_tissue.sum()


def test_stride4_cli_detects_stride_with_gradcam(synthetic_dataset, tmp_path, tiny_ckpt):
    from experiments.rosie_evaluate import main

    pred4 = fabricate_prediction(synthetic_dataset, tmp_path / "pred4", 4, seed=1)
    out = tmp_path / "eval4"
    rc = main(["--pred", str(pred4), "--truth", str(synthetic_dataset), "--out", str(out), "--methods", "rosie",
               "he_expression", "--gradcam-ckpt", str(tiny_ckpt), "--gradcam-markers", "CD45", "Pan-Cytokeratin",
               "--gradcam-patches", "2", "--no-figures"])
    assert rc == 0
    tissues = pd.read_csv(out / "tissues.csv")
    assert (tissues["stride"] == 4).all() and (tissues["grid_rows"] == 64).all()
    s = pd.read_csv(out / "summary.csv").set_index("method")
    assert s.loc["rosie", "pearson_r"] > 0.8 > s.loc["he_expression", "pearson_r"]
    assert (out / "gradcam.png").stat().st_size > 1000
    # an existing output folder needs --overwrite
    assert main(["--pred", str(pred4), "--truth", str(synthetic_dataset), "--out", str(out), "--methods", "rosie",
                 "--no-figures"]) == 2
    assert main(["--pred", str(pred4), "--truth", str(synthetic_dataset), "--out", str(out), "--methods", "rosie",
                 "--no-figures", "--overwrite"]) == 0
    assert list(pd.read_csv(out / "summary.csv")["method"]) == ["rosie"]


def test_failed_evaluation_leaves_nothing(synthetic_dataset, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(Exception):
        evaluate(tmp_path / "no_such_prediction", synthetic_dataset, out)
    assert not out.exists() and not list(tmp_path.glob(".never.*"))
    with pytest.raises(EvaluationError, match="unknown method"):
        evaluate(tmp_path, synthetic_dataset, out, methods=["pix2pix"])


def test_cell_morphology_skipped_without_cell_masks(synthetic_dataset, pred8, tmp_path):
    import shutil

    truth = tmp_path / "truth_nomasks"
    shutil.copytree(synthetic_dataset, truth)
    shutil.rmtree(truth / "segmentations" / "0_5mpp" / "cell_masks")
    res = evaluate(pred8, truth, tmp_path / "out", methods=["rosie", "cell_morphology"], figures=False, split="test")
    assert list(res["summary"]["method"]) == ["rosie"]
    assert "no cell mask" in res["skipped"].set_index("method").loc["cell_morphology", "reason"]
    assert "cell_morphology skipped" in (tmp_path / "out" / "evaluate.log").read_text()
    assert len(res["per_sample"]) == len(DatasetStore(str(truth)).tissue_ids("test"))


def test_patch_mean_policy_averages_every_block():
    """With a 'model' that returns its input's centre 8x8 mean, the policy gives the patch mean exactly."""
    import torch

    rng = np.random.default_rng(0)
    patch = rng.integers(0, 256, (3, 224, 224), dtype=np.uint8)

    def centre_mean(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 60:68, 60:68].float().mean((2, 3))

    got = predict_patch_mean(centre_mean, patch, stride=8)
    np.testing.assert_allclose(got, patch.reshape(3, -1).mean(1), rtol=1e-6)


def test_patch_level_hex_with_tiny_model(tmp_path, tiny_ckpt):
    hex_dir = shared_data("he_codex_lung_hex")
    from experiments.rosie_evaluate import main

    out = tmp_path / "hex"
    assert main(["--ckpt", str(tiny_ckpt), "--truth", str(hex_dir), "--out", str(out), "--patch-stride", "56"]) == 0
    markers = pd.read_csv(out / "markers.csv")
    assert (markers["status"] == "matched").sum() >= 30
    assert {"PD-1", "FAP"} <= set(markers.loc[markers["status"] == "not_predicted", "measured_channel"])
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY and set(summary["method"]) == {"rosie", "he_expression"}
    per_sample = pd.read_csv(out / "per_sample.csv")
    assert set(per_sample["tissue_id"].astype(str)) == {"0", "1", "2"} and (per_sample["n_patches"] == 3).all()
    assert np.isfinite(summary["pearson_r"]).all()
    assert json.loads((out / "evaluation.json").read_text())["n_markers_matched"] >= 30
    # --pred with patch-level truth is refused with a clear message
    assert main(["--pred", str(tmp_path), "--truth", str(hex_dir), "--out", str(tmp_path / "x")]) == 2
