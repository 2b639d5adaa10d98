"""Optional Gaussian overlap blend of the stride-grid predictions to native resolution.

Blending
    Like the authors' inference script, each patch prediction can be spread over a
    ``kernel``×``kernel`` px window around its block centre (default ``kernel = 2s``) with a
    Gaussian weight (sigma ``kernel/4``), normalised by the summed weights of the foreground
    blocks -> a native-resolution ``(M, H, W)`` image. Background pixels with no foreground block in
    reach stay 0. The authors' script also halves the patch stride before blending; here the grid
    is the one of ``--stride`` (pass a smaller stride for more overlap).

It works on a finished grid (in memory or a Zarr array), one native region at a time, so it
needs no model and never the whole native image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _blend_taps(start: int, length: int, stride: int, kernel: float, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Per native pixel: indices of the blocks whose window reaches it, and their Gaussian weights."""
    centre = np.arange(start, start + length) + 0.5  # pixel centres
    half, sigma = kernel / 2.0, kernel / 4.0
    first = np.ceil((centre - half) / stride - 0.5).astype(np.int64)
    taps = int(math.ceil(kernel / stride)) + 1
    idx = first[:, None] + np.arange(taps)[None, :]
    d = centre[:, None] - (idx * stride + stride / 2.0)
    wgt = np.exp(-(d**2) / (2 * sigma**2))
    wgt[(np.abs(d) >= half) | (idx < 0) | (idx >= n_blocks)] = 0.0
    return np.clip(idx, 0, max(n_blocks - 1, 0)), wgt


def blend_region(grid: Any, fg: np.ndarray, y0: int, x0: int, h: int, w: int, stride: int,
                 kernel: float | None = None) -> np.ndarray:
    """Native ``(M, h, w)`` Gaussian-weighted blend of the stride-grid predictions around ``(y0, x0)``.

    ``grid`` is any ``(M, Hout, Wout)`` array (numpy or zarr); only the blocks in reach are read.
    Separable: each pixel takes at most ``ceil(kernel/s) + 1`` blocks per axis.
    """
    kernel = float(kernel if kernel is not None else 2 * stride)
    if kernel < 1:
        raise ValueError(f"blend kernel must be >= 1 px, got {kernel}")
    hout, wout = fg.shape
    iy, wy = _blend_taps(y0, h, stride, kernel, hout)
    ix, wx = _blend_taps(x0, w, stride, kernel, wout)
    bi0, bi1 = int(iy.min()), int(iy.max()) + 1
    bj0, bj1 = int(ix.min()), int(ix.max()) + 1
    f = fg[bi0:bi1, bj0:bj1].astype(np.float32)
    p = np.asarray(grid[:, bi0:bi1, bj0:bj1], dtype=np.float32) * f
    iy, ix = iy - bi0, ix - bj0
    # along x: (M, nbi, w) and (nbi, w)
    px = np.einsum("mbxt,xt->mbx", p[:, :, ix], wx, optimize=True)
    fx = np.einsum("bxt,xt->bx", f[:, ix], wx, optimize=True)
    # along y
    num = np.einsum("mytx,yt->myx", px[:, iy], wy, optimize=True)
    den = np.einsum("ytx,yt->yx", fx[iy], wy, optimize=True)
    out = np.zeros_like(num, dtype=np.float32)
    np.divide(num, den[None], out=out, where=den[None] > 0)
    return out
