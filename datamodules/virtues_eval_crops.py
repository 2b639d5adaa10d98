"""Evaluation crops of a dataset split for VirTues: the whole non-overlapping crop grid of each tissue
(enough tissue in each crop), preprocessed exactly as in training by the training dataset class, at
most ``max_crops`` per dataset drawn with a seed (:class:`~analysis.virtues_reconstruction.EvalCrop`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from analysis.virtues_reconstruction import EvalCrop, MarkerVocabulary
from datamodules.preprocess import MultiplexPreprocessor
from datamodules.sampling import tissue_fraction_grid
from datamodules.statistics import require_statistics
from datamodules.store import DatasetStore
from datamodules.virtues import VirTuesCropDataset, VirTuesTissue

log = logging.getLogger(__name__)


def grid_corners(shape: tuple[int, int], crop: int, mask: np.ndarray | None, min_tissue: float) -> np.ndarray:
    """Top-left corners of the whole non-overlapping ``crop`` squares with enough tissue."""
    H, W = shape
    if H < crop or W < crop:
        return np.zeros((1, 2), dtype=np.int64)  # one zero-padded crop, as the training loader does
    ys, xs = np.meshgrid(np.arange(H // crop) * crop, np.arange(W // crop) * crop, indexing="ij")
    corners = np.stack([ys.ravel(), xs.ravel()], 1).astype(np.int64)
    if mask is None or min_tissue <= 0:
        return corners
    frac = tissue_fraction_grid(mask, crop)
    return corners[frac.ravel() >= min_tissue]


def load_crops(
    store: DatasetStore,
    name: str,
    modality: str,
    split: str,
    keep: Sequence[int],
    vocab: MarkerVocabulary,
    max_crops: int,
    seed: int,
    crop_size: int = 128,
    patch_size: int = 8,
    blur: bool = True,
    mpp: float | None = None,
    min_tissue: float = 0.3,
) -> list[EvalCrop]:
    """Grid crops of one dataset split, preprocessed by the training dataset class."""
    mpp = mpp if mpp is not None else store.resolutions(modality)[0]
    stats = require_statistics(store, modality, mpp)
    channels = store.channels(modality).reset_index(drop=True)
    measured_table = store.channels_per_tissue(modality)
    row_of = {u: i for i, u in enumerate(vocab.uniprot_ids)}
    candidates: list[tuple[VirTuesTissue, int]] = []
    tissues: list[VirTuesTissue] = []
    for tid in store.tissue_ids(split):
        if tid not in store.image_ids(modality, mpp):
            log.warning("%s: tissue %s (split %s) has no %s image at %g µm/px; skipped", store.url, tid, split, modality, mpp)
            continue
        idx = list(keep)
        if measured_table is not None and tid in measured_table.index:
            measured = measured_table.loc[tid]
            unmeasured = [i for i in idx if channels.loc[i, "channel_name"] in measured.index
                          and not bool(measured[channels.loc[i, "channel_name"]])]
            if unmeasured:
                log.info("%s/%s: %d channels not measured in this tissue are left out: %s", name, tid, len(unmeasured),
                         [channels.loc[i, "channel_name"] for i in unmeasured])
            idx = [i for i in idx if i not in set(unmeasured)]
        if not idx:
            continue
        names = [str(channels.loc[i, "channel_name"]) for i in idx]
        uids = [str(channels.loc[i, "uniprot_id"]) for i in idx]
        image = store.image(modality, tid, mpp)
        shape = tuple(image.shape[1:])
        corners = grid_corners(shape, crop_size, store.tissue_mask(tid, mpp), min_tissue)
        if not len(corners):
            continue
        uq, means, stds = stats.for_tissue(tid, names)
        tissue = VirTuesTissue(store.url, modality, tid, mpp, np.array(idx, dtype=np.int64),
                               np.array([row_of[u] for u in uids], dtype=np.int64), uq, means, stds, corners, shape)
        tissues.append(tissue)
        candidates += [(tissue, k) for k in range(len(corners))]
    if not candidates:
        return []
    order = np.arange(len(candidates))
    if max_crops and len(candidates) > max_crops:
        order = np.sort(np.random.default_rng(seed).choice(len(candidates), max_crops, replace=False))
    dataset = VirTuesCropDataset(tissues, crop_size=crop_size, subimage_size=crop_size, sampling="tiles",
                                 patch_size=patch_size, augment=False, channel_dropout=0.0, blur=blur, masking=False)
    position = {id(t): i for i, t in enumerate(tissues)}
    crops = []
    for j in order:
        tissue, k = candidates[j]
        t = position[id(tissue)]
        item = dataset[int(dataset.offsets[t] + k)]
        names = [str(channels.loc[i, "channel_name"]) for i in tissue.channel_index]
        uids = [str(channels.loc[i, "uniprot_id"]) for i in tissue.channel_index]
        y, x = (int(v) for v in tissue.corners[k])
        crops.append(EvalCrop(name, tissue.tissue_id, y, x, item["image"], item["marker_ids"], names, uids,
                              MultiplexPreprocessor(tissue.upper_q, tissue.means, tissue.stds, blur=blur)))
    return crops
