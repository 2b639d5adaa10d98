"""The authors' stitching (``--stitching official``), for users who compare with their script.

What their prediction script does with ``--stride_size s`` (read from its source, re-implemented
here from that behaviour):

* it predicts patches every ``g = max(1, s // 2)`` px (the requested stride is *halved* "for
  more overlap"), each patch centred on the grid point ``(k·g, l·g)`` itself (not on the centre of
  a block), ``128 × 128`` px;
* pixels of a patch outside the image are *black* (0), not white;
* every prediction is splatted at native resolution over a ``2s × 2s`` window
  ``[k·g − s, k·g + s)`` (clipped to the image) with a Gaussian weight of sigma ``s/2`` centred at
  index ``s`` of the window; where the window is clipped at the top or left edge the script takes
  the *first* rows/columns of the kernel, so near those edges the weight peak is shifted. The
  result is the weighted sum divided by the summed weights (0 where nothing reached).

Here the predictions of the ``g`` grid are made by the tiled engine like any other grid
(``centre=0``, ``fill=0``), stored as the grid image, and the splat is evaluated one native
region at a time, separably (the 2-D kernel is a product of two 1-D Gaussians), so memory stays
bounded. Their optional post-processing (percentile clipping to uint8, box blur, smoothing) and
their white-threshold background filter are not reproduced: the foreground is this package's
(``--foreground all`` predicts every grid point as their default does).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def official_grid_stride(stride: int) -> int:
    """The stride their script really predicts at: half the requested one."""
    return max(1, int(stride) // 2)


def splat_taps(start: int, length: int, stride: int, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Per native pixel: indices of the grid points whose window covers it, and their 1-D weights."""
    g = official_grid_stride(stride)
    half, sigma = stride, stride / 2.0
    p = np.arange(start, start + length)
    first = np.floor((p - half) / g).astype(np.int64) + 1  # smallest k with k·g > p − half
    taps = (2 * half) // g + 2
    k = first[:, None] + np.arange(taps)[None, :]
    left = np.maximum(k * g - half, 0)  # the clipped window's first pixel
    index = p[:, None] - left  # position inside the kernel, as their script indexes it
    wgt = np.exp(-((index - half) ** 2) / (2 * sigma**2))
    valid = (k >= 0) & (k < n_points) & (k * g - half <= p[:, None]) & (p[:, None] < k * g + half)
    wgt[~valid] = 0.0
    return np.clip(k, 0, max(n_points - 1, 0)), wgt


def official_region(grid: Any, fg: np.ndarray, y0: int, x0: int, h: int, w: int, stride: int) -> np.ndarray:
    """Native ``(M, h, w)`` region at ``(y0, x0)`` of the authors' Gaussian splat of ``grid``.

    ``grid`` is the ``(M, ceil(H/g), ceil(W/g))`` prediction at ``g = stride // 2`` (numpy or zarr;
    only the points in reach are read); ``fg`` says which points were predicted.
    """
    n_y, n_x = fg.shape
    iy, wy = splat_taps(y0, h, stride, n_y)
    ix, wx = splat_taps(x0, w, stride, n_x)
    bi0, bi1 = int(iy.min()), int(iy.max()) + 1
    bj0, bj1 = int(ix.min()), int(ix.max()) + 1
    f = fg[bi0:bi1, bj0:bj1].astype(np.float64)
    p = np.asarray(grid[:, bi0:bi1, bj0:bj1], dtype=np.float64) * f
    iy, ix = iy - bi0, ix - bj0
    px = np.einsum("mbxt,xt->mbx", p[:, :, ix], wx, optimize=True)
    fx = np.einsum("bxt,xt->bx", f[:, ix], wx, optimize=True)
    num = np.einsum("mytx,yt->myx", px[:, iy], wy, optimize=True)
    den = np.einsum("ytx,yt->yx", fx[iy], wy, optimize=True)
    return (num / np.maximum(den, 1e-8)[None]).astype(np.float32)
