"""An H&E image seen at another µm/px, resampled on the fly region by region (``--resample``).

ROSIE learns what a 128 px patch looks like at the training scan's resolution (the paper: 40×
scans, 0.3775 µm/px); a slide at another µm/px shows the network cells of the wrong size. Rather
than writing a resampled copy of a slide, :class:`ResampledHE` answers ``read(y, x, h, w)`` in the
model's pixel grid by reading the source pixels under the region. Every output pixel is a fixed
weighted sum of source pixels (area average when shrinking, bilinear when enlarging), whichever
region it is read in, so regions read by different ranks fit together without seams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Resolutions closer than this (relative) are the same: scanners round their pixel size.
MPP_TOLERANCE = 0.02


def same_mpp(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= MPP_TOLERANCE * float(b)


def _weights(start: int, length: int, factor: float, n_source: int) -> tuple[int, np.ndarray]:
    """``(first source index, (length, span) weights)`` of output pixels ``start ..`` along one axis;
    ``factor`` = source px per output px."""
    out = np.arange(start, start + length, dtype=np.float64)
    if factor >= 1:  # area: output pixel covers [y·f, (y+1)·f)
        lo, hi = out * factor, (out + 1) * factor
        s0, s1 = int(math.floor(lo[0])), min(n_source, int(math.ceil(hi[-1])))
        src = np.arange(s0, s1, dtype=np.float64)
        overlap = np.clip(np.minimum(hi[:, None], src[None] + 1) - np.maximum(lo[:, None], src[None]), 0, None)
        return s0, overlap / overlap.sum(axis=1, keepdims=True)
    centre = np.clip((out + 0.5) * factor - 0.5, 0, n_source - 1)  # bilinear
    k0 = np.floor(centre).astype(np.int64)
    t = centre - k0
    s0, s1 = int(k0[0]), min(n_source, int(k0[-1]) + 2)
    wgt = np.zeros((length, s1 - s0))
    rows = np.arange(length)
    wgt[rows, k0 - s0] += 1 - t
    wgt[rows, np.minimum(k0 + 1, s1 - 1) - s0] += t
    return s0, wgt


class ResampledHE:
    """``image`` (``shape (3, H, W)``, ``read``) at ``to_mpp`` instead of its own ``from_mpp``."""

    def __init__(self, image: Any, from_mpp: float, to_mpp: float):
        self.image = image
        self.factor = float(to_mpp) / float(from_mpp)
        c, h, w = image.shape
        self.source_shape = (int(h), int(w))
        self.shape = (c, max(1, round(h / self.factor)), max(1, round(w / self.factor)))
        self.dtype = np.dtype(np.uint8)
        self.name = getattr(image, "name", None) or getattr(image, "path", "H&E image")

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        sh, sw = self.source_shape
        y0, wy = _weights(y, h, self.factor, sh)
        x0, wx = _weights(x, w, self.factor, sw)
        src = np.asarray(self.image.read(y0, x0, wy.shape[1], wx.shape[1], channels), dtype=np.float64)
        out = np.einsum("yi,cij,xj->cyx", wy, src, wx, optimize=True)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def close(self) -> None:
        if hasattr(self.image, "close"):
            self.image.close()


def resample_he(image: Any, from_mpp: float, to_mpp: float) -> Any:
    """``image`` as the model sees it; the image itself when the resolutions already agree."""
    return image if same_mpp(from_mpp, to_mpp) else ResampledHE(image, from_mpp, to_mpp)
