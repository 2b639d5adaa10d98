"""VirTues masked-reconstruction evaluation: masks, metrics on masked pixels only, baselines,
zero-shot marker table, outputs, and the real MIBI field of view (skipped without ../shared)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_untrained, shared_data

from analysis.outputs import OutputPathError
from analysis.virtues_reconstruction import (
    SUMMARY_COLUMNS,
    EvalCrop,
    ReconstructionError,
    _forward_channels,
    build_marker_vocabulary,
    crop_generator,
    evaluate_reconstruction,
    pixel_mask,
    strategy_masks,
    write_outputs,
)
from datamodules.store import DatasetStore
from lightning_modules.components.virtues import VirTues, VirTuesArch
from lightning_modules.virtues import VirTuesModule

TINY = VirTuesArch(d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64, encoder_pattern="hvhv", decoder_pattern="f")
#: MIBI marker -> UniProt id. The first 19 have an ESM-2 file in imc_example (CD45 as the IMC
#: panel's P08575-8, PanKRT as its panCK P02533, HLA-DR/DP/DQ as its HLA-DR alpha P01903); the others
#: carry their real accession but no embedding, so they must be reported, not silently dropped.
MIBI_UNIPROT = {
    "MPO": "P05164", "SMA": "P62736", "HH3": "P68431", "FAP": "Q12884", "HLADRDPDQ": "P01903", "COLI": "P02452",
    "CD20": "P11836", "CD68": "P34810", "IDO1": "P14902", "CD3": "P07766", "PD1": "Q15116", "MMP9": "P14780",
    "VIM": "P08670", "FOXP3": "Q9BZS1", "CD45": "P08575-8", "CD8": "P01732", "CD4": "P01730", "PanKRT": "P02533",
    "Ki67": "P46013",
    "CD31": "P16284", "ECAD": "P12830", "CD14": "P08571", "CD44": "P16070", "ER": "P03372", "HER2": "P04626",
    "GZMB": "P10144", "PDL1": "Q9NZQ7", "CK7": "P08729", "CK5": "P13647",
}
MIBI_WITH_EMBEDDING = list(MIBI_UNIPROT)[:19]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster and immune to a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class VirTuesOutputLike(NamedTuple):
    decoded: list


class Oracle(torch.nn.Module):
    """Returns the truth on masked tokens and ``visible_fill`` (noise by default) on visible ones."""

    patch_size = 8

    def __init__(self, visible: str = "noise"):
        super().__init__()
        self.visible = visible

    def forward(self, images, marker_ids, masks):
        out = []
        g = torch.Generator().manual_seed(0)
        for x, m in zip(images, masks):
            pm = pixel_mask(m, 8)
            other = torch.randn(x.shape, generator=g) * 5 if self.visible == "noise" else x
            out.append(torch.where(pm, x, other))
        return VirTuesOutputLike(out)


class Inverted(Oracle):
    """Noise on masked tokens, truth on visible ones: must score ~0, proving only masked pixels count."""

    def forward(self, images, marker_ids, masks):
        g = torch.Generator().manual_seed(1)
        return VirTuesOutputLike([torch.where(pixel_mask(m, 8), torch.randn(x.shape, generator=g), x)
                                  for x, m in zip(images, masks)])


def make_crops(n: int = 3, channels: int = 4, size: int = 32, dataset: str = "toy", seed: int = 0) -> list[EvalCrop]:
    g = torch.Generator().manual_seed(seed)
    crops = []
    names = [f"m{i}" for i in range(channels)]
    for k in range(n):
        base = torch.randn(channels, size, size, generator=g) + torch.randn(channels, 1, 1, generator=g)
        crops.append(EvalCrop(dataset, f"t{k}", 0, 0, base, torch.arange(channels), names, [f"P{i:05d}" for i in range(channels)]))
    return crops


def save_random_checkpoint(path: Path, uniprot_ids: list[str], embeddings: torch.Tensor) -> Path:
    """A randomly initialised tiny VirTuesModule saved by a Lightning Trainer (no training)."""
    torch.manual_seed(0)
    module = VirTuesModule(TINY)
    module.set_marker_table(embeddings, uniprot_ids)
    return save_untrained(module, path)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


def test_strategy_masks_are_the_papers() -> None:
    C, h, w = 5, 16, 16
    ind = strategy_masks("independent", C, h, w, crop_generator(0, "independent", 0))
    assert ind.shape == (1, C, h, w)
    counts = ind[0].flatten(1).sum(1)
    assert ((counts >= math.ceil(0.6 * 256)) & (counts <= 256)).all()
    assert len(set(counts.tolist())) > 1  # one ratio per channel

    mark = strategy_masks("marker", C, h, w)
    assert mark.shape == (C, C, h, w)
    for c in range(C):
        assert mark[c, c].all(), "the chosen channel is fully masked"
        others = torch.cat([mark[c, :c], mark[c, c + 1 :]])
        assert not others.any(), "every other channel is fully visible"

    niche = strategy_masks("niche", C, h, w, crop_generator(0, "niche", 3))[0]
    assert all(torch.equal(niche[0], niche[c]) for c in range(C)), "same positions in all channels"
    n = int(niche[0].sum())
    assert math.ceil(0.6 * 256) <= n <= 256

    again = strategy_masks("niche", C, h, w, crop_generator(0, "niche", 3))[0]
    assert torch.equal(niche, again), "masks are a function of (seed, strategy, crop)"
    with pytest.raises(ReconstructionError):
        strategy_masks("random", C, h, w)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_oracle_scores_one_and_only_masked_pixels_count() -> None:
    crops = make_crops()
    res = evaluate_reconstruction(Oracle(), crops, strategies=("independent", "marker", "niche"), progress=False)
    v = res.per_marker[res.per_marker["method"] == "virtues"]
    assert len(v) == 3 * 4
    np.testing.assert_allclose(v["pearson_r"], 1.0, atol=1e-9)
    np.testing.assert_allclose(v["f1"], 1.0)
    # marker masking: every pixel of every crop, once per marker
    mk = v[v["strategy"] == "marker"]
    assert (mk["n_pixels"] == 3 * 32 * 32).all()
    # independent: exactly the masked tokens' pixels
    expected = sum(int(strategy_masks("independent", 4, 4, 4, crop_generator(0, "independent", i))[0, 0].sum()) * 64
                   for i in range(3))
    assert int(v[(v["strategy"] == "independent") & (v["marker"] == "m0")]["n_pixels"].iloc[0]) == expected

    bad = evaluate_reconstruction(Inverted(), crops, strategies=("independent", "niche"), progress=False)
    bv = bad.per_marker[bad.per_marker["method"] == "virtues"]
    assert bv["pearson_r"].abs().max() < 0.15, "truth on visible pixels must not help"


def test_visible_mean_baseline_matches_hand_computation() -> None:
    crops = make_crops(n=4, channels=2, size=32, seed=4)
    for strategy in ("independent", "niche"):
        res = evaluate_reconstruction(Oracle(), crops, strategies=(strategy,), progress=False)
        row = res.per_marker.query("method == 'visible_mean' and marker == 'm1'").iloc[0]
        truth, pred = [], []
        for i, c in enumerate(crops):
            m = strategy_masks(strategy, 2, 4, 4, crop_generator(0, strategy, i))[0, 1].numpy()
            x = c.image[1].numpy()
            pm = np.kron(m, np.ones((8, 8), dtype=bool)).astype(bool)
            fill = x[~pm].mean() if (~pm).any() else 0.0
            truth.append(x[pm])
            pred.append(np.full(pm.sum(), fill))
        t, p = np.concatenate(truth), np.concatenate(pred)
        assert p.std() > 0, "the test needs crops with visible pixels"
        thr = t.mean()  # the documented threshold: mean truth over the evaluated pixels
        r = np.corrcoef(t, p)[0, 1]
        tp, fp, fn = np.sum((t > thr) & (p > thr)), np.sum((t <= thr) & (p > thr)), np.sum((t > thr) & (p <= thr))
        assert row["n_pixels"] == len(t)
        assert row["pearson_r"] == pytest.approx(r, abs=1e-6)
        assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)


def test_most_correlated_baseline_uses_the_partner_and_its_fit() -> None:
    g = torch.Generator().manual_seed(2)
    crops = []
    for k in range(3):
        a = torch.randn(32, 32, generator=g)
        noise = torch.randn(32, 32, generator=g)
        img = torch.stack([a, 2 * a + 1, noise, 0.3 * a + noise])  # m1 = 2*m0 + 1 exactly
        crops.append(EvalCrop("toy", f"t{k}", 0, 0, img, torch.arange(4), ["m0", "m1", "m2", "m3"], ["A", "B", "C", "D"]))
    res = evaluate_reconstruction(Oracle(), crops[:2], fit_crops=crops[2:], strategies=("marker",), progress=False)
    fits = res.baseline_fits.set_index("marker")
    assert fits.loc["m0", "partner"] == "m1" and fits.loc["m1", "partner"] == "m0"
    assert fits.loc["m1", "slope"] == pytest.approx(2.0) and fits.loc["m1", "intercept"] == pytest.approx(1.0)
    assert (fits["source"] == "train").all()
    mc = res.per_marker.query("method == 'most_correlated'").set_index("marker")
    assert mc.loc["m0", "pearson_r"] == pytest.approx(1.0) and mc.loc["m1", "f1"] == pytest.approx(1.0)
    assert fits.loc["m2", "partner"] == "m3"  # m3 = 0.3*m0 + m2: r = 1/sqrt(1.09)
    assert mc.loc["m2", "pearson_r"] == pytest.approx(1 / math.sqrt(1.09), abs=0.03)


def test_channel_decoding_equals_full_forward() -> None:
    torch.manual_seed(0)
    model = VirTues(TINY).eval()
    model.set_marker_table(torch.randn(6, 640), [f"P{i:05d}" for i in range(6)])
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 32, 32, generator=g) for _ in range(3)]
    ids = [torch.tensor([0, 2, 3, 5])] * 3
    masks = list(strategy_masks("marker", 4, 4, 4)[:3])
    with torch.inference_mode():
        full = model(images, ids, masks).decoded
        single = _forward_channels(model, images, ids, masks, [0, 1, 2], torch.device("cpu"))
    for b in range(3):
        torch.testing.assert_close(single[b][0], full[b][b], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# marker table, outputs
# ---------------------------------------------------------------------------------------------


def test_zero_shot_vocabulary_keeps_trained_rows_and_appends_new() -> None:
    emb = {u: torch.full((640,), float(i)) for i, u in enumerate(["A", "B", "C"])}
    vocab = build_marker_vocabulary(["B", "A"], emb, ["A", "C", "D"])
    assert vocab.uniprot_ids == ["B", "A", "C"]
    assert vocab.seen == {"B": True, "A": True, "C": False}
    assert vocab.embeddings[0, 0] == 1 and vocab.embeddings[2, 0] == 2
    assert not vocab.usable("D")
    with pytest.raises(ReconstructionError, match="--embeddings"):
        build_marker_vocabulary(["A", "Z"], emb, ["A"])
    loose = build_marker_vocabulary(["A", "Z"], emb, ["A"], allow_missing=True)
    assert loose.missing_trained == ["Z"] and torch.isnan(loose.embeddings[1]).all() and not loose.usable("Z")


def test_outputs_columns_and_atomic_refusal(tmp_path: Path) -> None:
    res = evaluate_reconstruction(Oracle(), make_crops(), progress=False)
    out = write_outputs(res, tmp_path / "rec")
    assert list(pd.read_csv(out / "summary.csv").columns) == SUMMARY_COLUMNS == ["strategy", "method", "pearson_r", "f1"]
    summary = pd.read_csv(out / "summary.csv")
    assert set(zip(summary["strategy"], summary["method"])) == {
        ("independent", "virtues"), ("independent", "visible_mean"), ("marker", "virtues"),
        ("marker", "most_correlated"), ("niche", "virtues"), ("niche", "visible_mean")}
    pm = pd.read_csv(out / "per_marker.csv")
    assert list(pm.columns) == ["dataset", "strategy", "method", "marker", "uniprot_id", "seen", "pearson_r", "f1", "n_pixels"]
    assert list(pd.read_csv(out / "summary_seen_unseen.csv").columns)[:3] == ["strategy", "method", "seen"]
    for name in ("pearson_by_strategy.png", "per_marker_scatter.png", "examples_niche_toy.png", "skipped_markers.csv"):
        assert (out / name).is_file(), name
    with pytest.raises(OutputPathError, match="already exists"):
        write_outputs(res, out)
    write_outputs(res, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial_checkpoint(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Random tiny model whose 'pretraining' table holds 30 of the synthetic panel's 40 markers."""
    store = DatasetStore(synthetic_dataset)
    ids = store.embedding_ids()[:30]
    table = torch.stack([store.embedding(u) for u in ids])
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", ids, table), ids


def test_cli_zero_shot_marks_unseen_and_reports_skipped(synthetic_dataset: Path, partial_checkpoint, tmp_path: Path) -> None:
    from experiments.virtues_reconstruct import main

    ckpt, trained = partial_checkpoint
    out = tmp_path / "rec"
    args = ["--ckpt", str(ckpt), "--data", str(synthetic_dataset), "--out", str(out), "--batch-size", "40"]
    assert main(args) == 0
    pm = pd.read_csv(out / "per_marker.csv")
    channels = DatasetStore(synthetic_dataset).channels("imc")
    evaluated = channels[channels["uniprot_id"].notna()]
    assert set(pm["marker"]) == set(evaluated["channel_name"])
    unseen = set(pm.loc[~pm["seen"], "uniprot_id"])
    assert unseen == set(evaluated["uniprot_id"]) - set(trained) and len(unseen) == 10
    seen_summary = pd.read_csv(out / "summary_seen_unseen.csv")
    assert set(seen_summary["seen"]) == {True, False}
    skipped = pd.read_csv(out / "skipped_markers.csv")
    assert set(skipped["marker"]) == {"PNAd", "Iridium", "Iridium (V2)"}
    assert (skipped["reason"].str.contains("UniProt")).all()
    assert "PNAd" in (out / "reconstruction.log").read_text()
    assert main(args) == 2, "an existing --out is refused without --overwrite"


def test_mibi_field_of_view_end_to_end(synthetic_dataset: Path, partial_checkpoint, tmp_path: Path) -> None:
    """The real MIBI DCIS field of view (41 one-marker TIFFs): ingest, then evaluate a checkpoint
    pretrained on (synthetic) IMC; markers without an embedding are reported."""
    from experiments.data_ingest import main as ingest_main
    from experiments.virtues_reconstruct import main

    folder = shared_data("mibi_dcis") / "Point2203_pt1072_31606"
    emb = shared_data("imc_example") / "marker_embeddings"
    csv = tmp_path / "mibi_channels.csv"
    pd.DataFrame({"channel_name": list(MIBI_UNIPROT), "uniprot_id": list(MIBI_UNIPROT.values())}).to_csv(csv, index=False)
    code = ingest_main(["--image", str(folder), "--modality", "mibi", "--dataset", "mibi_dcis", "--tissue-id", "Point2203",
                        "--out", str(tmp_path / "data"), "--channels", str(csv), "--embeddings", str(emb), "--split", "test"])
    assert code == 0
    data = tmp_path / "data" / "mibi_dcis"
    assert sorted(DatasetStore(data).embedding_ids()) == sorted(MIBI_UNIPROT[m] for m in MIBI_WITH_EMBEDDING)

    ckpt, trained = partial_checkpoint
    out = tmp_path / "rec"
    # the checkpoint's table rows come from the pretraining data's embeddings (not all in the MIBI folder)
    args = ["--ckpt", str(ckpt), "--data", str(data), "--modality", "mibi", "--out", str(out), "--max-crops", "4",
            "--marker-max-crops", "1", "--embeddings", str(synthetic_dataset / "marker_embeddings"), "--batch-size", "19"]
    assert main(args) == 0
    pm = pd.read_csv(out / "per_marker.csv")
    assert set(pm["marker"]) == set(MIBI_WITH_EMBEDDING)
    assert set(pm["strategy"]) == {"independent", "marker", "niche"}
    assert set(pm.loc[~pm["seen"], "uniprot_id"]) == set(MIBI_UNIPROT[m] for m in MIBI_WITH_EMBEDDING) - set(trained)
    skipped = pd.read_csv(out / "skipped_markers.csv").set_index("marker")
    n_tiffs = len(list(folder.glob("*.tif")))
    assert len(skipped) == n_tiffs - 19
    assert "embedding" in skipped.loc["ECAD", "reason"] and "UniProt" in skipped.loc["Nuc", "reason"]
    fits = pd.read_csv(out / "baseline_fits.csv")
    assert (fits["source"] == "evaluated").all()  # the MIBI dataset has no training split
    assert (out / "examples_marker_mibi_dcis.png").is_file()
