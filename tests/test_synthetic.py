"""The synthetic generator: determinism, layout, and the signal it promises downstream pipelines.

The statistical checks are the generator's contract with ROSIE / VirTues / survival code: lineage
markers are learnable from H&E morphology, no-signal markers are not, the paper's "H&E expression"
baseline fails, and survival follows CD8 infiltration of tumour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

from datamodules import synthetic as S
from datamodules.store import DatasetStore
from experiments import data_synthetic

ASSETS = S.ASSETS_DIR


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# determinism and CLI
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = S.generate_dataset(tmp_path / "a", n_tissues=2, size=128, seed=3, progress=False)
    b = S.generate_dataset(tmp_path / "b", n_tissues=2, size=128, seed=3, progress=False, workers=2)
    c = S.generate_dataset(tmp_path / "c", n_tissues=2, size=128, seed=4, progress=False)
    da, db = _digest(a), _digest(b)
    assert da == db, "same seed must give byte-identical datasets (also with worker processes)"
    sa, sc = DatasetStore(a), DatasetStore(c)
    for modality in ("he", "codex", "imc"):
        x = sa.image(modality, sa.tissue_ids()[0]).read_all()
        y = sc.image(modality, sc.tissue_ids()[0]).read_all()
        assert x.shape == y.shape and not np.array_equal(x, y), f"{modality}: a different seed must change the image"


def test_simulate_tissue_is_deterministic() -> None:
    t1, t2 = S.simulate_tissue(7, 1, 128), S.simulate_tissue(7, 1, 128)
    for name in ("he", "codex", "imc", "cell_mask", "tissue_mask"):
        assert np.array_equal(getattr(t1, name), getattr(t2, name)), name
    pd.testing.assert_frame_equal(t1.cells, t2.cells)
    assert not np.array_equal(t1.he, S.simulate_tissue(7, 2, 128).he)


@pytest.mark.parametrize("argv, message", [
    (["--size", "100"], ">= 128"),
    (["--size", "200"], "multiple of 16"),
    (["--tissues", "0"], ">= 1"),
])
def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert data_synthetic.main(["--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert data_synthetic.main(["--out", str(out), "--tissues", "1", "--size", "128"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="overwrite"):
        S.generate_dataset(out, 1, 128, 0, progress=False)
    S.generate_dataset(out, 1, 128, 0, overwrite=True, progress=False)
    assert DatasetStore(out).tissue_ids() == [S.tissue_id_for(0, 0)]


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------


def test_dataset_validates_and_reads_back(synthetic_dataset: Path) -> None:
    store = DatasetStore(synthetic_dataset)
    errors = [p for p in store.validate() if p.severity == "error"]
    assert not errors, errors
    assert (synthetic_dataset / ".complete").exists()
    assert sorted(store.modalities()) == ["codex", "he", "imc"]

    tissues = store.tissues()
    assert len(tissues) == 4
    assert tissues["split"].value_counts().to_dict() == {"train": 2, "val": 1, "test": 1}
    for col in ("tissue_id", "patient_id", "split", "response", "survival_time", "survival_event"):
        assert col in tissues.columns
    assert set(tissues["response"]) <= {0, 1} and set(tissues["survival_event"]) <= {0, 1}
    assert (tissues["survival_time"] > 0).all()

    codex = store.channels("codex")
    assert list(codex["channel_name"]) == list(S.CODEX_CHANNELS) and len(codex) == 50
    assert codex.set_index("channel_name").loc["CD45", "uniprot_id"] == "P08575"
    assert pd.isna(codex.set_index("channel_name").loc["DAPI", "uniprot_id"])
    imc = store.channels("imc")
    shipped = pd.read_parquet(ASSETS / "channels.parquet")
    assert len(imc) == 43
    pd.testing.assert_frame_equal(imc[list(shipped.columns)], shipped)

    tid = store.tissue_ids()[0]
    he, cx, im = store.image("he", tid), store.image("codex", tid), store.image("imc", tid)
    assert (he.shape, he.dtype, he.mpp) == ((3, 256, 256), np.uint8, 0.5)
    assert (cx.shape, cx.dtype, cx.mpp) == ((50, 256, 256), np.uint16, 0.5)
    assert (im.shape, im.dtype, im.mpp) == ((43, 128, 128), np.float32, 1.0)
    assert list(cx.channel_names) == list(S.CODEX_CHANNELS)
    for mpp, shape in ((0.5, (256, 256)), (1.0, (128, 128))):
        tm, cm = store.tissue_mask(tid, mpp), store.cell_mask(tid, mpp)
        assert tm.shape == shape and cm.shape == shape
        assert 0.3 < tm.mean() < 0.99, "tissue should leave some background"
    rgb = he.read_all().astype(float).mean(0)
    tm = store.tissue_mask(tid, 0.5)
    assert rgb[~tm].mean() > 220 and rgb[tm].mean() < rgb[~tm].mean() - 30, "white background, stained tissue"

    cells = store.cells()
    for col in ("tissue_id", "cell_id", "cell_type", "cell_category", "x", "y", "area"):
        assert col in cells.columns
    mine = cells[cells["tissue_id"] == tid]
    labels = np.unique(store.cell_mask(tid, 0.5))
    assert set(mine["cell_id"]) == set(labels[labels > 0])
    assert set(cells["cell_type"]) >= {"Tumor", "CD4_T", "CD8_T", "Treg", "B_cell", "Macrophage", "Fibroblast", "Endothelial"}

    assert store.embedding_ids() == sorted(p.stem for p in (ASSETS / "marker_embeddings").glob("*.pt"))
    import torch

    uid = store.embedding_ids()[0]
    assert torch.equal(store.embedding(uid), torch.load(ASSETS / "marker_embeddings" / f"{uid}.pt", weights_only=True))

    for modality, mpp, n in (("codex", 0.5, 50), ("imc", 1.0, 43)):
        stats = store.standardization(modality, mpp)
        assert stats is not None and stats.upper_quantiles.shape == (4, n)
        assert np.isfinite(stats.means.to_numpy()).all() and (stats.stds.to_numpy() > 0).all()
    tiles = store.tiling(1.0)
    assert tiles is not None and set(tiles.columns) >= {"tissue_id", "tile_id", "row", "col"}
    assert (tiles["tissue_fraction"] >= 0.3).all() and len(tiles) >= 1


def test_assets_are_attributed() -> None:
    text = (ASSETS / "ATTRIBUTION.md").read_text()
    for needle in ("bunnelab/virtues", "MIT", "EPFL", "Cords", "unmodified"):
        assert needle in text
    assert len(list((ASSETS / "marker_embeddings").glob("*.pt"))) == 40


# ------------------------------------------------------------------------------------------------
# signal: what morphology can and cannot tell
# ------------------------------------------------------------------------------------------------


def _blocks(x: np.ndarray, b: int = 8) -> np.ndarray:
    c, h, w = x.shape
    return x.reshape(c, h // b, b, w // b, b).mean(axis=(2, 4)).reshape(c, -1)


def test_he_expression_baseline_fails(synthetic_dataset: Path) -> None:
    """ROSIE's 'H&E expression' baseline (mean RGB as every marker) must not work."""
    store = DatasetStore(synthetic_dataset)
    whole, inside = [], []
    for tid in store.tissue_ids():
        he = store.image("he", tid).read_all().astype(np.float32)
        cx = store.image("codex", tid).read_all().astype(np.float32)
        bright = _blocks(he.mean(0, keepdims=True))[0]
        m = _blocks(cx)
        tissue = _blocks(store.tissue_mask(tid, 0.5)[None].astype(np.float32))[0] > 0.99
        whole.append([np.corrcoef(bright, m[k])[0, 1] for k in range(len(m))])
        inside.append([np.corrcoef(bright[tissue], m[k][tissue])[0, 1] for k in range(len(m))])
    whole, inside = np.array(whole).mean(0), np.array(inside).mean(0)
    assert whole.mean() < 0.1
    assert inside.mean() < 0.1
    # not one darkness scale for every marker: inside tissue, markers go both ways
    assert (inside > 0).sum() >= 3 and (inside < 0).sum() >= 3


def _cell_features(store: DatasetStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats, targets, tissue_of = [], [], []
    for i, tid in enumerate(store.tissue_ids()):
        he = store.image("he", tid).read_all().astype(np.float32)
        cx = store.image("codex", tid).read_all().astype(np.float32)
        lab = store.cell_mask(tid, 0.5).astype(np.int64)
        idx = np.arange(1, lab.max() + 1)
        grey = he.mean(0)
        area = ndimage.sum(np.ones_like(grey), lab, idx)
        nucleus_area = ndimage.sum((grey < 120).astype(np.float32), lab, idx)
        f = [ndimage.mean(he[c], lab, idx) for c in range(3)] + [area, nucleus_area, ndimage.standard_deviation(grey, lab, idx)]
        feats.append(np.stack(f, 1))
        targets.append(np.log1p(np.stack([ndimage.mean(cx[k], lab, idx) for k in range(len(cx))], 1)))
        tissue_of.append(np.full(len(idx), i))
    return np.concatenate(feats), np.concatenate(targets), np.concatenate(tissue_of)


def test_morphology_predicts_lineage_not_no_signal_markers(synthetic_dataset: Path) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    X, Y, tissue = _cell_features(DatasetStore(synthetic_dataset))
    X = (X - X.mean(0)) / (X.std(0) + 1e-9)
    # leave one tissue out: each tissue's cells are predicted by a model fit on the other tissues
    pred = np.zeros_like(Y)
    for t in np.unique(tissue):
        held = tissue == t
        pred[held] = Ridge(alpha=1.0).fit(X[~held], Y[~held]).predict(X[held])
    names = list(S.CODEX_CHANNELS)
    r2 = {name: r2_score(Y[:, k], pred[:, k]) for k, name in enumerate(names)}
    assert r2["CD45"] > 0.2 and r2["PanCK"] > 0.4, r2
    for name in S.CODEX_NO_SIGNAL:
        assert r2[name] < 0.05, (name, r2[name])
    assert {"Ki67", "IDO1", "ATM"} <= set(S.CODEX_NO_SIGNAL)


def test_no_signal_markers_are_independent_of_cell_type(synthetic_dataset: Path) -> None:
    store = DatasetStore(synthetic_dataset)
    cells = store.cells()
    _, Y, _ = _cell_features(store)
    types = cells["cell_type"].to_numpy()
    k = list(S.CODEX_CHANNELS).index
    # lineage marker: strongly different between types; no-signal marker: not
    for name, low, high in (("PanCK", 0.3, None), ("Ki67", None, 0.05), ("IDO1", None, 0.05)):
        y = Y[:, k(name)]
        groups = [y[types == t] for t in np.unique(types) if (types == t).sum() >= 10]
        total = ((y - y.mean()) ** 2).sum()
        between = sum(len(g) * (g.mean() - y.mean()) ** 2 for g in groups)
        eta2 = between / total
        if low is not None:
            assert eta2 > low, (name, eta2)
        if high is not None:
            assert eta2 < high, (name, eta2)


def test_survival_follows_cd8_infiltration() -> None:
    """16 small tissues: more CD8 T cells at the tumour → longer survival and more responders."""
    names = list(S.imc_channels_table()["channel_name"])
    rows = []
    for i in range(16):
        t = S.simulate_tissue(11, i, 128, names)
        c = t.cells
        tumour = int((c["cell_type"] == "Tumor").sum())
        cd8 = int(((c["cell_type"] == "CD8_T") & (c["dist_to_tumor"] <= 15)).sum())
        rows.append((cd8 / max(tumour, 1), t.info["survival_time"], t.info["response"]))
    infil, time, response = map(np.array, zip(*rows))
    assert spearmanr(infil, time)[0] > 0.3
    assert spearmanr(infil, response)[0] > 0.2
