"""ROSIE whole-image inference: a sliding window over an H&E image -> a predicted multiplex image.

The paper (Methods, "Sample generation") runs the patch regressor on the foreground H&E patches
and stitches the outputs: with stride ``s`` every ``s``×``s`` block of the H&E image gets one
prediction, made from the 128×128 patch centred on that block (``s = 8`` gives the standard
8× downsampled image, ``s = 1`` one prediction per pixel). This module is that loop, written so a
whole slide never has to be in memory and so that the GPU, not the patch bookkeeping, sets the
speed. The command line is :mod:`experiments.rosie_predict`.

Geometry
    Output pixel ``(i, j)`` (shape ``(M, ceil(H/s), ceil(W/s))``) is ``model(patch)`` where the
    patch's top-left corner is ``(i·s + s//2 − P//2, j·s + s//2 − P//2)`` (``P = 128``): the patch
    is centred on the block's centre, exactly like the training examples of
    :mod:`datamodules.rosie` at ``s = 8`` (for odd ``s`` the centre is rounded down).

Padding policy
    Pixels of a patch that fall outside the image are white (255), like background glass: border
    blocks and images smaller than a patch are predicted from white-padded patches, the same
    convention as training (:func:`datamodules.sampling.read_padded` with ``fill=255``).

Foreground
    Only foreground blocks are run through the model; background blocks are 0 in the output and the
    foreground mask (at the output grid) is written beside it. The mask is an Otsu tissue mask
    (:func:`datamodules.preprocess.otsu_tissue_mask`) computed on a thumbnail (area-averaged, at
    most ``thumbnail_max_px`` on the long side, read tile by tile), sampled at each block centre; a
    dataset's stored tissue mask is used instead when there is one, and ``foreground='all'`` runs
    every block.

Streaming
    The output grid is cut into ``tile_size``×``tile_size`` tiles (default 256 output px, one
    output chunk: a 2048×2048 px H&E region at stride 8). Each tile's H&E region plus a
    ``P/2`` halo is read (prefetched in a background thread while the model runs on the previous
    tile), moved to the device once, cut into patches there with ``unfold`` and predicted in
    batches; the tile's predictions are then handed to the consumers (Zarr writer, QC sample, cell
    sums, H&E histogram) and dropped. Peak memory is set by the tile, not the slide.

Blending (optional)
    Like the authors' inference script, each patch prediction can be spread over a
    ``kernel``×``kernel`` px window around its block centre (default ``kernel = 2s``) with a
    Gaussian weight (sigma ``kernel/4``), normalised by the summed weights of the foreground
    blocks -> a native-resolution ``(M, H, W)`` image. Background pixels with no foreground block in
    reach stay 0. The authors' script also halves the patch stride before blending; here the grid
    is the one of ``--stride`` (pass a smaller stride for more overlap).

Cells
    Per-cell expression follows the paper: the stride-grid prediction is upsampled to native
    resolution by nearest neighbour (each block -> ``s``×``s`` px) and averaged over each cell of
    the segmentation mask; background blocks contribute their 0. Sums and pixel counts per cell id
    are accumulated tile by tile, so the mask may be a lazy array too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.outputs import json_default
from datamodules import layout
from datamodules.image_files import (RASTER_SUFFIXES, DamagedImageError, check_regular_file, ome_mpp, open_tiff,
                                     raster_properties, read_raster)
from datamodules.markers import ROSIE_PANEL
from lightning_modules.components.rosie_backbone import IMAGENET_MEAN, IMAGENET_STD
from datamodules.sampling import read_padded
from datamodules.provenance import PREDICTION, check_dataset_target
from datamodules.store import DatasetStore, DatasetWriter, StoreError
from lightning_modules.components.model_files import ModelFileError, load_torch_file, require_kind

log = logging.getLogger(__name__)

PATCH_SIZE = 128
MAX_STRIDE = 8
#: Output tile side in output pixels = output Zarr chunk side: each tile writes whole chunks once.
DEFAULT_TILE = 256
CHUNK = 256
WHITE = 255
PREDICTED_MODALITY = "codex"


class HEInputError(ValueError):
    """The H&E input cannot be used as is; the message says how to fix it."""


# ============================================================================================
# H&E input
# ============================================================================================


class ArrayHE:
    """An RGB uint8 H&E image behind the store's ``ImageArray`` interface (``shape (3,H,W)``, ``read``).

    ``array`` is any sliceable array (numpy, zarr, tifffile's zarr store) and ``axes`` names its
    dimensions (``Y``, ``X``, ``S`` for the colour axis, anything else must have size 1). Only
    the region asked for is read, so a lazily opened TIFF is never loaded whole.
    """

    def __init__(self, array: Any, axes: str, name: str, keep: Any = None):
        self.array = array
        self.axes = axes
        self.name = name
        self._keep = keep  # e.g. the open TiffFile behind a lazy array
        shape = tuple(int(n) for n in array.shape)
        self._pos = {a: axes.index(a) for a in "YXS"}
        self.shape = (shape[self._pos["S"]], shape[self._pos["Y"]], shape[self._pos["X"]])
        self.dtype = np.dtype(array.dtype)
        kept = [a for a in axes if a in "YXS"]
        self._order = [kept.index(a) for a in "SYX"]

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        _, height, width = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"{self.name}: crop y={y} x={x} h={h} w={w} is outside the image of size {height}×{width}")
        index = tuple(slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None) if a == "S" else 0
                      for a in self.axes)
        try:
            out = np.asarray(self.array[index]).transpose(self._order)
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # a strip or tile that does not decode: the codec's own error type
            raise DamagedImageError(f"{self.name}: the pixels at y={y} x={x} ({h}×{w}) cannot be decoded, the file is "
                                    f"damaged ({type(exc).__name__}: {exc}); copy or export it again") from None
        return out if channels is None else out[list(channels)]

    def close(self) -> None:
        if self._keep is not None and hasattr(self._keep, "close"):
            self._keep.close()


def check_he(shape: Sequence[int], channels: int, dtype: np.dtype, name: str) -> None:
    """Refuse what ROSIE cannot read, saying how to convert it."""
    if channels == 1:
        raise HEInputError(f"{name}: H&E image is grayscale (1 channel, shape {tuple(shape)}); ROSIE needs an RGB "
                           "H&E image. Export the slide as RGB (e.g. `PIL.Image.open(p).convert('RGB').save(q)`).")
    if channels == 4:
        raise HEInputError(f"{name}: H&E image has 4 channels (RGBA, shape {tuple(shape)}); drop the alpha channel, "
                           "e.g. `PIL.Image.open(p).convert('RGB').save(q)` or `rgb = rgba[..., :3]`.")
    if channels != 3:
        raise HEInputError(f"{name}: H&E image must have 3 colour channels (RGB), found {channels} (shape {tuple(shape)})")
    dtype = np.dtype(dtype)
    if dtype != np.uint8:
        bits = dtype.itemsize * 8
        kind = f"{bits}-bit ({dtype})" if dtype.kind in "ui" else f"floating point ({dtype})"
        raise HEInputError(
            f"{name}: H&E image is {kind}; ROSIE was trained on 8-bit RGB (uint8, 0–255). Convert it, e.g. "
            "`skimage.util.img_as_ubyte(img)` (rescales the full 16-bit or 0–1 float range to 0–255), or "
            "`img.astype(np.uint8)` if the values already lie in 0–255."
        )


def open_he_image(path: str | os.PathLike) -> tuple[ArrayHE, float | None]:
    """Open an H&E image file lazily; returns the image and its µm/px when the file states it.

    TIFF / OME-TIFF (any layout tifffile knows: RGB interleaved, planar, tiled, pyramidal — level 0 is
    used) is opened through tifffile's Zarr interface, so only the regions read are decoded; a
    truncated or inconsistent file is refused at open (:mod:`datamodules.image_files`).
    PNG / JPEG are decoded whole (they are not tiled).
    """
    path = check_regular_file(path, "H&E image")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() in (".tif", ".tiff") else path.suffix.lower()
    if suffix.endswith((".tif", ".tiff", ".svs", ".ndpi", ".btf")) or path.suffix.lower() in (".svs", ".btf"):
        return _open_tiff(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        shape, dtype = raster_properties(path)
        channels = 1 if len(shape) == 2 else shape[2]
        check_he(shape, channels, dtype, str(path))
        return ArrayHE(np.ascontiguousarray(read_raster(path)), "YXS", str(path)), None
    raise HEInputError(f"{path}: unsupported H&E file type {path.suffix!r}; use TIFF/OME-TIFF, PNG or JPEG, "
                       "or a dataset folder with --tissue-id")


def _open_tiff(path: Path) -> tuple[ArrayHE, float | None]:
    import zarr

    tif = open_tiff(path)
    try:
        series = tif.series[0]
        axes, shape, dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
        if "S" not in axes:
            axes = axes.replace("C", "S", 1) if "C" in axes else axes
        if "Y" not in axes or "X" not in axes:
            raise HEInputError(f"{path}: TIFF series has axes {series.axes!r}, no Y/X plane")
        channels = shape[axes.index("S")] if "S" in axes else 1
        extra = {a: n for a, n in zip(axes, shape) if a not in "YXS" and n > 1}
        if extra:
            raise HEInputError(f"{path}: TIFF has extra dimensions {extra} (axes {series.axes!r}); save a single RGB plane")
        check_he(shape, channels, dtype, str(path))
        array = zarr.open(series.aszarr(level=0), mode="r")
        mpp = ome_mpp(tif.ome_metadata) if tif.is_ome else None
    except BaseException:
        tif.close()
        raise
    return ArrayHE(array, axes, str(path), keep=tif), mpp


def check_store_he(image: Any, name: str) -> None:
    check_he(image.shape, image.shape[0], image.dtype, name)


# ============================================================================================
# Model wrapper
# ============================================================================================


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return device


class PatchPredictor:
    """uint8 RGB patches ``(B,3,P,P)`` on the device -> ``(B,M)`` float32 predictions.

    Hides the input convention of the network: project checkpoints take ImageNet-normalised
    patches (``input_scale='imagenet'``), the official wrapper takes RGB in [0, 1] and normalises
    (and resizes to 224) itself (``'unit'``). ``scales`` multiplies the outputs back into measured
    units when the checkpoint trained on scaled targets.
    """

    def __init__(self, model: nn.Module, marker_names: Sequence[str], input_scale: str = "imagenet",
                 device: str | torch.device = "auto", amp: bool = True, scales: Sequence[float] | None = None,
                 patch_size: int = PATCH_SIZE, meta: dict | None = None, channels_last: bool = True):
        if input_scale not in ("imagenet", "unit"):
            raise ValueError(f"input_scale must be 'imagenet' or 'unit', got {input_scale!r}")
        self.device = resolve_device(device)
        # channels-last: ConvNeXt's depthwise convs run ~3x faster on CPU and use tensor cores on GPU
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.marker_names = [str(m) for m in marker_names]
        self.input_scale = input_scale
        self._amp_requested = amp
        self.amp = amp and self.device.type == "cuda"
        self.patch_size = patch_size
        self.meta = dict(meta or {})
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        self.scales = None
        if scales is not None:
            if len(scales) != len(self.marker_names):
                raise ValueError(f"{len(scales)} marker scales for {len(self.marker_names)} markers")
            self.scales = torch.tensor(list(scales), dtype=torch.float32, device=self.device)

    @property
    def num_markers(self) -> int:
        return len(self.marker_names)

    def to(self, device: str | torch.device) -> "PatchPredictor":
        """Move the network and its constants (a Lightning run decides each rank's device)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        self._scale, self._shift = self._scale.to(self.device), self._shift.to(self.device)
        if self.scales is not None:
            self.scales = self.scales.to(self.device)
        self.amp = self._amp_requested and self.device.type == "cuda"
        return self

    def prepare(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 -> float network input in one multiply-add, laid out in the model's memory format.

        Same values as :func:`datamodules.rosie.normalize_he` (training), up to float rounding:
        ``(x/255 - mean)/std = x·(1/(255·std)) - mean/std``.
        """
        x = patches.contiguous(memory_format=self.memory_format).float()  # layout change on 1-byte data
        if self.input_scale == "imagenet":
            return x.mul_(self._scale).sub_(self._shift)
        return x.mul_(1.0 / 255.0)

    @torch.inference_mode()
    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.prepare(patches.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x)
        out = out.float()
        if out.ndim != 2 or out.shape[1] != self.num_markers:
            raise ValueError(f"model returned shape {tuple(out.shape)}, expected (B, {self.num_markers})")
        return out * self.scales if self.scales is not None else out

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, official: bool | None = None, device: str = "auto",
                        amp: bool = True, trust_checkpoint: bool = False, rescale: bool = True,
                        marker_names: Sequence[str] | None = None) -> "PatchPredictor":
        """A project Lightning checkpoint of :class:`RosieModule`, or the authors' released weights.

        ``official=None`` tells them apart by content (Lightning writes ``pytorch-lightning_version``;
        the official file is a torchvision ConvNeXt state dict). Files are read with
        ``weights_only=True``; ``trust_checkpoint`` allows full unpickling for old files that need
        it (only for files you trust).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = _peek_checkpoint(path, trust_checkpoint)
        is_lightning = isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt
        if official is None:
            official = not is_lightning
        if official:
            from lightning_modules.components.rosie_backbone import load_official_rosie_checkpoint

            model = load_official_rosie_checkpoint(path, with_preprocess=True)
            names = list(marker_names or ROSIE_PANEL)
            n_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
            if len(names) != n_out:
                raise ValueError(f"{path}: official checkpoint predicts {n_out} markers but {len(names)} marker names given")
            return cls(model, names, "unit", device, amp, meta={"checkpoint": str(path), "kind": "official"})
        if not is_lightning:
            raise ValueError(f"{path}: not a Lightning checkpoint of RosieModule (no 'pytorch-lightning_version'); "
                             "pass --official for the authors' released weights")
        from lightning_modules.rosie import load_rosie_checkpoint

        module = load_rosie_checkpoint(str(path), trust_checkpoint)
        hp = dict(module.hparams)
        names = list(marker_names or hp.get("marker_names") or getattr(module, "marker_names", None) or ROSIE_PANEL)
        scales = None
        for key in ("marker_scales", "target_scales"):
            if rescale and hp.get(key) is not None:
                scales = [float(v) for v in hp[key]]
        meta = {"checkpoint": str(path), "kind": "lightning", "arch": hp.get("arch"),
                "reference_he_histograms": ckpt.get("reference_he_histograms", hp.get("reference_he_histograms")),
                "rescaled": scales is not None}
        return cls(module, names, "imagenet", device, amp, scales=scales, meta=meta)


def _peek_checkpoint(path: Path, trust: bool) -> dict:
    """The checkpoint's top level, tensors memory-mapped (not read) where the format allows; a
    VirTues checkpoint is refused by name."""
    if path.suffix == ".safetensors":
        obj = {"state_dict": load_torch_file(path)}
        require_kind(path, obj, ("rosie-official", "rosie"), "rosie_predict")
        return {}
    obj = load_torch_file(path, trust=trust, mmap=True)
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dictionary")
    require_kind(path, obj, ("rosie-official", "rosie"), "rosie_predict")
    return obj


# ============================================================================================
# Geometry, foreground
# ============================================================================================


def check_stride(stride: int) -> int:
    if not isinstance(stride, (int, np.integer)) or not 1 <= int(stride) <= MAX_STRIDE:
        raise ValueError(f"stride must be an integer from 1 to {MAX_STRIDE} px, got {stride!r}")
    if MAX_STRIDE % int(stride):
        log.warning("stride %d does not divide 8: output blocks do not line up with the model's 8 px training blocks", stride)
    return int(stride)


def output_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    return -(-height // stride), -(-width // stride)


def patch_origin(index: int, stride: int, patch_size: int = PATCH_SIZE) -> int:
    """Top (or left) of the patch of block ``index``: the patch is centred on the block's centre."""
    return index * stride + stride // 2 - patch_size // 2


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
        from datamodules.preprocess import otsu_tissue_mask

        factor = max(1, math.ceil(max(h, w) / thumbnail_max_px))
        mask = otsu_tissue_mask(he_thumbnail(image, factor), "he")
        if dilate_px > 0:
            from scipy import ndimage

            r = max(1, math.ceil(dilate_px / factor))
            mask = ndimage.binary_dilation(mask, structure=np.ones((2 * r + 1, 2 * r + 1), bool))
        return mask[np.minimum(cy // factor, mask.shape[0] - 1)][:, np.minimum(cx // factor, mask.shape[1] - 1)]
    mask = np.asarray(method)
    if mask.shape != (h, w):
        raise ValueError(f"foreground mask shape {mask.shape} disagrees with the H&E image's {(h, w)}")
    return mask.astype(bool)[cy][:, cx]


# ============================================================================================
# The sliding window
# ============================================================================================


@dataclasses.dataclass
class TileResult:
    """One output tile: ``pred[:, a, b]`` is output pixel ``(i0 + a, j0 + b)``."""

    i0: int
    j0: int
    pred: np.ndarray  # (M, th, tw) float32, 0 at background blocks
    fg: np.ndarray  # (th, tw) bool
    fg_values: np.ndarray  # (K, M) float32, predictions of the tile's foreground blocks (row-major order)
    he: np.ndarray | None  # (3, h, w) uint8: the tile's own native H&E pixels (no halo), when asked for
    native: tuple[int, int, int, int]  # y0, y1, x0, x1 of those native pixels


@dataclasses.dataclass
class RunStats:
    n_patches: int = 0
    seconds: float = 0.0

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else float("nan")

    def line(self) -> str:
        return f"{self.n_patches} patches in {self.seconds:.1f} s = {self.patches_per_s:.1f} patches/s"


def tile_grid(hout: int, wout: int, tile: int) -> list[tuple[int, int, int, int]]:
    return [(i0, min(i0 + tile, hout), j0, min(j0 + tile, wout))
            for i0 in range(0, hout, tile) for j0 in range(0, wout, tile)]


def iter_predictions(image: Any, predictor: PatchPredictor, stride: int, fg: np.ndarray,
                     tile_size: int = DEFAULT_TILE, batch_size: int = 64, want_he: bool = False,
                     progress: bool = True, stats: RunStats | None = None) -> Iterator[TileResult]:
    """Predict every foreground block, one output tile at a time (see the module docstring)."""
    stride = check_stride(stride)
    _, h, w = image.shape
    hout, wout = output_shape(h, w, stride)
    if fg.shape != (hout, wout):
        raise ValueError(f"foreground grid shape {fg.shape} disagrees with the output grid {(hout, wout)}")
    if tile_size < 1 or batch_size < 1:
        raise ValueError(f"tile_size and batch_size must be positive, got {tile_size}, {batch_size}")
    P, s, M = predictor.patch_size, stride, predictor.num_markers
    tiles = tile_grid(hout, wout, tile_size)
    stats = stats if stats is not None else RunStats()
    device = predictor.device

    def load(t: tuple[int, int, int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
        i0, i1, j0, j1 = t
        region = None
        if fg[i0:i1, j0:j1].any():
            region = read_padded(image, patch_origin(i0, s, P), patch_origin(j0, s, P),
                                 (i1 - i0 - 1) * s + P, (j1 - j0 - 1) * s + P, fill=WHITE)
        he = None
        if want_he:
            y0, y1, x0, x1 = i0 * s, min(i1 * s, h), j0 * s, min(j1 * s, w)
            if region is not None:  # the tile's own pixels sit inside the region, P//2 - s//2 from its corner
                oy, ox = P // 2 - s // 2, P // 2 - s // 2
                he = region[:, oy : oy + y1 - y0, ox : ox + x1 - x0]
            else:
                he = np.asarray(image.read(y0, x0, y1 - y0, x1 - x0))
        return region, he

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("ROSIE patches"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    start = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=False) as bar, ThreadPoolExecutor(max_workers=1) as pool:
        task = bar.add_task("predict", total=int(fg.sum()))
        future = pool.submit(load, tiles[0]) if tiles else None
        for k, (i0, i1, j0, j1) in enumerate(tiles):
            region, he = future.result()  # type: ignore[union-attr]
            future = pool.submit(load, tiles[k + 1]) if k + 1 < len(tiles) else None
            tfg = fg[i0:i1, j0:j1]
            pred = np.zeros((M, i1 - i0, j1 - j0), dtype=np.float32)
            values = np.zeros((0, M), dtype=np.float32)
            if region is not None:
                ii, jj = np.nonzero(tfg)
                reg = torch.from_numpy(np.ascontiguousarray(region)).to(device, non_blocking=True)
                windows = reg.unfold(1, P, s).unfold(2, P, s).permute(1, 2, 0, 3, 4)  # (ni, nj, 3, P, P) view
                ii_t = torch.from_numpy(ii).to(device)
                jj_t = torch.from_numpy(jj).to(device)
                out = torch.empty((len(ii), M), dtype=torch.float32, device=device)
                for b in range(0, len(ii), batch_size):
                    out[b : b + batch_size] = predictor(windows[ii_t[b : b + batch_size], jj_t[b : b + batch_size]])
                    bar.advance(task, min(batch_size, len(ii) - b))
                values = out.cpu().numpy()
                pred[:, ii, jj] = values.T
                stats.n_patches += len(ii)
            y0, y1, x0, x1 = i0 * s, min(i1 * s, h), j0 * s, min(j1 * s, w)
            yield TileResult(i0, j0, pred, tfg, values, he, (y0, y1, x0, x1))
    stats.seconds += time.perf_counter() - start


# ============================================================================================
# Gaussian overlap blend
# ============================================================================================


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


# ============================================================================================
# Consumers of tiles: QC sample, H&E histogram, per-cell sums
# ============================================================================================


class QCSample:
    """A deterministic, bounded sample of foreground predictions for the dynamic range (p99 - p1).

    Every ``step``-th foreground block (row-major over tiles) is kept, ``step`` chosen from the known
    foreground count so at most ``max_rows`` rows are held; exact when the image has fewer blocks.
    """

    def __init__(self, n_foreground: int, max_rows: int = 200_000):
        self.step = max(1, math.ceil(n_foreground / max(1, max_rows)))
        self.seen = 0
        self.rows: list[np.ndarray] = []
        self.nonfinite = 0

    def add(self, values: np.ndarray) -> None:
        n = values.shape[0]
        take = np.arange((-self.seen) % self.step, n, self.step)
        self.seen += n
        self.nonfinite += int((~np.isfinite(values)).sum())
        if take.size:
            self.rows.append(values[take])

    def dynamic_range(self, n_markers: int) -> np.ndarray:
        from analysis.rosie_metrics import dynamic_range

        if not self.rows:
            return np.full(n_markers, np.nan)
        sample = np.concatenate(self.rows)  # (K, M)
        return dynamic_range(sample.T[:, :, None])


class CellAccumulator:
    """Per-cell sums of the nearest-upsampled prediction, fed tile by tile.

    For each tile the (cell id, block) pairs of its native pixels are counted once
    (``np.unique``), so the work is one sort of the tile's cell pixels plus a gather of
    ``M × pairs`` values, however many markers there are.
    """

    def __init__(self, mask: Any, stride: int, n_markers: int):
        if len(mask.shape) != 2:
            raise ValueError(f"cell mask must be 2-D (instance ids), got shape {tuple(mask.shape)}")
        if not np.issubdtype(np.dtype(mask.dtype), np.integer):
            raise ValueError(f"cell mask must hold integer instance ids, got {mask.dtype}")
        self.mask = mask
        self.stride = stride
        self.M = n_markers
        self.sums = np.zeros((n_markers, 1), dtype=np.float64)
        self.count = np.zeros(1, dtype=np.int64)
        self.fg_count = np.zeros(1, dtype=np.int64)
        self.sum_y = np.zeros(1, dtype=np.float64)
        self.sum_x = np.zeros(1, dtype=np.float64)

    def _grow(self, max_id: int) -> None:
        n = self.count.shape[0]
        if max_id < n:
            return
        new = max(max_id + 1, 2 * n)
        self.sums = np.pad(self.sums, ((0, 0), (0, new - n)))
        for name in ("count", "fg_count", "sum_y", "sum_x"):
            setattr(self, name, np.pad(getattr(self, name), (0, new - n)))

    def add(self, tile: TileResult) -> None:
        y0, y1, x0, x1 = tile.native
        labels = np.asarray(self.mask[y0:y1, x0:x1])
        if labels.size and labels.min() < 0:
            raise ValueError("cell mask has negative ids; use 0 for background and positive instance ids")
        flat = labels.reshape(-1)
        sel = np.flatnonzero(flat)
        if sel.size == 0:
            return
        ids = flat[sel].astype(np.int64)
        w = x1 - x0
        ry, rx = np.divmod(sel, w)
        th, tw = tile.fg.shape
        nb = th * tw
        blk = (ry // self.stride) * tw + (rx // self.stride)
        key = ids * nb + blk
        uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        cell, block = uk // nb, uk % nb
        starts = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
        cells = cell[starts]
        self._grow(int(cells[-1]))
        vals = tile.pred.reshape(self.M, -1)[:, block].astype(np.float64) * cnt
        self.sums[:, cells] += np.add.reduceat(vals, starts, axis=1)
        self.count[cells] += np.add.reduceat(cnt, starts)
        self.fg_count[cells] += np.add.reduceat(tile.fg.reshape(-1)[block] * cnt, starts)
        pair_y = np.bincount(inv.reshape(-1), weights=ry + y0, minlength=uk.size)
        pair_x = np.bincount(inv.reshape(-1), weights=rx + x0, minlength=uk.size)
        self.sum_y[cells] += np.add.reduceat(pair_y, starts)
        self.sum_x[cells] += np.add.reduceat(pair_x, starts)

    def to_anndata(self, marker_names: Sequence[str], tissue_id: str, uns: dict | None = None) -> Any:
        import anndata as ad

        ids = np.flatnonzero(self.count)
        n = self.count[ids].astype(np.float64)
        obs = pd.DataFrame({
            "cell_id": ids.astype(np.int64),
            "tissue_id": pd.Categorical([tissue_id] * len(ids)),
            "n_pixels": self.count[ids],
            "fg_fraction": (self.fg_count[ids] / n).astype(np.float32),
        }, index=pd.Index([str(i) for i in ids], name="cell"))
        adata = ad.AnnData(X=(self.sums[:, ids] / n).T.astype(np.float32), obs=obs,
                           var=pd.DataFrame(index=pd.Index([str(m) for m in marker_names], name="marker")))
        adata.obsm["spatial"] = np.stack([self.sum_x[ids] / n, self.sum_y[ids] / n], axis=1)
        adata.uns["rosie"] = dict(uns or {})
        return adata


def he_histogram_counts(he: np.ndarray) -> np.ndarray:
    """(3, 256) pixel counts of a (3, h, w) uint8 region."""
    return np.stack([np.bincount(he[c].reshape(-1), minlength=256) for c in range(3)]).astype(np.int64)


# ============================================================================================
# In-memory prediction (small images, tests, benchmarks)
# ============================================================================================


@dataclasses.dataclass
class Prediction:
    image: np.ndarray  # (M, Hout, Wout) float32, or (M, H, W) when blended
    grid: np.ndarray  # (M, Hout, Wout) stride-grid prediction
    foreground: np.ndarray  # (Hout, Wout) bool
    stats: RunStats
    marker_names: list[str]
    cells: Any = None  # AnnData when a cell mask was given


def predict_image(image: Any, predictor: PatchPredictor, stride: int = 8, foreground: str | np.ndarray = "otsu",
                  batch_size: int = 64, tile_size: int = DEFAULT_TILE, blend: bool = False,
                  blend_kernel: float | None = None, cell_mask: Any = None, tissue_id: str = "tissue",
                  progress: bool = False) -> Prediction:
    """Predict a whole image held in memory at the output size (the streaming writer is
    :func:`predict_to_dataset`). ``image``: an :class:`ArrayHE`, a store image, or an RGB uint8
    array ``(H,W,3)``/``(3,H,W)``."""
    image = as_he_image(image)
    stride = check_stride(stride)
    fg = foreground_grid(image, stride, foreground)
    grid = np.zeros((predictor.num_markers,) + fg.shape, dtype=np.float32)
    stats = RunStats()
    cells = CellAccumulator(cell_mask, stride, predictor.num_markers) if cell_mask is not None else None
    if cells is not None and tuple(cell_mask.shape) != tuple(image.shape[1:]):
        raise ValueError(f"cell mask shape {tuple(cell_mask.shape)} disagrees with the H&E image's {tuple(image.shape[1:])}")
    for t in iter_predictions(image, predictor, stride, fg, tile_size, batch_size, progress=progress, stats=stats):
        grid[:, t.i0 : t.i0 + t.pred.shape[1], t.j0 : t.j0 + t.pred.shape[2]] = t.pred
        if cells is not None:
            cells.add(t)
    out = grid
    if blend:
        _, h, w = image.shape
        out = blend_region(grid, fg, 0, 0, h, w, stride, blend_kernel)
    adata = cells.to_anndata(predictor.marker_names, tissue_id) if cells is not None else None
    return Prediction(out, grid, fg, stats, list(predictor.marker_names), adata)


def as_he_image(image: Any) -> Any:
    if hasattr(image, "read") and hasattr(image, "shape"):
        check_he(image.shape, image.shape[0], image.dtype, getattr(image, "name", getattr(image, "path", "H&E image")))
        return image
    arr = np.asarray(image)
    if arr.ndim == 2:
        check_he(arr.shape, 1, arr.dtype, "H&E array")
    if arr.ndim != 3:
        raise HEInputError(f"H&E array must be (H,W,3) or (3,H,W), got shape {arr.shape}")
    if arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
        check_he(arr.shape, arr.shape[-1], arr.dtype, "H&E array")
        return ArrayHE(arr, "YXS", "H&E array")
    check_he(arr.shape, arr.shape[0], arr.dtype, "H&E array")
    return ArrayHE(arr, "SYX", "H&E array")


# ============================================================================================
# Streaming prediction into a dataset folder
# ============================================================================================


@dataclasses.dataclass
class PredictOptions:
    stride: int = 8
    batch_size: int = 64
    tile_size: int = DEFAULT_TILE
    foreground: str = "otsu"  # 'otsu' | 'all' | 'store' (use the dataset's tissue mask when present, else Otsu)
    blend: bool = False
    blend_kernel: float | None = None
    ome_tiff: bool = False
    overwrite: bool = False
    progress: bool = True
    qc_max_rows: int = 200_000


def omero_attrs(name: str, channel_names: Sequence[str], mpp: float) -> dict:
    from datamodules.store import omero_attrs as attrs  # the store's OME-NGFF metadata, one definition

    return attrs(name, channel_names, mpp)


def _create_zarr_image(fs: Any, path: str, shape: tuple[int, int, int], mpp: float, channel_names: Sequence[str],
                       name: str) -> Any:
    """An empty float32 OME-Zarr v3 image to be filled tile by tile.

    Unsharded inner chunks ``(M, 256, 256)`` (blosc-lz4-bitshuffle like the store), so a tile of
    256 output px writes whole chunks once; ``write_empty_chunks`` so background chunks exist and
    the store's missing-chunk check holds.
    """
    import zarr
    from zarr.codecs import BloscCodec

    from datamodules.store import zarr_store

    m, h, w = shape
    group = zarr.open_group(store=zarr_store(fs, path, read_only=False), mode="w", zarr_format=3)
    group.attrs.update(omero_attrs(name, channel_names, mpp))
    return group.create_array(
        "0", shape=shape, dtype="float32", chunks=(m, min(CHUNK, h), min(CHUNK, w)),
        compressors=BloscCodec(typesize=4, cname="lz4", clevel=3, shuffle="bitshuffle"),
        dimension_names=("c", "y", "x"), fill_value=0, config={"write_empty_chunks": True},
    )


@contextlib.contextmanager
def _local_output(fs: Any, target: str, suffix: str) -> Iterator[str]:
    """A local temporary file that becomes ``target`` when the block succeeds (rename, or upload)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    folder = os.path.dirname(target) if local else tempfile.gettempdir()
    if local:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        if local:
            os.replace(tmp, target)
        else:
            fs.put(tmp, target)
            os.remove(tmp)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_ome_tiff(fs: Any, target: str, image: Any, channel_names: Sequence[str], mpp: float, band: int = CHUNK) -> None:
    """Uncompressed float32 OME-TIFF (``CYX``, channel names, pixel size) copied band by band.

    Memory-mapped (``tifffile.memmap``), so it is written in the order the Zarr image is read and
    never held in memory; written under a temporary name and renamed.
    """
    import tifffile

    m, h, w = image.shape
    meta = {"axes": "CYX", "Channel": {"Name": [str(c) for c in channel_names]},
            "PhysicalSizeX": float(mpp), "PhysicalSizeXUnit": "µm", "PhysicalSizeY": float(mpp), "PhysicalSizeYUnit": "µm"}
    with _local_output(fs, target, ".ome.tif") as tmp:
        mm = tifffile.memmap(tmp, shape=(m, h, w), dtype="float32", ome=True, metadata=meta, photometric="minisblack")
        for y in range(0, h, band):
            mm[:, y : y + band] = np.asarray(image[:, y : y + band])
        mm.flush()
        del mm


#: Per-tissue completion records: written last, so a tissue with a record has all its outputs.
RECORDS_DIR = "qc/tissues"


def record_path(tissue_id: str) -> str:
    return f"{RECORDS_DIR}/{tissue_id}.json"


def _write_record(writer: DatasetWriter, tissue_id: str, entry: dict, per_marker: pd.DataFrame, tissue_row: dict) -> None:
    """The tissue's completion record (QC entry, per-marker QC rows, tissues-table row), written atomically."""
    record = {"entry": entry, "per_marker": per_marker.to_dict(orient="list"), "tissue_row": tissue_row}
    writer.write_bytes(record_path(tissue_id), json.dumps(record, indent=1, default=json_default).encode())


def read_record(out: str | os.PathLike, tissue_id: str) -> dict | None:
    """The completion record of ``tissue_id`` in prediction folder ``out``, or None if it has none."""
    fs, root = fsspec_root(out)
    path = f"{root}/{record_path(tissue_id)}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def is_complete(out: str | os.PathLike, tissue_id: str, options: PredictOptions) -> bool:
    """Whether ``tissue_id`` was predicted to the end into ``out`` with the same stride and blending.

    A tissue is complete when its record exists (written after every other output) and the image
    it names exists; a crash before the record leaves the tissue incomplete, and a rerun redoes it.
    """
    record = read_record(out, tissue_id)
    if record is None:
        return False
    entry = record.get("entry", {})
    if entry.get("stride") != check_stride(options.stride) or bool(entry.get("blend")) != bool(options.blend):
        return False
    fs, root = fsspec_root(out)
    return fs.exists(f"{root}/{entry.get('image')}")


def fsspec_root(out: str | os.PathLike) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(out))
    return fs, root.rstrip("/")


def merge_records(out: str | os.PathLike, tissue_ids: Sequence[str] | None = None) -> int:
    """Fold completion records into the dataset-level ``qc.json``, ``qc.csv`` and tissues table.

    One writer at a time: the single-process loop calls it after each tissue, a distributed run
    calls it once on rank 0 after every rank has finished (ranks only write per-tissue files, so
    no two processes ever write the same file). ``tissue_ids=None`` folds every record. Returns
    the number of records folded.
    """
    writer = DatasetWriter.open(out, kind=PREDICTION, written_by="rosie_predict")
    with writer.locked():
        return _merge_records(writer, out, tissue_ids)


def _merge_records(writer: DatasetWriter, out: str | os.PathLike, tissue_ids: Sequence[str] | None) -> int:
    fs, root = writer.fs, writer.root
    if tissue_ids is None:
        folder = f"{root}/{RECORDS_DIR}"
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] if fs.exists(folder) else []
        tissue_ids = sorted(n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith("."))
    records = {tid: read_record(out, tid) for tid in tissue_ids}
    records = {tid: r for tid, r in records.items() if r is not None}
    if not records:
        return 0
    path_json, path_csv = f"{root}/qc.json", f"{root}/qc.csv"
    qc = {"tissues": {}}
    if fs.exists(path_json):
        with fs.open(path_json, "r") as f:
            qc = json.load(f)
    table = None
    if fs.exists(path_csv):
        with fs.open(path_csv, "rb") as f:
            table = pd.read_csv(io.BytesIO(f.read()))
        table = table[~table["tissue_id"].astype(str).isin(list(records))]
    for tid, record in records.items():
        qc.setdefault("tissues", {})[tid] = record["entry"]
    per_marker = pd.concat([pd.DataFrame(r["per_marker"]) for r in records.values()], ignore_index=True)
    table = per_marker if table is None else pd.concat([table, per_marker], ignore_index=True)
    writer.append_tissues(pd.DataFrame([r["tissue_row"] for r in records.values()]), replace=True)
    writer.write_bytes("qc.json", json.dumps(qc, indent=1, default=json_default).encode())
    writer.write_bytes("qc.csv", table.to_csv(index=False).encode())
    return len(records)




def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def predict_to_dataset(image: Any, predictor: PatchPredictor, out: str | os.PathLike, tissue_id: str, mpp: float,
                       options: PredictOptions | None = None, tissue_mask: np.ndarray | None = None,
                       cell_mask: Any = None, reference_hists: np.ndarray | None = None,
                       tissue_row: dict | None = None, channel_table: pd.DataFrame | None = None,
                       update_shared: bool = True) -> dict:
    """Predict one tissue and write it into the dataset folder ``out`` (created if absent).

    Writes ``codex/<mpp·s>mpp/images/<tissue_id>.ome.zarr`` (and, with blending,
    ``codex/<mpp>mpp/images/...`` at native resolution), ``codex/channels.parquet``, the foreground
    mask at the output grid, a ``metadata/tissues.parquet`` row, ``qc.json``/``qc.csv``, and
    optionally ``<tissue_id>.ome.tif`` and ``<tissue_id>.cells.h5ad`` at the dataset root. Every
    file is written under a temporary name and renamed. ``channel_table`` (a measured dataset's
    ``channels.parquet``) lends its UniProt ids to the predicted markers it names.

    The last file written is the tissue's completion record ``qc/tissues/<tissue_id>.json``
    (:func:`is_complete`). ``update_shared=False`` leaves the dataset-level tables (tissues,
    ``qc.json``, ``qc.csv``) alone, for distributed runs where one rank folds every record in
    afterwards (:func:`merge_records`). Returns the tissue's QC entry.
    """
    opt = options or PredictOptions()
    stride = check_stride(opt.stride)
    layout.check_tissue_id(tissue_id)
    image = as_he_image(image)
    names = list(predictor.marker_names)
    M = len(names)
    _, h, w = image.shape
    out_mpp = float(mpp) * stride
    check_prediction_target(out)
    writer = DatasetWriter.open(out, kind=PREDICTION, written_by="rosie_predict")
    grid_rel = layout.image_path(PREDICTED_MODALITY, out_mpp, tissue_id)
    blend_rel = layout.image_path(PREDICTED_MODALITY, float(mpp), tissue_id) if opt.blend else None
    for rel in filter(None, (grid_rel, blend_rel)):
        if writer.fs.exists(f"{writer.root}/{rel}") and not opt.overwrite:
            raise StoreError(f"{writer.root}/{rel}: a prediction for tissue {tissue_id!r} already exists; pass --overwrite to replace it")
    _check_channels(writer, names)
    if cell_mask is not None and tuple(cell_mask.shape) != (h, w):
        raise ValueError(f"cell mask shape {tuple(cell_mask.shape)} disagrees with the H&E image's {(h, w)} "
                         "(it must be at the H&E resolution)")

    method: str | np.ndarray = opt.foreground
    if opt.foreground == "store":
        method = tissue_mask if tissue_mask is not None else "otsu"
    fg = foreground_grid(image, stride, method)
    if not fg.any():
        source = getattr(image, "name", None) or getattr(image, "path", None) or tissue_id
        raise ValueError(f"{source}: no tissue found in the H&E ({h}×{w} px): the foreground mask is empty, so the "
                         "output would be all background; pass --foreground all to predict every patch")
    hout, wout = fg.shape
    qc_sample = QCSample(int(fg.sum()), opt.qc_max_rows)
    cells = CellAccumulator(cell_mask, stride, M) if cell_mask is not None else None
    hist = np.zeros((3, 256), dtype=np.int64)
    stats = RunStats()

    with writer.atomic_path(grid_rel) as tmp:
        arr = _create_zarr_image(writer.fs, tmp, (M, hout, wout), out_mpp, names, tissue_id)
        for t in iter_predictions(image, predictor, stride, fg, opt.tile_size, opt.batch_size, want_he=True,
                                  progress=opt.progress, stats=stats):
            arr[:, t.i0 : t.i0 + t.pred.shape[1], t.j0 : t.j0 + t.pred.shape[2]] = t.pred
            qc_sample.add(t.fg_values)
            hist += he_histogram_counts(t.he)
            if cells is not None:
                cells.add(t)
    print(stats.line(), flush=True)
    log.info("%s: %s", tissue_id, stats.line())

    import zarr

    from datamodules.store import zarr_store

    def open_image(rel: str) -> Any:
        return zarr.open_group(store=zarr_store(writer.fs, f"{writer.root}/{rel}", read_only=True), mode="r")["0"]

    final_rel = grid_rel
    if opt.blend:
        grid = open_image(grid_rel)
        with writer.atomic_path(blend_rel) as tmp:  # type: ignore[arg-type]
            barr = _create_zarr_image(writer.fs, tmp, (M, h, w), float(mpp), names, tissue_id)
            step = CHUNK  # (M, 256, 256) per step: the blend's gathers stay ~50 MB at 50 markers
            for y in range(0, h, step):
                for x in range(0, w, step):
                    bh, bw = min(step, h - y), min(step, w - x)
                    barr[:, y : y + bh, x : x + bw] = blend_region(grid, fg, y, x, bh, bw, stride, opt.blend_kernel)
        final_rel = blend_rel  # type: ignore[assignment]

    writer.write_channels(PREDICTED_MODALITY, _channel_rows(names, channel_table))
    writer.write_tissue_mask(tissue_id, out_mpp, fg)
    row = {"tissue_id": tissue_id, **(tissue_row or {})}

    # ---- QC
    dr = qc_sample.dynamic_range(M)
    he_hist = hist / max(1, hist[0].sum())
    w1 = None
    if reference_hists is not None:
        from analysis.rosie_metrics import w1_to_reference

        ref = np.asarray(reference_hists, dtype=np.float64)
        w1 = w1_to_reference(he_hist, ref if ref.ndim == 3 else ref[None]) if ref.ndim in (2, 3) else None
    if qc_sample.nonfinite:
        log.warning("%s: the model produced %d non-finite values", tissue_id, qc_sample.nonfinite)
    entry = {
        "tissue_id": tissue_id, "he_shape": [int(h), int(w)], "he_mpp": float(mpp), "stride": stride,
        "output_shape": [M, hout, wout] if not opt.blend else [M, int(h), int(w)],
        "output_mpp": out_mpp if not opt.blend else float(mpp), "image": final_rel, "grid_image": grid_rel,
        "blend": bool(opt.blend), "foreground_blocks": int(fg.sum()), "foreground_fraction": float(fg.mean()),
        "n_patches": stats.n_patches, "seconds": round(stats.seconds, 3), "patches_per_s": _nan_to_none(stats.patches_per_s),
        "throughput": stats.line(), "device": str(predictor.device), "checkpoint": predictor.meta.get("checkpoint"),
        "checkpoint_kind": predictor.meta.get("kind"), "rescaled_to_measured_units": bool(predictor.meta.get("rescaled")),
        "dynamic_range": {n: _nan_to_none(v) for n, v in zip(names, dr)},
        "dynamic_range_of": "stride-grid predictions of the foreground blocks", "dynamic_range_sampled_every": qc_sample.step, "nonfinite_values": qc_sample.nonfinite,
        "w1_to_training_he": _nan_to_none(w1) if w1 is not None else None,
        "he_histogram": he_hist.round(8).tolist(),
    }

    # ---- optional products
    if opt.ome_tiff:
        target = f"{writer.root}/{tissue_id}.ome.tif"
        write_ome_tiff(writer.fs, target, open_image(final_rel), names, entry["output_mpp"])
        entry["ome_tiff"] = f"{tissue_id}.ome.tif"
    if cells is not None:
        adata = cells.to_anndata(names, tissue_id, uns={"stride": stride, "he_mpp": float(mpp), "image": grid_rel})
        target = f"{writer.root}/{tissue_id}.cells.h5ad"
        with _local_output(writer.fs, target, ".h5ad") as tmp:
            adata.write_h5ad(tmp)
        entry["cells_h5ad"] = f"{tissue_id}.cells.h5ad"
        entry["n_cells"] = int(adata.n_obs)
    per_marker = pd.DataFrame({"tissue_id": tissue_id, "marker": names, "dynamic_range": dr,
                               "w1_to_training_he": np.nan if w1 is None else w1})
    _write_record(writer, tissue_id, entry, per_marker, row)
    if update_shared:
        merge_records(out, [tissue_id])
    return entry


def _channel_rows(names: Sequence[str], table: pd.DataFrame | None) -> pd.DataFrame:
    from datamodules.markers import match_markers

    uniprot: dict[str, str | None] = {}
    nuclear: dict[str, bool] = {}
    if table is not None and "channel_name" in table.columns:
        by_name = table.set_index(table["channel_name"].astype(str))
        for marker, name in match_markers(names, by_name.index).items():
            uid = by_name.loc[name].get("uniprot_id") if "uniprot_id" in by_name.columns else None
            uniprot[marker] = uid if isinstance(uid, str) and uid else None
            if "is_nuclear_marker" in by_name.columns:
                nuclear[marker] = bool(by_name.loc[name, "is_nuclear_marker"])
    return pd.DataFrame({
        "channel_name": list(names), "uniprot_id": [uniprot.get(n) for n in names],
        "is_nuclear_marker": [nuclear.get(n, n == "DAPI") for n in names], "qc_pass": [True] * len(names)})


def check_prediction_target(out: str | os.PathLike) -> None:
    """``out`` must be new, empty or an earlier prediction folder: never a measured dataset or a file."""
    fs, root = fsspec_root(out)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        check_dataset_target(root, PREDICTION, "rosie_predict",
                             file_hint="--out is the prediction folder; pass --ome-tiff to also get <tissue>.ome.tif in it")


def _check_channels(writer: DatasetWriter, names: Sequence[str]) -> None:
    old = writer.read_parquet(layout.channels_path(PREDICTED_MODALITY))
    if old is not None and [str(c) for c in old["channel_name"]] != list(names):
        raise StoreError(f"{writer.root}: its {PREDICTED_MODALITY} channels {list(old['channel_name'])[:5]}... differ from "
                         f"this model's markers {list(names)[:5]}...; write to a new output folder")


def load_reference_hists(path: str | os.PathLike | None, predictor: PatchPredictor | None = None) -> np.ndarray | None:
    """Training-set H&E histograms: a file (``.npy`` or ``.npz``, shape (R,3,256)), else the checkpoint's."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference histogram file not found: {path}")
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            data = data[data.files[0]]
        ref = np.asarray(data, dtype=np.float64)
    elif predictor is not None and predictor.meta.get("reference_he_histograms") is not None:
        ref = np.asarray(predictor.meta["reference_he_histograms"], dtype=np.float64)
    else:
        return None
    if ref.ndim == 2 and ref.shape == (3, 256):
        ref = ref[None]
    if ref.ndim != 3 or ref.shape[1:] != (3, 256):
        raise ValueError(f"reference H&E histograms must have shape (R, 3, 256) (RGB, 256 bins), got {ref.shape}")
    return ref


def store_tissue_inputs(root: str, tissue_id: str, mpp: float | None = None) -> tuple[Any, float, np.ndarray | None, Any, dict]:
    """A dataset's H&E image of a tissue with what else the store knows about it."""
    store = DatasetStore(root)
    img = store.image("he", tissue_id, mpp)
    check_store_he(img, img.path)
    tissue_mask = store.tissue_mask(tissue_id, img.mpp)
    cell_mask = store.cell_mask(tissue_id, img.mpp)
    row: dict = {}
    tissues = store.tissues()
    match = tissues[tissues["tissue_id"].astype(str) == tissue_id]
    if len(match):
        for key in ("patient_id", "split"):
            if key in match.columns:
                row[key] = match.iloc[0][key]
    row["source"] = store.url
    return img, img.mpp, tissue_mask, cell_mask, row


def store_channel_table(root: str, modality: str = PREDICTED_MODALITY) -> pd.DataFrame | None:
    """The measured channels table of a dataset (for UniProt ids), if it has that modality."""
    store = DatasetStore(root)
    return store.channels(modality) if modality in store.modalities() else None


__all__ = [
    "ArrayHE", "HEInputError", "PatchPredictor", "Prediction", "PredictOptions", "RunStats", "TileResult",
    "blend_region", "foreground_grid", "iter_predictions", "open_he_image", "output_shape", "patch_origin",
    "predict_image", "predict_to_dataset", "load_reference_hists", "store_tissue_inputs", "CellAccumulator",
]
