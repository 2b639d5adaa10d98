"""Where each ROSIE prediction comes from: the stride grid, the patch of each block, the foreground.

Geometry
    Output pixel ``(i, j)`` (shape ``(M, ceil(H/s), ceil(W/s))``) is ``model(patch)`` where the
    patch's top-left corner is ``(i·s + s//2 − P//2, j·s + s//2 − P//2)`` (``P = 128``): the patch
    is centred on the block's centre, exactly like the training examples of
    :mod:`datamodules.rosie` at ``s = 8`` (for odd ``s`` the centre is rounded down).

Foreground
    Only foreground blocks are run through the model; background blocks are 0 in the output and the
    foreground mask (at the output grid) is written beside it. The mask is an Otsu tissue mask
    (:func:`datamodules.preprocess.otsu_tissue_mask`) computed on a thumbnail (area-averaged, at
    most ``thumbnail_max_px`` on the long side, read tile by tile; from a reduced pyramid level when
    the image is a slide reader with one), sampled at each block centre; a
    dataset's stored tissue mask is used instead when there is one (``foreground='store'`` in
    :class:`~lightning_modules.rosie_inference.options.PredictOptions`), and ``foreground='all'``
    runs every block.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy import ndimage

from datamodules.preprocess import otsu_tissue_mask

log = logging.getLogger(__name__)

PATCH_SIZE = 128
MAX_STRIDE = 8


def check_stride(stride: int) -> int:
    """The stride as an int, refused outside 1..8 px: the model predicts a patch's centre 8×8 px, so a
    larger stride would leave pixels without a prediction."""
    if not isinstance(stride, (int, np.integer)) or not 1 <= int(stride) <= MAX_STRIDE:
        raise ValueError(f"stride must be an integer from 1 to {MAX_STRIDE} px, got {stride!r}")
    if MAX_STRIDE % int(stride):
        log.warning("stride %d does not divide 8: output blocks do not line up with the model's 8 px training blocks", stride)
    return int(stride)


def output_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """Output grid size: one block per started ``stride`` px, so border pixels are never dropped."""
    return -(-height // stride), -(-width // stride)


def patch_origin(index: int, stride: int, patch_size: int = PATCH_SIZE, centre: int | None = None) -> int:
    """Top (or left) of the patch of block ``index``: the patch is centred on the block's centre.

    ``centre`` is the offset of the patch centre from ``index·stride`` (default ``stride // 2``, the
    block's centre); the authors' script centres its patches on ``index·stride`` itself (``centre=0``).
    """
    return index * stride + (stride // 2 if centre is None else centre) - patch_size // 2


def he_thumbnail(image: Any, factor: int, read_px: int = 2048) -> np.ndarray:
    """Area-averaged ``(3, ceil(H/f), ceil(W/f))`` uint8 thumbnail, read in ~``read_px`` tiles (bounded memory)."""
    _, h, w = image.shape
    th, tw = -(-h // factor), -(-w // factor)
    out = np.empty((3, th, tw), dtype=np.uint8)
    step = max(1, read_px // factor) * factor
    for y in range(0, h, step):
        for x in range(0, w, step):
            bh, bw = min(step, h - y), min(step, w - x)
            block = np.asarray(image.read(y, x, bh, bw))
            if factor > 1:
                ph, pw = -(-bh // factor) * factor, -(-bw // factor) * factor
                if (ph, pw) != (bh, bw):
                    block = np.pad(block, ((0, 0), (0, ph - bh), (0, pw - bw)), mode="edge")
                block = block.reshape(3, ph // factor, factor, pw // factor, factor).mean(axis=(2, 4)).round().astype(np.uint8)
            out[:, y // factor : y // factor + block.shape[1], x // factor : x // factor + block.shape[2]] = block
    return out


def thumbnail(image: Any, max_side: int) -> tuple[np.ndarray, float]:
    """``(3, h, w)`` uint8 overview with ``max(h, w) <= max_side`` and its downsample from full resolution.

    A slide reader (:mod:`datamodules.slide_readers`) makes it from its coarsest fine-enough pyramid
    level, so a 100,000² px slide is never read whole at full resolution for its foreground; any
    other image is block-averaged from full resolution, read tile by tile. Without a pyramid both
    give the same pixels (block means at the integer factor ``ceil(max(H, W) / max_side)``).
    """
    if callable(getattr(image, "thumbnail", None)):
        small, factor = image.thumbnail(max_side)
        return np.asarray(small), float(factor)
    _, h, w = image.shape
    factor = max(1, math.ceil(max(h, w) / max_side))
    return he_thumbnail(image, factor), float(factor)


def foreground_grid(image: Any, stride: int, method: str | np.ndarray = "otsu", thumbnail_max_px: int = 2048,
                    dilate_px: int = 0) -> np.ndarray:
    """``(Hout, Wout)`` bool: which blocks are run through the model.

    ``method``: ``'otsu'`` (tissue mask of a thumbnail), ``'all'``, or a native ``(H, W)`` mask.
    A block is foreground when the mask is true at its centre pixel.
    """
    _, h, w = image.shape
    hout, wout = output_shape(h, w, stride)
    if isinstance(method, str) and method == "all":
        return np.ones((hout, wout), dtype=bool)
    cy = np.minimum(np.arange(hout) * stride + stride // 2, h - 1)
    cx = np.minimum(np.arange(wout) * stride + stride // 2, w - 1)
    if isinstance(method, str):
        if method != "otsu":
            raise ValueError(f"foreground must be 'otsu', 'all' or a mask array, got {method!r}")
        small, factor = thumbnail(image, thumbnail_max_px)
        mask = otsu_tissue_mask(small, "he")
        if dilate_px > 0:
            r = max(1, math.ceil(dilate_px / factor))
            mask = ndimage.binary_dilation(mask, structure=np.ones((2 * r + 1, 2 * r + 1), bool))
        iy = np.minimum(np.floor(cy / factor).astype(np.int64), mask.shape[0] - 1)
        ix = np.minimum(np.floor(cx / factor).astype(np.int64), mask.shape[1] - 1)
        return mask[iy][:, ix]
    mask = np.asarray(method)
    if mask.shape != (h, w):
        raise ValueError(f"foreground mask shape {mask.shape} disagrees with the H&E image's {(h, w)}")
    return mask.astype(bool)[cy][:, cx]
