"""VirTues cell / niche / tissue tokens: crop grids as the official code, overlap-weighted cell
means against a brute-force reference, padding and preprocessing order, and the encoder path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.virtues_tokens import (
    CellTokenAccumulator,
    cell_crop_corners,
    crop_tissue_fractions,
    niche_crop_corners,
    tissue_token,
)
from lightning_modules.components.virtues import VirTues, VirTuesArch
from lightning_modules.virtues_tokens import ArrayReader, CropEncoder, extract_tissue_tokens, read_zero_padded

TINY = VirTuesArch(d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64, encoder_pattern="hvhv", decoder_pattern="f")


def test_cell_crop_grid_matches_the_official_rule():
    corners = cell_crop_corners(300, 200)
    ys, xs = sorted({int(y) for y, _ in corners}), sorted({int(x) for _, x in corners})
    assert ys == [0, 42, 84, 126, 168, 172] and xs == [0, 42, 72]
    assert len(corners) == len(ys) * len(xs) and len({tuple(c) for c in corners}) == len(corners)
    assert cell_crop_corners(128, 128).tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="smaller"):
        cell_crop_corners(100, 300)
    assert niche_crop_corners(300, 260).tolist() == [[0, 0], [0, 128], [128, 0], [128, 128]]


def test_cell_tokens_equal_brute_force_overlap_weighted_means():
    rng = np.random.default_rng(0)
    d, p = 4, 8
    mask = np.zeros((48, 48), np.int64)
    for cid in range(1, 9):  # irregular blobs crossing patch borders
        y, x = rng.integers(0, 40, 2)
        mask[y : y + rng.integers(3, 12), x : x + rng.integers(3, 12)] = cid
    crops = [(0, 0), (8, 16), (16, 8)]  # overlapping 32-px crops = 4x4 patch grids
    grids = [torch.from_numpy(rng.normal(size=(4, 4, d))) for _ in crops]
    acc = CellTokenAccumulator(np.unique(mask), d, patch_size=p)
    for (y, x), g in zip(crops, grids):
        acc.add(g, mask[y : y + 32, x : x + 32])
    ids, tokens, weights = acc.result()

    expect: dict[int, tuple[np.ndarray, float]] = {}
    for (y, x), g in zip(crops, grids):
        for i in range(4):
            for j in range(4):
                patch = mask[y + i * p : y + (i + 1) * p, x + j * p : x + (j + 1) * p]
                for cid in np.unique(patch[patch > 0]):
                    n = float((patch == cid).sum())
                    s, w = expect.get(int(cid), (np.zeros(d), 0.0))
                    expect[int(cid)] = (s + n * g[i, j].numpy(), w + n)
    assert ids.tolist() == sorted(expect)
    for k, cid in enumerate(ids):
        s, w = expect[int(cid)]
        np.testing.assert_allclose(tokens[k], s / w, rtol=1e-6)
        assert weights[k] == w
    with pytest.raises(ValueError, match="not among"):
        CellTokenAccumulator([1, 2], d, p).add(grids[0], np.full((32, 32), 7))


def test_tissue_token_is_mean_over_all_patch_tokens_and_needs_a_crop():
    a, b = torch.ones(2, 2, 3), torch.zeros(2, 2, 3)
    np.testing.assert_allclose(tissue_token([a, b]).numpy(), 0.5)
    with pytest.raises(ValueError, match="tissue threshold"):
        tissue_token([])
    mask = np.zeros((256, 256), bool)
    mask[:128, :64] = True
    np.testing.assert_allclose(crop_tissue_fractions(mask, niche_crop_corners(256, 256)), [0.5, 0, 0, 0])


def test_zero_padding_is_applied_to_raw_pixels():
    img = np.arange(2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10) + 1
    crop = read_zero_padded(ArrayReader(img), -3, 5, 8, [1])
    assert crop.shape == (1, 8, 8)
    assert (crop[:, :3] == 0).all() and (crop[:, :, 5:] == 0).all()
    np.testing.assert_array_equal(crop[0, 3:, :5], img[1, 0:5, 5:10])


def test_extract_tissue_tokens_with_a_tiny_encoder():
    torch.manual_seed(0)
    model = VirTues(TINY)
    model.set_marker_table(torch.randn(5, 640), [f"P{i:05d}" for i in range(5)])
    encoder = CropEncoder(model, torch.tensor([0, 2, 4]), chunk_size=4)
    rng = np.random.default_rng(0)
    image = rng.random((3, 140, 150)).astype(np.float32)
    cells = np.zeros((140, 150), np.int32)
    cells[10:20, 10:25] = 3
    cells[100:130, 120:150] = 9  # touches the border
    tissue = np.zeros((140, 150), bool)
    tissue[:, :] = True
    seen = []
    tokens = extract_tissue_tokens(ArrayReader(image), None, lambda c: torch.from_numpy(np.log1p(c)), encoder,
                                   cells, tissue, progress=seen.append)
    assert tokens.cell_ids.tolist() == [3, 9] and tokens.cell_tokens.shape == (2, 32)
    assert np.isfinite(tokens.cell_tokens).all() and (tokens.cell_weights > 0).all()
    # 140+240 = 380 -> rows 0,42,...,252 (+ none: 252 = 380-128); 150+240 = 390 -> 0..252 + 262
    assert tokens.n_cell_crops == 7 * 8 and sum(seen) == 7 * 8 + 1
    assert tokens.niche_corners.tolist() == [[0, 0]] and tokens.niche_tokens.shape == (1, 32)
    assert tokens.patch_tokens.shape == (1, 16, 16, 32)
    np.testing.assert_allclose(tokens.tissue_token, tokens.niche_tokens[0], rtol=1e-6)

    # the niche token is the mean PS token of the unmasked encoder pass on that crop
    with torch.no_grad():
        grid = model.encode([torch.from_numpy(np.log1p(image[:, :128, :128]))], [torch.tensor([0, 2, 4])]).patch_summary[0]
    np.testing.assert_allclose(tokens.niche_tokens[0], grid.reshape(-1, 32).mean(0).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cell mask"):
        extract_tissue_tokens(ArrayReader(image), None, torch.from_numpy, encoder, cells[:100], tissue)


def test_cli_writes_cell_niche_tissue_tokens_and_resumes(synthetic_dataset, tmp_path, capsys):
    import anndata as ad
    import pandas as pd

    from datamodules.store import DatasetStore
    from experiments.virtues_tokens import main
    from tests.test_virtues_reconstruct import save_random_checkpoint

    store = DatasetStore(synthetic_dataset)
    ids = store.embedding_ids()
    ckpt = save_random_checkpoint(tmp_path / "tiny.ckpt", ids, torch.stack([store.embedding(u) for u in ids]))
    out = tmp_path / "tokens"
    args = ["--ckpt", str(ckpt), "--data", str(synthetic_dataset), "--out", str(out), "--split", "test",
            "--device", "cpu", "--no-progress", "--batch-size", "16"]
    assert main(args) == 0
    (tid,) = store.tissue_ids("test")
    cells = ad.read_h5ad(out / "cells" / f"{tid}.h5ad")
    mask = store.cell_mask(tid, 1.0)
    assert cells.obs["cell_id"].tolist() == sorted(set(np.unique(mask).tolist()) - {0})
    assert cells.X.shape[1] == 32 and np.isfinite(cells.X).all()
    assert "cell_type" in cells.obs and cells.obsm["spatial"].shape == (cells.n_obs, 2)
    n_channels = len(cells.uns["mean_expression_channels"])
    panel = store.channels("imc")
    assert n_channels == int(panel["uniprot_id"].notna().sum()) < len(panel)  # channels without a UniProt id are left out
    assert cells.obsm["mean_expression"].shape == (cells.n_obs, n_channels)
    niches = np.load(out / "niches" / f"{tid}.npz")
    assert niches["tokens"].shape[1] == 32 and (niches["tissue_fraction"] >= 0.3).all()
    patches = niches["patch_tokens"].astype(np.float32)
    assert patches.shape == (len(niches["tokens"]), 16, 16, 32)
    np.testing.assert_allclose(patches.mean(axis=(1, 2)), niches["tokens"], atol=2e-3)  # float16 storage
    table = pd.read_parquet(out / "tissue_tokens.parquet")
    assert table["tissue_id"].tolist() == [tid] and "split" in table and "token_31" in table
    np.testing.assert_allclose(table.filter(like="token_").to_numpy()[0], niches["tokens"].mean(0), rtol=1e-5)

    record = out / "records" / f"{tid}.json"
    before = record.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out and record.stat().st_mtime_ns == before
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_cli_two_ranks_share_tissues_and_match_one_process(synthetic_dataset, tmp_path):
    """`--devices 2` on CPU (gloo): every tissue written once, tokens equal to a single-process run."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import anndata as ad
    import pandas as pd

    from datamodules.store import DatasetStore
    from experiments.virtues_tokens import main
    from tests.test_virtues_reconstruct import save_random_checkpoint

    repo = Path(__file__).resolve().parents[1]
    store = DatasetStore(synthetic_dataset)
    ids = store.embedding_ids()
    ckpt = save_random_checkpoint(tmp_path / "tiny.ckpt", ids, torch.stack([store.embedding(u) for u in ids]))
    common = ["--ckpt", str(ckpt), "--data", str(synthetic_dataset), "--split", "train", "--no-progress", "--batch-size", "16"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.virtues_tokens", *common, "--out", str(tmp_path / "ddp"),
                           "--accelerator", "cpu", "--devices", "2"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    writes = re.findall(r"rank (\d+) wrote tissue (\S+)", proc.stdout)
    train = store.tissue_ids("train")
    assert sorted(t for _, t in writes) == sorted(train) and {r for r, _ in writes} == {"0", "1"}
    assert main([*common, "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    for tid in train:
        a = ad.read_h5ad(tmp_path / "ddp" / "cells" / f"{tid}.h5ad")
        b = ad.read_h5ad(tmp_path / "one" / "cells" / f"{tid}.h5ad")
        np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    tables = [pd.read_parquet(tmp_path / k / "tissue_tokens.parquet").sort_values("tissue_id") for k in ("ddp", "one")]
    assert tables[0]["tissue_id"].tolist() == sorted(train)
    np.testing.assert_allclose(tables[0].filter(like="token_").to_numpy(), tables[1].filter(like="token_").to_numpy(),
                               rtol=1e-5, atol=1e-6)
