"""ROSIE's data: 128×128 H&E patches → mean of the centre 8×8 px of every CODEX channel.

Training examples are the paper's: every sample is cut into non-overlapping 8×8 px blocks, and the
128×128 H&E patch centred on a block is the input for that block's mean expression. Blocks whose
area is mostly background (tissue mask) are skipped. Block means of the CODEX image are computed
once per tissue at `setup` (streamed in bands), so a training step reads only the H&E crop.

Studies with different panels train together: each sample carries a presence vector, and the loss
is masked to the markers its study measured (`present`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.markers import ROSIE_PANEL, match_markers
from datamodules.preprocess import otsu_tissue_mask
from datamodules.resumable import EpochSampler, ResumableDataLoader, derive_seed, split_index
from datamodules.sampling import StoreCache, block_means, no_validation_split, read_padded, tissue_fraction_grid
from datamodules.store import DatasetStore, StoreError
from lightning_modules.components.rosie_backbone import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


def normalize_he(patches: torch.Tensor) -> torch.Tensor:
    """uint8 (…,3,H,W) → float ImageNet-normalised, the input convention of ROSIE's ConvNeXt."""
    mean = torch.tensor(IMAGENET_MEAN, device=patches.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=patches.device).view(3, 1, 1)
    return (patches.float() / 255.0 - mean) / std


@dataclass
class RosieTissue:
    """What a worker needs about one tissue; block targets are precomputed in `setup`."""

    root: str
    tissue_id: str
    he_mpp: float
    targets: np.ndarray  # (M, H/8, W/8) float32, block means in panel order (0 where absent)
    present: np.ndarray  # (M,) bool
    blocks: np.ndarray  # (K, 2) block indices (row, col) of tissue blocks


class RosiePatchDataset(Dataset):
    """One item = one 8×8 block: its H&E patch (uint8) and its target vector.

    Indexed by a block number or by ``(epoch, block)`` (what the training sampler yields): the
    augmentation is a function of ``(seed, epoch, block)`` only, so a resumed or re-sharded run
    draws the same augmentations as an uninterrupted single-process one.
    """

    def __init__(self, tissues: Sequence[RosieTissue], patch_size: int = 128, block: int = 8,
                 augment: bool = False, seed: int = 0,
                 jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.05),
                 center_crop: int | None = None, chunk_cache_mb: float = 0):
        if center_crop is not None and not 0 < center_crop <= patch_size:
            raise ValueError(f"center_crop must be in 1..patch_size={patch_size}, got {center_crop}")
        self.tissues = list(tissues)
        self.patch_size = patch_size
        self.read_size = center_crop or patch_size
        self.block = block
        self.augment = augment
        self.seed = seed
        self.jitter = jitter
        self.cache = StoreCache(chunk_cache_mb)
        counts = np.array([len(t.blocks) for t in self.tissues])
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise StoreError("no tissue blocks to sample: every tissue mask is empty for this split")

    def __len__(self) -> int:
        return self.total

    def _locate(self, index: int) -> tuple[RosieTissue, int, int]:
        t = int(np.searchsorted(self.offsets, index, side="right") - 1)
        tissue = self.tissues[t]
        by, bx = tissue.blocks[index - self.offsets[t]]
        return tissue, int(by), int(bx)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch, index = split_index(index)
        tissue, by, bx = self._locate(index)
        # the patch_size patch centred on the block, or its centre read_size px (what the model's crop keeps)
        offset = -(self.patch_size // 2) + (self.patch_size - self.read_size) // 2
        cy, cx = by * self.block + self.block // 2, bx * self.block + self.block // 2
        image = self.cache.image(tissue.root, "he", tissue.tissue_id, tissue.he_mpp)
        patch = torch.from_numpy(read_padded(image, cy + offset, cx + offset, self.read_size, self.read_size, fill=255))
        if self.augment:
            patch = self._augment(patch, np.random.default_rng(derive_seed(self.seed, epoch, index)))
        return {
            "image": normalize_he(patch),
            "target": torch.from_numpy(tissue.targets[:, by, bx].copy()),
            "present": torch.from_numpy(tissue.present.copy()),
        }

    def _augment(self, patch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The paper's augmentations: flips and brightness/contrast/saturation/hue jitter."""
        import torchvision.transforms.v2.functional as F

        if rng.random() < 0.5:
            patch = patch.flip(-1)
        if rng.random() < 0.5:
            patch = patch.flip(-2)
        b, c, s, h = self.jitter
        patch = F.adjust_brightness(patch, float(rng.uniform(1 - b, 1 + b)))
        patch = F.adjust_contrast(patch, float(rng.uniform(1 - c, 1 + c)))
        patch = F.adjust_saturation(patch, float(rng.uniform(1 - s, 1 + s)))
        return F.adjust_hue(patch, float(rng.uniform(-h, h)))


class RosieTissueDataset(Dataset):
    """Whole validation tissues (a centred region) for SSIM on stitched predictions."""

    def __init__(self, tissues: Sequence[RosieTissue], region_px: int = 128, patch_size: int = 128, block: int = 8,
                 chunk_cache_mb: float = 0):
        self.tissues = list(tissues)
        self.region_px = region_px
        self.patch_size = patch_size
        self.block = block
        self.cache = StoreCache(chunk_cache_mb)

    def __len__(self) -> int:
        return len(self.tissues)

    def __getitem__(self, index: int) -> dict:
        tissue = self.tissues[index]
        _, hb, wb = tissue.targets.shape
        nb = max(1, min(self.region_px // self.block, hb, wb))
        by0, bx0 = (hb - nb) // 2, (wb - nb) // 2
        image = self.cache.image(tissue.root, "he", tissue.tissue_id, tissue.he_mpp)
        half = self.patch_size // 2
        pad = half
        y0, x0 = by0 * self.block + self.block // 2 - half, bx0 * self.block + self.block // 2 - half
        region = read_padded(image, y0, x0, (nb - 1) * self.block + 2 * pad, (nb - 1) * self.block + 2 * pad, fill=255)
        region_t = torch.from_numpy(region)
        windows = region_t.unfold(1, self.patch_size, self.block).unfold(2, self.patch_size, self.block)  # 3,nb,nb,P,P
        patches = windows.permute(1, 2, 0, 3, 4).reshape(nb * nb, 3, self.patch_size, self.patch_size)
        return {
            "tissue_id": tissue.tissue_id,
            "patches": normalize_he(patches),
            "grid_shape": (nb, nb),
            "target_image": torch.from_numpy(tissue.targets[:, by0 : by0 + nb, bx0 : bx0 + nb].copy()),
            "present": torch.from_numpy(tissue.present.copy()),
        }


def _single_item_collate(items: list[dict]) -> dict:
    return items[0]


class RosieDataModule(L.LightningDataModule):
    """Patches from one or more datasets, split by the tissue table (patient-level splits).

    Args:
        data_dirs: dataset folders (local paths or fsspec URLs) holding `he` and `codex` modalities.
        marker_names: the output panel; default ROSIE's 50 markers. Dataset channels are matched by
            name through the alias table in `datamodules.markers`.
        target_scale: "std" (default) divides each marker by the std of its block means over the
            training tissues, so every marker weighs the same in the MSE (matching the mean-over-markers
            Pearson R the model is judged by); "p99" divides by the dataset's median per-image 99th
            percentile; "none" keeps raw intensities. The checkpoint stores the divisors, so predictions
            map back to measured units.
        min_tissue_fraction: a block is a training example when at least this fraction is tissue.
        train_samples_per_epoch: random blocks per epoch (None = every block once).
        center_crop: read only the central this-many px of each patch. Linked by the CLI from
            ``model.input_center_crop``: a model that keeps only the centre never sees the rest, so
            training need not read or augment it (the colour-contrast jitter then uses the mean of
            the pixels the model sees). Prediction still feeds whole patches; the model crops.
        chunk_cache_mb: per-process budget of decoded Zarr chunks kept in memory (LRU), so random
            crops that revisit a tile skip the decode; 0 disables it.
    """

    def __init__(
        self,
        data_dirs: list[str],
        marker_names: list[str] | None = None,
        target_modality: str = "codex",
        patch_size: int = 128,
        block: int = 8,
        batch_size: int = 256,
        num_workers: int = 0,
        min_tissue_fraction: float = 0.5,
        train_samples_per_epoch: int | None = None,
        val_samples: int | None = 4096,
        ssim_region_px: int = 128,
        target_scale: str = "std",
        augment: bool = True,
        seed: int = 0,
        center_crop: int | None = None,
        chunk_cache_mb: float = 512,
    ):
        super().__init__()
        # the panel is the model's hyperparameter (linked by the CLI); kept out of ours to avoid a clash
        self.save_hyperparameters(ignore=["marker_names"])
        marker_names = list(marker_names or ROSIE_PANEL)
        self.data_dirs = [str(d) for d in data_dirs]
        self.marker_names = marker_names
        self.tissues: dict[str, list[RosieTissue]] = {}
        self._scales: dict[str, np.ndarray] = {}
        self._block_cache: dict[tuple[str, str], np.ndarray] = {}

    @property
    def target_scales(self) -> list[float]:
        """Per-marker divisors of the first dataset: predictions × these = measured units."""
        root = self.data_dirs[0]
        if root not in self._scales:
            store = DatasetStore(root)
            names = [str(n) for n in store.channels(self.hparams.target_modality)["channel_name"]]
            self._scales[root] = self._marker_scales(store, match_markers(self.marker_names, names))
        return [float(v) for v in self._scales[root]]

    # -- building the tissue index ---------------------------------------------------------
    def _load_tissue(self, store: DatasetStore, tissue_id: str, mapping: dict[str, str], scales: np.ndarray) -> RosieTissue:
        hp = self.hparams
        he_mpp = store.resolutions("he")[0]
        codex = store.image(hp.target_modality, tissue_id, he_mpp)
        he = store.image("he", tissue_id, he_mpp)
        if codex.shape[1:] != he.shape[1:]:
            raise StoreError(f"{store.url}: tissue {tissue_id!r}: H&E {he.shape[1:]} and {hp.target_modality} "
                             f"{codex.shape[1:]} are not on the same pixel grid; co-register them first")
        names = codex.channel_names
        per_tissue = store.channels_per_tissue(hp.target_modality)
        present = np.zeros(len(self.marker_names), dtype=bool)
        targets = np.zeros((len(self.marker_names),) + tuple(s // hp.block for s in codex.shape[1:]), np.float32)
        channel_index = [names.index(mapping[m]) if m in mapping else -1 for m in self.marker_names]
        means = self._block_means(store, tissue_id, codex)
        for k, ci in enumerate(channel_index):
            if ci < 0:
                continue
            measured = True
            if per_tissue is not None and tissue_id in per_tissue.index and names[ci] in per_tissue.columns:
                measured = bool(per_tissue.loc[tissue_id, names[ci]])
            present[k] = measured
            targets[k] = means[ci] / scales[k]
        mask = store.tissue_mask(tissue_id, he_mpp)
        if mask is None:
            mask = otsu_tissue_mask(he.read_all(), "he")
        frac = tissue_fraction_grid(mask, hp.block)
        blocks = np.argwhere(frac >= hp.min_tissue_fraction)
        return RosieTissue(store.url, tissue_id, he_mpp, targets, present, blocks)

    def _block_means(self, store: DatasetStore, tissue_id: str, codex=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        """8×8 block means of a tissue's CODEX image, computed once (scales and targets share them)."""
        key = (store.url, tissue_id)
        if key not in self._block_cache:
            if codex is None:
                codex = store.image(self.hparams.target_modality, tissue_id, store.resolutions("he")[0])
            self._block_cache[key] = block_means(codex, self.hparams.block)
        return self._block_cache[key]

    def _std_scales(self, store: DatasetStore, mapping: dict[str, str]) -> np.ndarray:
        """Per-marker std of block means over the tissue blocks of the training tissues."""
        he_mpp = store.resolutions("he")[0]
        names = store.image(self.hparams.target_modality, store.tissue_ids("train")[0], he_mpp).channel_names
        values: list[np.ndarray] = []
        for tid in store.tissue_ids("train"):
            means = self._block_means(store, tid)
            mask = store.tissue_mask(tid, he_mpp)
            keep = (tissue_fraction_grid(mask, self.hparams.block) >= self.hparams.min_tissue_fraction) if mask is not None \
                else np.ones(means.shape[1:], bool)
            values.append(means[:, keep])
        pooled = np.concatenate(values, axis=1)
        scales = np.ones(len(self.marker_names), dtype=np.float32)
        for k, m in enumerate(self.marker_names):
            if m in mapping:
                scales[k] = max(float(pooled[names.index(mapping[m])].std()), 1e-6)
        return scales

    def _marker_scales(self, store: DatasetStore, mapping: dict[str, str]) -> np.ndarray:
        scales = np.ones(len(self.marker_names), dtype=np.float32)
        if self.hparams.target_scale == "none":
            return scales
        if self.hparams.target_scale == "std":
            return self._std_scales(store, mapping)
        stats = store.standardization(self.hparams.target_modality, store.resolutions("he")[0])
        if stats is None:
            log.warning("%s: no standardization statistics; targets are not scaled (compute them: python -m experiments.data_stats DIR --modality codex)", store.url)
            return scales
        for k, m in enumerate(self.marker_names):
            if m in mapping and mapping[m] in stats.upper_quantiles.columns:
                scales[k] = max(float(np.median(stats.upper_quantiles[mapping[m]])), 1e-6)
        return scales

    def setup(self, stage: str | None = None) -> None:
        if self.tissues:
            return
        from rich.progress import track

        self.tissues = {"train": [], "val": [], "test": []}
        for root in self.data_dirs:
            store = DatasetStore(root)
            if "he" not in store.modalities() or self.hparams.target_modality not in store.modalities():
                raise StoreError(f"{root}: ROSIE needs modalities 'he' and '{self.hparams.target_modality}', found {store.modalities()}")
            names = [str(n) for n in store.channels(self.hparams.target_modality)["channel_name"]]
            mapping = match_markers(self.marker_names, names)
            if not mapping:
                raise StoreError(f"{root}: none of the panel markers is among its {self.hparams.target_modality} channels {names[:8]}...")
            if root not in self._scales:
                self._scales[root] = self._marker_scales(store, mapping)
            scales = self._scales[root]
            for split in self.tissues:
                for tid in store.tissue_ids(split):
                    self.tissues[split].append(self._load_tissue(store, tid, mapping, scales))
        log.info("ROSIE tissues per split: %s", {k: len(v) for k, v in self.tissues.items()})

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None, collate=None,
                num_samples: int | None = None) -> DataLoader:
        hp = self.hparams
        kwargs = dict(batch_size=batch_size or hp.batch_size, num_workers=hp.num_workers,
                      persistent_workers=hp.num_workers > 0, collate_fn=collate)
        if shuffle:  # a fresh random subset (or permutation) per epoch from (seed, epoch); resumable mid-epoch
            return ResumableDataLoader(dataset, sampler=EpochSampler(dataset, num_samples, shuffle=True, seed=hp.seed), **kwargs)
        return DataLoader(dataset, **kwargs)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        ds = RosiePatchDataset(self.tissues["train"], hp.patch_size, hp.block, hp.augment, hp.seed,
                               center_crop=hp.center_crop, chunk_cache_mb=hp.chunk_cache_mb)
        n = min(hp.train_samples_per_epoch, ds.total) if hp.train_samples_per_epoch else None
        return self._loader(ds, shuffle=True, num_samples=n)

    def val_dataloader(self) -> list[DataLoader]:
        hp = self.hparams
        tissues = self.tissues["val"]
        if not tissues:
            raise StoreError(no_validation_split("val", self.hparams.data_dirs))
        patches = RosiePatchDataset(tissues, hp.patch_size, hp.block, False, hp.seed,
                                    center_crop=hp.center_crop, chunk_cache_mb=hp.chunk_cache_mb)
        if hp.val_samples and hp.val_samples < patches.total:
            idx = np.random.default_rng(hp.seed).choice(patches.total, hp.val_samples, replace=False)
            patches = torch.utils.data.Subset(patches, sorted(idx.tolist()))
        loaders = [self._loader(patches, shuffle=False)]
        if hp.ssim_region_px:
            loaders.append(self._loader(RosieTissueDataset(tissues, hp.ssim_region_px, hp.patch_size, hp.block,
                                                                 hp.chunk_cache_mb), False, 1, _single_item_collate))
        return loaders

    def test_dataloader(self) -> DataLoader:
        hp = self.hparams
        test = RosiePatchDataset(self.tissues["test"], hp.patch_size, hp.block, False, hp.seed,
                                 center_crop=hp.center_crop, chunk_cache_mb=hp.chunk_cache_mb)
        return self._loader(test, shuffle=False)
