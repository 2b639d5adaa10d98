"""Intensity preprocessing of multiplex images (VirTues) and H&E normalisation (ROSIE).

VirTues (paper Methods; official spora-io `quantile_clipping_log1p/uq_0.99_image`, see
`docs/virtues-official-layout.md` §3.5) preprocesses each tissue, channel by channel:

1. clip to ``[0, u]`` with ``u`` = that image's 99th percentile of raw intensities inside the tissue
   mask (so one saturated spot does not set the scale of a whole channel),
2. ``log1p`` (the shifted log of scRNA-seq counts: compresses the heavy tail),
3. standardise with DATASET-wide means/stds, pooled over the tissue pixels of every tissue after
   the same clip + log1p (population std), ``(x - mean) / (std + 1e-8)``,
4. 3×3 Gaussian blur, sigma 1, reflect padding (torchvision ``gaussian_blur`` semantics).

The statistics are computed once per dataset (:mod:`datamodules.statistics`), stored in the layout and reused; crops are preprocessed on the fly with the
tissue's statistics, exactly like the official tiles (reflect padding at the crop border).

Only numpy/scipy/scikit-image (+ torch for the H&E transform): no Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from lightning_modules.components.rosie_backbone import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

EPS = 1e-8

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


def clip_log1p(x: np.ndarray, upper_q: np.ndarray) -> np.ndarray:
    """Steps 1–2: clamp to [0, upper] per channel, then log1p (float32, like the official torch code)."""
    x = np.asarray(x, dtype=np.float32)
    upper = np.asarray(upper_q, dtype=np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.log1p(np.clip(x, np.float32(0), upper))


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
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().numpy()
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
