"""Per-image upper quantiles and dataset means/stds of multiplex images (VirTues preprocessing statistics).

The standardisation in :mod:`datamodules.preprocess` needs, per tissue and channel, the 99th
percentile of raw intensities inside the tissue mask, and per dataset and channel the mean/std of
``log1p(clip(x, 0, u))`` pooled over every tissue pixel. They are computed once, streamed in row
blocks so slide-sized images never sit in memory, stored in the layout and reused
(:func:`compute_and_store_statistics`, under the dataset's write lock).
``python -m experiments.data_stats DIR --modality imc`` (re)computes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from datamodules.dataset_lock import dataset_lock
from datamodules.preprocess import HE_MODALITIES, clip_log1p, otsu_tissue_mask
from datamodules.store import DatasetStore, DatasetWriter, StoreError

log = logging.getLogger(__name__)

#: Rows of a (C,Y,X) image processed at once by the streaming statistics (bounded memory).
DEFAULT_BLOCK_ROWS = 1024
#: Images with at most this many values get their quantiles from one in-memory `np.quantile`.
IN_MEMORY_ELEMENTS = 1 << 27


# ============================================================================================
# Per-image upper quantiles
# ============================================================================================


def _masked_values(channel: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return channel.reshape(-1) if mask is None else channel[mask]


def upper_quantiles(image: np.ndarray, tissue_mask: np.ndarray | None = None, q: float = 0.99) -> np.ndarray:
    """Per-channel `q` quantile of an in-memory (C,Y,X) image over its tissue pixels.

    Same definition as ``np.quantile`` (linear interpolation) on the tissue pixels of each channel.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (C,Y,X), got shape {image.shape}")
    mask = _check_mask(tissue_mask, image.shape[1:])
    if mask is not None and not mask.any():
        raise ValueError("tissue mask is empty: no pixel to compute the upper quantile over")
    return np.array([np.quantile(_masked_values(image[c], mask), q) for c in range(image.shape[0])], dtype=np.float64)


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.shape != tuple(shape):
        raise ValueError(f"tissue mask shape {mask.shape} disagrees with the image's {tuple(shape)}")
    return mask


def iter_row_blocks(image: Any, block_rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(y0, block (C,h,X)) over an image: numpy array, zarr array, or store `ImageArray` (`.read`)."""
    c, h, w = image.shape
    for y0 in range(0, h, block_rows):
        bh = min(block_rows, h - y0)
        if hasattr(image, "read"):
            yield y0, np.asarray(image.read(y0, 0, bh, w))
        else:
            yield y0, np.asarray(image[:, y0 : y0 + bh, :])


def upper_quantiles_streaming(
    image: Any,
    tissue_mask: np.ndarray | None = None,
    q: float = 0.99,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    bins: int = 4096,
    max_collect: int = 1 << 20,
) -> np.ndarray:
    """Exact `np.quantile` of each channel over tissue pixels, reading the image in row blocks.

    Whole slides do not fit in memory channel by channel, so the two order statistics that
    ``np.quantile``'s linear interpolation needs are found by repeated histogram refinement: each
    pass over the blocks narrows a half-open value interval known to hold the wanted rank until few
    enough values fall inside it to be collected and sorted. Intervals are defined by comparisons
    only, so the counts are exact; the result equals ``np.quantile`` up to the float rounding of the
    final interpolation.
    """
    c, h, w = image.shape
    mask = _check_mask(tissue_mask, (h, w))

    def blocks() -> Iterator[np.ndarray]:
        for y0, block in iter_row_blocks(image, block_rows):
            m = None if mask is None else mask[y0 : y0 + block.shape[1]]
            # float64 so that comparisons with interval ends are exact (NumPy 2 would otherwise
            # compare float32 pixels with Python floats rounded to float32)
            yield from ((ci, _masked_values(block[ci], m).astype(np.float64)) for ci in range(c))  # type: ignore[misc]

    # pass 0: count, min, max per channel
    n = np.zeros(c, dtype=np.int64)
    lo = np.full(c, np.inf)
    hi = np.full(c, -np.inf)
    for ci, v in blocks():
        if v.size:
            n[ci] += v.size
            lo[ci] = min(lo[ci], float(v.min()))
            hi[ci] = max(hi[ci], float(v.max()))
    if (n == 0).any():
        raise ValueError("tissue mask is empty: no pixel to compute the upper quantile over")
    pos = (n - 1) * q
    k = np.floor(pos).astype(np.int64)
    frac = pos - k
    out = np.empty(c, dtype=np.float64)
    ranks = [(ci, int(k[ci])) for ci in range(c)] + [(ci, int(k[ci]) + 1) for ci in range(c) if frac[ci] > 0 and k[ci] + 1 < n[ci]]
    values = _select_ranks(blocks, ranks, lo, hi, bins, max_collect)
    for ci in range(c):
        a = values[(ci, int(k[ci]))]
        b = values.get((ci, int(k[ci]) + 1), a)
        # np.quantile's linear interpolation ("lerp" with the same rounding rule as numpy)
        t = frac[ci]
        out[ci] = a + t * (b - a) if t < 0.5 else b - (b - a) * (1 - t)
    return out


def _select_ranks(
    blocks: Callable[[], Iterator[tuple[int, np.ndarray]]],
    ranks: list[tuple[int, int]],
    lo: np.ndarray,
    hi: np.ndarray,
    bins: int,
    max_collect: int,
) -> dict[tuple[int, int], float]:
    """Value of each wanted (channel, 0-based rank) by histogram refinement over `blocks()`."""
    # state per wanted rank: half-open interval [a, b) that holds it; b = next float above max
    state = {key: [float(lo[key[0]]), float(np.nextafter(hi[key[0]], np.inf))] for key in ranks}
    result: dict[tuple[int, int], float] = {}
    while len(result) < len(ranks):
        pending = [key for key in ranks if key not in result]
        below = {key: 0 for key in pending}
        counts = {key: np.zeros(bins, dtype=np.int64) for key in pending}
        edges = {key: np.linspace(state[key][0], state[key][1], bins + 1) for key in pending}
        for key in pending:  # guarantee the edges span exactly [a, b)
            edges[key][0], edges[key][-1] = state[key]
        by_channel: dict[int, list[tuple[int, int]]] = {}
        for key in pending:
            by_channel.setdefault(key[0], []).append(key)
        for ci, v in blocks():
            for key in by_channel.get(ci, ()):
                a, b = state[key]
                below[key] += int(np.count_nonzero(v < a))
                inside = v[(v >= a) & (v < b)]
                idx = np.searchsorted(edges[key], inside, side="right") - 1
                counts[key] += np.bincount(idx, minlength=bins)[:bins]
        collect: dict[tuple[int, int], list[np.ndarray]] = {}
        for key in pending:
            r = key[1] - below[key]
            cum = np.cumsum(counts[key])
            b_idx = int(np.searchsorted(cum, r, side="right"))
            a_new, b_new = float(edges[key][b_idx]), float(edges[key][b_idx + 1])
            in_bin = int(counts[key][b_idx])
            if np.nextafter(a_new, np.inf) >= b_new:  # a single representable value
                result[key] = a_new
            elif in_bin <= max_collect:
                state[key] = [a_new, b_new]
                collect[key] = []
            else:
                state[key] = [a_new, b_new]
        if collect:
            below_c = {key: 0 for key in collect}
            for ci, v in blocks():
                for key in collect:
                    if key[0] != ci:
                        continue
                    a, b = state[key]
                    below_c[key] += int(np.count_nonzero(v < a))
                    collect[key].append(v[(v >= a) & (v < b)])
            for key, parts in collect.items():
                vals = np.sort(np.concatenate(parts))
                result[key] = float(vals[key[1] - below_c[key]])
    return result


# ============================================================================================
# Dataset-wide means / stds
# ============================================================================================


class RunningMoments:
    """Per-channel count/mean/M2 merged with Chan et al.'s parallel formula (float64, stable)."""

    def __init__(self, n_channels: int):
        self.count = np.zeros(n_channels, dtype=np.float64)
        self.mean = np.zeros(n_channels, dtype=np.float64)
        self.m2 = np.zeros(n_channels, dtype=np.float64)

    def update(self, channel: int, values: np.ndarray) -> None:
        if values.size == 0:
            return
        values = values.astype(np.float64, copy=False)
        n_b = float(values.size)
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n_a, mean_a = self.count[channel], self.mean[channel]
        n = n_a + n_b
        delta = mean_b - mean_a
        self.mean[channel] = mean_a + delta * n_b / n
        self.m2[channel] += m2_b + delta * delta * n_a * n_b / n
        self.count[channel] = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(means, population stds); NaN for channels that saw no pixel."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(self.count > 0, self.mean, np.nan)
            stds = np.where(self.count > 0, np.sqrt(self.m2 / self.count), np.nan)
        return means, stds


def dataset_mean_std(
    items: Iterable[tuple],
    n_channels: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled per-channel mean and population std of clip+log1p intensities over tissue pixels.

    `items` yields ``(image (C,Y,X), tissue_mask (Y,X) | None, upper_q (C,))`` or, when tissues
    measure different subsets of a panel, ``(image, mask, upper_q, channel_index)`` where
    ``channel_index[i]`` is the dataset channel of image channel ``i`` (then pass `n_channels`).
    Images are read in row blocks, so a whole dataset never sits in memory.
    """
    moments: RunningMoments | None = None if n_channels is None else RunningMoments(n_channels)
    for item in items:
        image, mask, upper_q = item[:3]
        index = None if len(item) < 4 else list(item[3])
        c, h, w = image.shape
        if moments is None:
            moments = RunningMoments(c)
        index = index if index is not None else list(range(c))
        if len(index) != c or len(np.asarray(upper_q).reshape(-1)) != c:
            raise ValueError(f"image has {c} channels but got {len(upper_q)} upper quantiles and {len(index)} channel indices")
        mask = _check_mask(mask, (h, w))
        for y0, block in iter_row_blocks(image, block_rows):
            m = None if mask is None else mask[y0 : y0 + block.shape[1]]
            x = clip_log1p(block, upper_q)
            for ci in range(c):
                moments.update(index[ci], _masked_values(x[ci], m))
    if moments is None:
        raise ValueError("no image to compute dataset statistics from")
    return moments.result()


# ============================================================================================
# Statistics in the store
# ============================================================================================


def compute_and_store_statistics(
    store_root: str,
    modality: str,
    mpp: float,
    force: bool = False,
    q: float = 0.99,
    reuse_upper_quantiles: bool = False,
    stale_tissues: Iterable[str] = (),
    block_rows: int = DEFAULT_BLOCK_ROWS,
    progress: bool = False,
) -> Any:
    """Compute per-image upper quantiles and dataset means/stds of `modality` at `mpp`; store them.

    Computed once and reused: when the store already has them and `force` is False they are just
    returned. `reuse_upper_quantiles` keeps existing per-tissue quantile rows (except those in
    `stale_tissues`) so that adding one tissue does not re-read every image for its quantiles; the
    pooled means/stds always need one pass over every image.

    Tissues without a stored tissue mask fall back to an Otsu mask computed on the fly (not stored),
    with a warning. Channels a tissue does not measure (``channels_per_tissue`` False) get NaN
    quantiles and do not contribute to the pooled statistics.
    """
    # under the dataset's write lock: statistics never miss a tissue that a concurrent ingest adds
    with dataset_lock(store_root):
        store = DatasetStore(store_root)
        existing = store.standardization(modality, mpp)
        if existing is not None and not force:
            return existing
        if modality in HE_MODALITIES:
            raise ValueError("standardization statistics are for multiplex modalities, not H&E (use HENormalize)")
        channel_names = [str(c) for c in store.channels(modality)["channel_name"]]
        name_to_idx = {n: i for i, n in enumerate(channel_names)}
        per_tissue = store.channels_per_tissue(modality)
        tissue_ids = store.image_ids(modality, mpp)
        if not tissue_ids:
            raise StoreError(f"{store.path(modality)}: no {modality} image at {mpp} µm/px to compute statistics from")
        stale = set(stale_tissues)
        old_uq = existing.upper_quantiles if (existing is not None and reuse_upper_quantiles) else None

        uq_rows: dict[str, np.ndarray] = {}
        plan: list[tuple[str, Any, np.ndarray | None, list[int], list[int]]] = []
        iterator: Iterable[str] = tissue_ids
        if progress:
            iterator = tqdm(tissue_ids, desc=f"{modality} statistics", unit="tissue")
        for tid in iterator:
            img = store.image(modality, tid, mpp)
            names = list(img.channel_names)
            unknown = [n for n in names if n not in name_to_idx]
            if unknown:
                raise StoreError(f"{img.path}: channels {unknown} are not in {modality}/channels.parquet")
            measured = [i for i, n in enumerate(names)
                        if per_tissue is None or tid not in per_tissue.index or n not in per_tissue.columns
                        or bool(per_tissue.loc[tid, n])]
            mask = store.tissue_mask(tid, mpp)
            if mask is None:
                log.warning("%s: no tissue mask for %s; using an Otsu mask computed on the fly", store.name, tid)
                mask = otsu_tissue_mask(img.read_all(), modality)
            if not mask.any():
                raise StoreError(f"{store.path(f'segmentations')}: tissue mask of {tid!r} is empty; fix the mask or drop the tissue")
            row = np.full(len(channel_names), np.nan)
            if old_uq is not None and tid in old_uq.index and tid not in stale and all(names[i] in old_uq.columns for i in measured):
                vals = old_uq.loc[tid, [names[i] for i in measured]].to_numpy(np.float64)
            else:
                view = _ChannelView(img, measured)
                c, h, w = view.shape
                if c * h * w <= IN_MEMORY_ELEMENTS:  # np.quantile on the whole image: ~10x faster
                    vals = upper_quantiles(view.read(0, 0, h, w), mask, q=q)
                else:
                    vals = upper_quantiles_streaming(view, mask, q=q, block_rows=block_rows)
            for i, v in zip(measured, vals):
                row[name_to_idx[names[i]]] = v
            uq_rows[tid] = row
            plan.append((tid, img, mask, measured, [name_to_idx[names[i]] for i in measured]))

        def items() -> Iterator[tuple]:
            for tid, img, mask, measured, dataset_idx in plan:
                yield _ChannelView(img, measured), mask, uq_rows[tid][dataset_idx], dataset_idx

        means, stds = dataset_mean_std(items(), n_channels=len(channel_names), block_rows=block_rows)
        uq_df = pd.DataFrame.from_dict(uq_rows, orient="index", columns=channel_names)
        uq_df.index.name = "tissue_id"
        writer = DatasetWriter.open(store_root, create=False)
        writer.write_standardization(modality, mpp, uq_df, pd.Series(means, index=channel_names), pd.Series(stds, index=channel_names))
        return DatasetStore(store_root).standardization(modality, mpp)


class _ChannelView:
    """A channel subset of an image that supports the `.shape` + `.read` protocol of the store."""

    def __init__(self, image: Any, channels: Sequence[int]):
        self.image = image
        self.channels = list(channels)
        c, h, w = image.shape
        self.shape = (len(self.channels), h, w)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self.channels == list(range(self.image.shape[0])):
            return np.asarray(self.image.read(y, x, h, w))
        return np.asarray(self.image.read(y, x, h, w, channels=self.channels))


def load_statistics(store_root: str, modality: str, mpp: float) -> Any:
    """The stored statistics (`StandardizationStats`) or None; see :func:`compute_and_store_statistics`."""
    return DatasetStore(store_root).standardization(modality, mpp)


def require_statistics(store: DatasetStore, modality: str, mpp: float):  # type: ignore[no-untyped-def]
    """The stored statistics, or an error saying which command computes them."""
    stats = store.standardization(modality, mpp)
    if stats is None:
        raise StoreError(f"{store.url}: no standardization statistics for {modality} at {mpp:g} µm/px; compute them with "
                         f"`python -m experiments.data_stats {store.url} --modality {modality}`")
    return stats
