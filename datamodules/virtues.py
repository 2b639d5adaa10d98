"""VirTues's data: 128×128 multiplex crops with their marker ids, augmented and masked.

Two sampling schemes, both from the authors:

* ``random`` (paper Methods): per tissue, 4·N random 256×256 sub-images (N = how many fit) with
  >= 30 % tissue are drawn once; every epoch visits each sub-image once and takes a random 128×128
  crop inside it.
* ``tiles`` (official code): the fixed tile grid of the layout's tiling table.

Per crop (official order): preprocess (clip at the image's 99th percentile, log1p, dataset
standardisation, 3×3 Gaussian blur) → random dihedral transform → channel dropout (keep
ceil(C·U(0.75,1)) channels in random order) → independent masking (ratio U(0.6,1) per channel).

The MAE masks are drawn here and only here (``mask_ratio``): the LightningModule trains on the
batch's ``masks`` and refuses a batch without them, so the masks of a run do not depend on where
the model runs and the ratio is set in one place.

Datasets with different panels train together: marker ids index one shared marker table (the sorted
union of UniProt ids with an embedding). The collate keeps ragged per-sample lists, which is what
the packed (variable-length) attention consumes: no channel padding is ever materialised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules import layout
from datamodules.preprocess import MultiplexPreprocessor
from datamodules.resumable import EpochSampler, ResumableDataLoader, derive_seed, split_index
from datamodules.sampling import StoreCache, no_validation_split, read_padded, sample_subimages
from datamodules.statistics import require_statistics
from datamodules.store import DatasetStore, StoreError
from lightning_modules.components.virtues.masking import channel_dropout, independent_mask

log = logging.getLogger(__name__)


@dataclass
class VirTuesTissue:
    root: str
    modality: str
    tissue_id: str
    mpp: float
    channel_index: np.ndarray  # positions in the image of the channels used
    marker_ids: np.ndarray  # their rows in the shared marker table
    upper_q: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    corners: np.ndarray  # (K,2) top-left corners of sub-images (random) or tiles (tiles)
    shape: tuple[int, int]


def dihedral(crop: np.ndarray, k: int, flip: bool) -> np.ndarray:
    crop = np.rot90(crop, k, axes=(-2, -1))
    return np.ascontiguousarray(crop[..., ::-1] if flip else crop)


class VirTuesCropDataset(Dataset):
    """One item per sub-image (random) or tile (tiles).

    Indexed by an item number or by ``(epoch, item)`` (what the training sampler yields). Every random
    choice of an item (crop position, dihedral transform, channel dropout, mask) is drawn from
    ``(seed, epoch, item)``, never from the global or per-worker RNG: a resumed run, any number of
    workers and any number of ranks see the same crops; validation (epoch 0) masks are fixed.
    ``masking=False`` leaves the masks to the caller: evaluation code that scores its own mask
    strategies (``experiments.virtues_reconstruct``); training needs ``masking=True``.
    """

    def __init__(self, tissues: Sequence[VirTuesTissue], crop_size: int = 128, subimage_size: int = 256,
                 sampling: str = "random", patch_size: int = 8, augment: bool = True,
                 mask_ratio: tuple[float, float] = (0.6, 1.0), channel_dropout: float = 0.25, blur: bool = True,
                 masking: bool = True, seed: int = 0, chunk_cache_mb: float = 0):
        self.tissues = list(tissues)
        self.crop_size = crop_size
        self.subimage_size = subimage_size if sampling == "random" else crop_size
        self.sampling = sampling
        self.patch_size = patch_size
        self.augment = augment
        self.mask_ratio = tuple(mask_ratio)
        self.channel_dropout = channel_dropout
        self.masking = masking
        self.seed = seed
        self.preprocessors = [MultiplexPreprocessor(t.upper_q, t.means, t.stds, blur=blur) for t in self.tissues]
        counts = np.array([len(t.corners) for t in self.tissues])
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        if self.offsets[-1] == 0:
            raise StoreError("no crops to sample: no sub-image/tile reaches the tissue threshold in this split")
        self.cache = StoreCache(chunk_cache_mb)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch, index = split_index(index)
        seed = derive_seed(self.seed, epoch, index)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        t = int(np.searchsorted(self.offsets, index, side="right") - 1)
        tissue = self.tissues[t]
        y, x = (int(v) for v in tissue.corners[index - self.offsets[t]])
        if self.subimage_size > self.crop_size:  # random crop inside the sub-image (and inside the image)
            h, w = tissue.shape
            span_y = max(0, min(self.subimage_size, h - y) - self.crop_size)
            span_x = max(0, min(self.subimage_size, w - x) - self.crop_size)
            y, x = y + int(rng.integers(0, span_y + 1)), x + int(rng.integers(0, span_x + 1))
        image = self.cache.image(tissue.root, tissue.modality, tissue.tissue_id, tissue.mpp)
        crop = read_padded(image, y, x, self.crop_size, self.crop_size, tissue.channel_index.tolist(), fill=0)
        crop = self.preprocessors[t](crop.astype(np.float32))
        marker_ids = tissue.marker_ids
        if self.augment:
            crop = dihedral(crop, int(rng.integers(4)), bool(rng.random() < 0.5))
            if self.channel_dropout > 0:
                keep = channel_dropout(len(marker_ids), (1.0 - self.channel_dropout, 1.0), gen).numpy()
                crop, marker_ids = crop[keep], marker_ids[keep]
        grid = (self.crop_size // self.patch_size, self.crop_size // self.patch_size)
        item = {"image": torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32)),
                "marker_ids": torch.from_numpy(np.asarray(marker_ids, dtype=np.int64))}
        if self.masking:
            item["mask"] = independent_mask(len(marker_ids), *grid, self.mask_ratio, gen)
        return item


def collate_ragged(items: list[dict]) -> dict:
    """Lists of per-sample tensors (channel counts differ) plus the counts the packer needs."""
    batch = {
        "images": [it["image"] for it in items],
        "marker_ids": [it["marker_ids"] for it in items],
        "channel_counts": torch.tensor([len(it["marker_ids"]) for it in items]),
    }
    if "mask" in items[0]:
        batch["masks"] = [it["mask"] for it in items]
    return batch


class MarkerTable:
    """The shared marker vocabulary: sorted UniProt ids with an embedding, and their vectors."""

    def __init__(self, uniprot_ids: Sequence[str], embeddings: torch.Tensor):
        self.uniprot_ids = list(uniprot_ids)
        self.embeddings = embeddings
        self.index = {u: i for i, u in enumerate(self.uniprot_ids)}

    @classmethod
    def from_stores(cls, stores: Sequence[DatasetStore]) -> "MarkerTable":
        vectors: dict[str, torch.Tensor] = {}
        for store in stores:
            for uid in store.embedding_ids():
                if uid not in vectors:
                    vectors[uid] = store.embedding(uid)
        if not vectors:
            raise StoreError("no marker embeddings in any dataset (marker_embeddings/<UniProtID>.pt); "
                             "compute them with `python -m experiments.data_embeddings`")
        ids = sorted(vectors)
        dims = {u: int(vectors[u].numel()) for u in ids}
        common = max(set(dims.values()), key=list(dims.values()).count)
        odd = [u for u in ids if dims[u] != common]
        if odd:
            where = {u: s.path(layout.embedding_path(u)) for s in stores for u in odd if u in s.embedding_ids()}
            raise StoreError(f"{where[odd[0]]}: embedding has {dims[odd[0]]} values but the other markers' have {common} "
                             f"({len(odd)} such file(s): {odd[:5]}); recompute them with the same ESM-2 model")
        return cls(ids, torch.stack([vectors[u] for u in ids]))


class VirTuesDataModule(L.LightningDataModule):
    """Multiplex crops across datasets with different panels.

    Args:
        data_dirs: dataset folders (local or fsspec URLs).
        modality: modality folder to read in every dataset (e.g. `imc`, `codex`).
        mpp: resolution in µm/px (None = each dataset's first).
        sampling: `random` (paper: 4N sub-images of 256 px, random 128 crop) or `tiles` (official grid).
        min_tissue_fraction: sub-images below it are discarded (paper: 0.3).
        chunk_cache_mb: per-process budget of decoded Zarr chunks kept in memory (LRU): a 128-px crop
            decodes a whole C×256×256 chunk, which later crops of the same sub-image reuse; 0 disables it.
    """

    def __init__(
        self,
        data_dirs: list[str],
        modality: str = "imc",
        mpp: float | None = None,
        crop_size: int = 128,
        patch_size: int = 8,
        subimage_size: int = 256,
        sampling: str = "random",
        min_tissue_fraction: float = 0.3,
        mask_ratio: tuple[float, float] = (0.6, 1.0),
        channel_dropout: float = 0.25,
        blur: bool = True,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        chunk_cache_mb: float = 512,
    ):
        super().__init__()
        if sampling not in ("random", "tiles"):
            raise ValueError(f"sampling must be 'random' or 'tiles', got {sampling!r}")
        self.save_hyperparameters()
        self.data_dirs = [str(d) for d in data_dirs]
        self.marker_table: MarkerTable | None = None
        self.tissues: dict[str, list[VirTuesTissue]] = {}
        self.dropped_markers: dict[str, list[str]] = {}

    def prepare_marker_table(self) -> MarkerTable:
        if self.marker_table is None:
            self.marker_table = MarkerTable.from_stores([DatasetStore(d) for d in self.data_dirs])
        return self.marker_table

    def _usable_channels(self, store: DatasetStore, modality: str) -> tuple[np.ndarray, list[str], list[str]]:
        """Channels with qc_pass, a valid UniProt id and an embedding; the rest are reported."""
        table = self.prepare_marker_table()
        channels = store.channels(modality)
        keep: list[int] = []
        for i, row in enumerate(channels.itertuples(index=False)):
            uid = getattr(row, "uniprot_id", None)
            if bool(getattr(row, "qc_pass", True)) and layout.is_uniprot_id(uid) and uid in table.index:
                keep.append(i)
        names = [str(channels["channel_name"].iloc[i]) for i in keep]
        dropped_names = [str(n) for i, n in enumerate(channels["channel_name"]) if i not in set(keep)]
        return np.array(keep, dtype=np.int64), names, dropped_names

    def _tissue(self, store: DatasetStore, tid: str, mpp: float, channel_index: np.ndarray, names: list[str],
                rng: np.random.Generator) -> VirTuesTissue | None:
        hp = self.hparams
        table = self.prepare_marker_table()
        image = store.image(hp.modality, tid, mpp)
        uids = store.channels(hp.modality)["uniprot_id"].to_numpy()[channel_index]
        stats = require_statistics(store, hp.modality, mpp)
        uq, means, stds = stats.for_tissue(tid, names)
        mask = store.tissue_mask(tid, mpp)
        shape = image.shape[1:]
        if hp.sampling == "random":
            corners = sample_subimages(mask, shape, hp.subimage_size, hp.min_tissue_fraction, rng)
        else:
            tiles = store.tiling(mpp, hp.crop_size)
            if tiles is None:
                raise StoreError(f"{store.url}: sampling='tiles' needs {layout.tiling_path(mpp, hp.crop_size)}")
            sel = tiles[tiles["tissue_id"] == tid]
            corners = sel[["row", "col"]].to_numpy(np.int64)
        if len(corners) == 0:
            return None
        return VirTuesTissue(store.url, hp.modality, tid, mpp, channel_index, np.array([table.index[u] for u in uids]),
                             uq, means, stds, corners, shape)

    def setup(self, stage: str | None = None) -> None:
        if self.tissues:
            return
        hp = self.hparams
        rng = np.random.default_rng(hp.seed)
        self.tissues = {hp.train_split: [], hp.val_split: [], "test": []}
        for root in self.data_dirs:
            store = DatasetStore(root)
            if hp.modality not in store.modalities():
                raise StoreError(f"{root}: no modality {hp.modality!r} (has {store.modalities()})")
            mpp = hp.mpp if hp.mpp is not None else store.resolutions(hp.modality)[0]
            channel_index, names, dropped = self._usable_channels(store, hp.modality)
            if dropped:
                log.warning("%s: %d channels without a usable UniProt embedding are not used: %s", root, len(dropped), dropped)
            self.dropped_markers[root] = dropped
            for split in self.tissues:
                for tid in store.tissue_ids(split):
                    tissue = self._tissue(store, tid, mpp, channel_index, names, rng)
                    if tissue is not None:
                        self.tissues[split].append(tissue)
        log.info("VirTues crops per split: %s", {k: sum(len(t.corners) for t in v) for k, v in self.tissues.items()})

    def dataset(self, split: str, train: bool) -> VirTuesCropDataset:
        hp = self.hparams
        return VirTuesCropDataset(self.tissues[split], hp.crop_size, hp.subimage_size, hp.sampling, hp.patch_size, augment=train,
                                  mask_ratio=hp.mask_ratio, channel_dropout=hp.channel_dropout if train else 0.0, blur=hp.blur,
                                  seed=hp.seed, chunk_cache_mb=hp.chunk_cache_mb)

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        dataset = self.dataset(split, train)
        kwargs = dict(batch_size=hp.batch_size, num_workers=hp.num_workers, collate_fn=collate_ragged,
                      persistent_workers=hp.num_workers > 0)
        if train:  # a permutation per epoch from (seed, epoch); resumable mid-epoch
            return ResumableDataLoader(dataset, sampler=EpochSampler(dataset, shuffle=True, seed=hp.seed), **kwargs)
        return DataLoader(dataset, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.train_split, True)

    def val_dataloader(self) -> DataLoader:
        if not self.tissues.get(self.hparams.val_split):
            raise StoreError(no_validation_split(self.hparams.val_split, self.hparams.data_dirs))
        return self._loader(self.hparams.val_split, False)
