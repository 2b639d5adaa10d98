"""Intensity preprocessing of multiplex images (VirTues) and H&E normalisation (ROSIE).

VirTues (paper Methods; official spora-io `quantile_clipping_log1p/uq_0.99_image`, see
`../shared/docs/virtues-official-layout.md` §3.5) preprocesses each tissue, channel by channel:

1. clip to ``[0, u]`` with ``u`` = that image's 99th percentile of raw intensities inside the tissue
   mask (so one saturated spot does not set the scale of a whole channel),
2. ``log1p`` (the shifted log of scRNA-seq counts: compresses the heavy tail),
3. standardise with DATASET-wide means/stds, pooled over the tissue pixels of every tissue after
   the same clip + log1p (population std), ``(x - mean) / (std + 1e-8)``,
4. 3×3 Gaussian blur, sigma 1, reflect padding (torchvision ``gaussian_blur`` semantics).

The statistics are computed once per dataset, stored in the layout through
:class:`datamodules.store.DatasetWriter` and reused; crops are preprocessed on the fly with the
tissue's statistics, exactly like the official tiles (reflect padding at the crop border).

Only numpy/scipy/scikit-image (+ torch for the H&E transform): no Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from datamodules.dataset_lock import dataset_lock
from lightning_modules.components.rosie_backbone import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

EPS = 1e-8
#: Rows of a (C,Y,X) image processed at once by the streaming statistics (bounded memory).
DEFAULT_BLOCK_ROWS = 1024
#: Images with at most this many values get their quantiles from one in-memory `np.quantile`.
IN_MEMORY_ELEMENTS = 1 << 27

#: ROSIE normalises H&E with the ImageNet statistics of its pretrained ConvNeXt.


# ============================================================================================
# Blur
# ============================================================================================


def gaussian_kernel1d(kernel_size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """The normalised 1-D kernel torchvision builds (`_get_gaussian_kernel1d`)."""
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size, dtype=np.float64)
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(image: np.ndarray, kernel_size: int = 3, sigma: float = 1.0) -> np.ndarray:
    """Per-channel Gaussian blur of (..., Y, X) equal to torchvision's `gaussian_blur`.

    torchvision pads with torch "reflect" (mirror without repeating the edge pixel), which is
    scipy's ``mode='mirror'``; its 2-D kernel is the outer product of the 1-D one, so two separable
    passes give the same result up to float rounding.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    image = np.asarray(image, dtype=np.float32)
    if min(image.shape[-2:]) <= kernel_size // 2:
        raise ValueError(f"image of spatial size {image.shape[-2:]} is too small for reflect padding of {kernel_size // 2}")
    weights = gaussian_kernel1d(kernel_size, sigma).astype(np.float32)
    out = ndimage.correlate1d(image, weights, axis=-2, mode="mirror")
    return ndimage.correlate1d(out, weights, axis=-1, mode="mirror")


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


def clip_log1p(x: np.ndarray, upper_q: np.ndarray) -> np.ndarray:
    """Steps 1–2: clamp to [0, upper] per channel, then log1p (float32, like the official torch code)."""
    x = np.asarray(x, dtype=np.float32)
    upper = np.asarray(upper_q, dtype=np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.log1p(np.clip(x, np.float32(0), upper))


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
# The crop preprocessor
# ============================================================================================


class MultiplexPreprocessor:
    """clip → log1p → standardise → blur for one tissue's crop (C,h,w) → float32.

    Built from the tissue's upper quantiles and the dataset's means/stds in the crop's channel
    order (see :meth:`from_stats`). Blur pads the crop border by reflection, like the official
    pipeline does on its tiles, so a crop is processed exactly as an official tile would be.
    """

    def __init__(self, upper_q: Sequence[float], means: Sequence[float], stds: Sequence[float], blur: bool = True,
                 kernel_size: int = 3, sigma: float = 1.0):
        self.upper_q = np.asarray(upper_q, dtype=np.float32).reshape(-1)
        self.means = np.asarray(means, dtype=np.float32).reshape(-1)
        self.stds = np.asarray(stds, dtype=np.float32).reshape(-1)
        if not (len(self.upper_q) == len(self.means) == len(self.stds)):
            raise ValueError(f"upper_q, means, stds lengths differ: {len(self.upper_q)}, {len(self.means)}, {len(self.stds)}")
        for name, arr in (("upper_q", self.upper_q), ("means", self.means), ("stds", self.stds)):
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} holds NaN/inf for channels {np.flatnonzero(~np.isfinite(arr)).tolist()}: "
                                 "recompute the standardization statistics or drop those channels")
        self.blur = blur
        self.kernel_size = kernel_size
        self.sigma = sigma

    @classmethod
    def from_stats(cls, stats: Any, tissue_id: str, channel_names: Sequence[str], blur: bool = True) -> "MultiplexPreprocessor":
        """From a store `StandardizationStats` (rows picked by tissue id, columns by channel name)."""
        uq, means, stds = stats.for_tissue(tissue_id, list(channel_names))
        return cls(uq, means, stds, blur=blur)

    def subset(self, channels: Sequence[int]) -> "MultiplexPreprocessor":
        idx = list(channels)
        return MultiplexPreprocessor(self.upper_q[idx], self.means[idx], self.stds[idx], self.blur, self.kernel_size, self.sigma)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[0] != len(self.upper_q):
            raise ValueError(f"crop must be (C={len(self.upper_q)}, h, w), got shape {crop.shape}")
        x = clip_log1p(crop, self.upper_q)
        x = (x - self.means[:, None, None]) / (self.stds[:, None, None] + np.float32(EPS))
        if self.blur:
            x = gaussian_blur(x, self.kernel_size, self.sigma)
        return x.astype(np.float32, copy=False)

    def invert(self, x: np.ndarray, scale_to_unit: bool = True) -> np.ndarray:
        """Undo standardisation and log1p (not the blur or the clip), for figures.

        With `scale_to_unit`, divide by the upper quantile, as the VirTues figures do, giving [0, 1].
        """
        x = np.asarray(x, dtype=np.float32)
        raw = np.expm1(x * (self.stds[:, None, None] + np.float32(EPS)) + self.means[:, None, None])
        if scale_to_unit:
            raw = np.clip(raw / np.maximum(self.upper_q[:, None, None], np.float32(EPS)), 0, 1)
        return raw


# ============================================================================================
# Tissue masks
# ============================================================================================

HE_MODALITIES = ("he",)


def otsu_tissue_mask(image: np.ndarray, modality: str, smooth_sigma: float = 2.0, min_object_fraction: float = 1e-3,
                     min_object_px: int = 64, channels_last: bool | None = None) -> np.ndarray:
    """Approximate tissue mask: Otsu threshold on a grey signal, hole filling, small-object removal.

    VirTues: "Otsu thresholding followed by automatic hole filling". The grey signal is
    * H&E (`modality == 'he'`, RGB (3,Y,X) or (Y,X,3)): luminance, tissue = DARKER than the
      threshold (the glass background is bright);
    * multiplex: the sum over channels of log1p(intensity / channel's 99th percentile), so that every
      marker contributes on the same scale and one bright channel cannot dominate; tissue = brighter.
    A light Gaussian smoothing (`smooth_sigma` px, 0 = none) makes the mask follow tissue, not cells.
    Objects smaller than max(`min_object_px`, `min_object_fraction` × image area) are removed.
    """
    from skimage.filters import threshold_otsu

    grey, darker = tissue_signal(image, modality, channels_last)
    if smooth_sigma > 0:
        grey = ndimage.gaussian_filter(grey, smooth_sigma)
    if np.ptp(grey) == 0:
        return np.zeros(grey.shape, dtype=bool)
    thr = threshold_otsu(grey)
    mask = grey < thr if darker else grey > thr
    mask = ndimage.binary_fill_holes(mask)
    min_size = max(int(min_object_px), int(min_object_fraction * mask.size))
    return remove_small_components(mask, min_size)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 4-connected components with fewer than `min_size` pixels.

    Written out (label + bincount) because scikit-image 0.26 changed `remove_small_objects`'
    size argument (`min_size` → `max_size`, off by one); this keeps one meaning on every version.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def tissue_signal(image: np.ndarray, modality: str, channels_last: bool | None = None) -> tuple[np.ndarray, bool]:
    """The 2-D grey signal Otsu is applied to, and whether tissue is darker than background."""
    image = np.asarray(image)
    if modality in HE_MODALITIES:
        from skimage.color import rgb2gray

        if channels_last is None:
            channels_last = image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] not in (3, 4)
        rgb = image[..., :3] if channels_last else np.moveaxis(image[:3], 0, -1)
        if rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"H&E image must be RGB, got shape {image.shape}")
        return rgb2gray(rgb).astype(np.float64), True
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"multiplex image must be (C,Y,X), got shape {image.shape}")
    x = image.astype(np.float32)
    scale = np.quantile(x.reshape(x.shape[0], -1), 0.99, axis=1).astype(np.float32)
    scale = np.where(scale > 0, scale, np.maximum(x.reshape(x.shape[0], -1).max(axis=1), 1)).astype(np.float32)
    grey = np.log1p(np.clip(x, 0, None) / scale[:, None, None]).sum(axis=0)
    return grey.astype(np.float64), False


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
        import pandas as pd

        from datamodules.store import DatasetStore, DatasetWriter, StoreError

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
            from tqdm import tqdm

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
    from datamodules.store import DatasetStore

    return DatasetStore(store_root).standardization(modality, mpp)


# ============================================================================================
# H&E (ROSIE)
# ============================================================================================


class HENormalize:
    """uint8 RGB H&E → float32 CHW normalised with ImageNet mean/std (ROSIE's ConvNeXt input).

    Accepts numpy or torch, (3,H,W) (the store layout) or (H,W,3) (`channels_last=True`), with an
    optional leading batch dimension; returns the same library's type, channels first.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, channels_last: bool = False):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.channels_last = channels_last

    def __call__(self, image: Any) -> Any:
        import torch

        is_torch = isinstance(image, torch.Tensor)
        if is_torch:
            if image.dtype != torch.uint8:
                raise TypeError(f"H&E must be uint8 RGB, got {image.dtype}")
            x = image.float()
            if self.channels_last:
                x = x.movedim(-1, -3)
            _check_rgb(tuple(x.shape))
            mean = torch.as_tensor(self.mean, device=x.device).view(3, 1, 1)
            std = torch.as_tensor(self.std, device=x.device).view(3, 1, 1)
            return (x / 255.0 - mean) / std
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise TypeError(f"H&E must be uint8 RGB, got {image.dtype}")
        x = image.astype(np.float32)
        if self.channels_last:
            x = np.moveaxis(x, -1, -3)
        _check_rgb(x.shape)
        return ((x / np.float32(255.0) - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32)

    def inverse(self, x: Any, channels_last: bool = True) -> np.ndarray:
        """Normalised CHW → uint8 RGB (HWC by default) for figures."""
        try:
            import torch

            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().float().numpy()
        except ImportError:  # pragma: no cover
            pass
        x = np.asarray(x, dtype=np.float32)
        _check_rgb(x.shape)
        rgb = (x * self.std[:, None, None] + self.mean[:, None, None]) * 255.0
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        return np.moveaxis(rgb, -3, -1) if channels_last else rgb


def _check_rgb(shape: tuple[int, ...]) -> None:
    if len(shape) < 3 or shape[-3] != 3:
        raise ValueError(f"expected an RGB image with channels at axis -3 (…,3,H,W), got shape {shape}")


__all__ = [
    "EPS",
    "HENormalize",
    "MultiplexPreprocessor",
    "RunningMoments",
    "clip_log1p",
    "compute_and_store_statistics",
    "dataset_mean_std",
    "gaussian_blur",
    "gaussian_kernel1d",
    "load_statistics",
    "otsu_tissue_mask",
    "remove_small_components",
    "tissue_signal",
    "upper_quantiles",
    "upper_quantiles_streaming",
]
