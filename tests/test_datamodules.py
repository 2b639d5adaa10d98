"""ROSIE and VirTues DataModules on the synthetic dataset: shapes, targets, determinism, panels."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.rosie import RosieDataModule, normalize_he
from datamodules.sampling import sample_subimages
from datamodules.store import DatasetStore
from datamodules.virtues import VirTuesDataModule


def test_rosie_targets_are_centre_block_means(synthetic_dataset: Path) -> None:
    dm = RosieDataModule([str(synthetic_dataset)], batch_size=4, augment=False, target_scale="none")
    dm.setup("fit")
    assert len(dm.tissues["train"]) == 2 and len(dm.tissues["val"]) == 1
    ds = dm.train_dataloader().dataset
    tissue, by, bx = ds._locate(7)
    item = ds[7]
    store = DatasetStore(synthetic_dataset)
    codex = store.image("codex", tissue.tissue_id)
    he = store.image("he", tissue.tissue_id)
    names = codex.channel_names
    block = codex.read(by * 8, bx * 8, 8, 8).mean(axis=(1, 2))
    k = dm.marker_names.index("CD45")
    np.testing.assert_allclose(item["target"][k].item(), block[names.index("CD45")], rtol=1e-5)
    cy, cx = by * 8 + 4, bx * 8 + 4
    assert item["image"].shape == (3, 128, 128)
    # the patch is centred on the block: compare its interior with the H&E where it is inside the image
    y0, x0 = cy - 64, cx - 64
    if y0 >= 0 and x0 >= 0 and y0 + 128 <= he.shape[1] and x0 + 128 <= he.shape[2]:
        raw = torch.from_numpy(he.read(y0, x0, 128, 128))
        torch.testing.assert_close(item["image"], normalize_he(raw))
    assert item["present"].all()


def test_rosie_presence_mask_for_missing_markers(synthetic_dataset: Path) -> None:
    dm = RosieDataModule([str(synthetic_dataset)], marker_names=["CD45", "NotAMarker", "Pan-Cytokeratin"], batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (2, 3)
    assert batch["present"][:, 0].all() and not batch["present"][:, 1].any() and batch["present"][:, 2].all()  # alias PanCK
    assert (batch["target"][:, 1] == 0).all()


def test_rosie_loader_deterministic_for_seed(synthetic_dataset: Path) -> None:
    def first_batch() -> dict:
        L.seed_everything(3)
        dm = RosieDataModule([str(synthetic_dataset)], batch_size=4, seed=3)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(), first_batch()
    torch.testing.assert_close(a["image"], b["image"])
    torch.testing.assert_close(a["target"], b["target"])


def test_rosie_ssim_loader_yields_whole_region(synthetic_dataset: Path) -> None:
    dm = RosieDataModule([str(synthetic_dataset)], batch_size=4, ssim_region_px=64)
    dm.setup("fit")
    item = next(iter(dm.val_dataloader()[1]))
    assert item["patches"].shape == (64, 3, 128, 128) and item["grid_shape"] == (8, 8)
    assert item["target_image"].shape == (50, 8, 8)


def test_virtues_batches_are_ragged_and_masked(synthetic_dataset: Path) -> None:
    L.seed_everything(0)
    dm = VirTuesDataModule([str(synthetic_dataset)], modality="imc", batch_size=2, subimage_size=128)
    dm.setup("fit")
    assert dm.dropped_markers[str(synthetic_dataset)] == ["PNAd", "Iridium", "Iridium (V2)"]
    batch = next(iter(dm.train_dataloader()))
    counts = [len(m) for m in batch["marker_ids"]]
    assert all(30 <= c <= 40 for c in counts)  # channel dropout keeps ceil(40*U(0.75,1))
    for image, ids, mask in zip(batch["images"], batch["marker_ids"], batch["masks"]):
        assert image.shape == (len(ids), 128, 128) and mask.shape == (len(ids), 16, 16)
        per_channel = mask.flatten(1).sum(1)
        assert (per_channel >= 154).all() and (per_channel <= 256).all()
        assert len(set(ids.tolist())) == len(ids)
    assert batch["channel_counts"].tolist() == counts


def test_virtues_preprocessing_matches_stats(synthetic_dataset: Path) -> None:
    """Unaugmented crops are the store image after clip → log1p → standardise → blur."""
    from datamodules.preprocess import MultiplexPreprocessor

    dm = VirTuesDataModule([str(synthetic_dataset)], modality="imc", batch_size=1, subimage_size=128)
    dm.setup("fit")
    ds = dm.dataset("train", train=False)
    tissue = ds.tissues[0]
    item = ds[0]
    store = DatasetStore(synthetic_dataset)
    raw = store.image("imc", tissue.tissue_id).read(0, 0, 128, 128, tissue.channel_index.tolist())
    expected = MultiplexPreprocessor(tissue.upper_q, tissue.means, tissue.stds)(raw.astype(np.float32))
    np.testing.assert_allclose(item["image"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_sub_images_respect_tissue_fraction() -> None:
    mask = np.zeros((1024, 1024), bool)
    mask[:, :300] = True
    corners = sample_subimages(mask, mask.shape, 256, 0.3, np.random.default_rng(0))
    assert len(corners) > 0
    for y, x in corners:
        assert mask[y : y + 256, x : x + 256].mean() >= 0.3
    assert len(sample_subimages(mask, mask.shape, 256, 0.0, np.random.default_rng(0))) == 4 * 16


def test_rosie_center_crop_reads_the_pixels_the_model_keeps(synthetic_dataset):
    """data.center_crop (linked from model.input_center_crop) = the centre of the full 128-px patch."""
    import torch

    from datamodules.rosie import RosieDataModule
    from lightning_modules.components.rosie_backbone import RosieInputAdapter

    full = RosieDataModule([str(synthetic_dataset)], batch_size=4, augment=False)
    crop = RosieDataModule([str(synthetic_dataset)], batch_size=4, augment=False, center_crop=47)  # odd: no off-by-one
    full.setup("fit")
    crop.setup("fit")
    a, b = full.train_dataloader().dataset, crop.train_dataloader().dataset
    adapter = RosieInputAdapter(center_crop=47)
    for i in (0, len(a) // 2, len(a) - 1):
        assert b[(0, i)]["image"].shape == (3, 47, 47)
        assert torch.equal(adapter(a[(0, i)]["image"][None])[0], b[(0, i)]["image"])
    too_big = RosieDataModule([str(synthetic_dataset)], center_crop=256)
    too_big.setup("fit")
    with pytest.raises(ValueError, match="center_crop"):
        too_big.train_dataloader()
