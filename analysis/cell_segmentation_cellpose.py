"""Cellpose as an optional deep segmenter, from a weights file the user already has.

Why an adapter and not the default: the classical segmenter of :mod:`analysis.cell_segmentation`
needs no weights, but a network trained on annotated nuclei separates touching nuclei in dense
tumour far better. Cellpose installs from PyPI with PyTorch (``pip install 'virtuplex[segment]'``,
``cellpose>=3``), reads a plain state-dict file, and segments H&E (Cellpose-SAM, version 4) or a
nuclear channel (versions 3 and 4).

What it guarantees, on top of Cellpose:

* **No download, ever.** Cellpose replaces a path that does not exist by a built-in model name and
  downloads it; here the weights must be an existing file, checked before Cellpose is imported,
  so a typo is an error, never a silent 1 GB download of other weights.
* **No code from the file.** The file's pickle is scanned for anything that is not tensor
  rebuilding (:func:`lightning_modules.components.model_files.unsafe_globals`) and refused with
  the project's :class:`~lightning_modules.components.model_files.UnsafeModelFileError`; Cellpose
  itself then loads it with ``torch.load(weights_only=True)``.
* **µm, slides, one normalisation.** The object diameter is given in µm and converted with the
  image's µm/px; the image is segmented tile by tile with overlap, with the same ownership rule as
  the classical segmenter (:func:`analysis.cell_segmentation.segment_tiled`); and every tile is
  scaled by the 1st–99th percentiles of the *whole* image (Cellpose would use each tile's own),
  so tiles of one slide see one intensity scale.

Input per version: Cellpose 4 (one model for every image type) gets the RGB H&E as is, or the
DAPI plane; Cellpose 3 networks read one grey channel with bright objects, so an H&E is given as
its hematoxylin optical density (nuclei bright), a DAPI plane as is.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.cell_segmentation import (
    THRESHOLD_SAMPLE,
    RegionReader,
    check_mpp,
    check_size,
    hematoxylin_od,
    plane_reader,
    rgb_reader,
    segment_tiled,
    tiles,
)
from lightning_modules.components.model_files import ModelFileError, UnsafeModelFileError, unsafe_globals

INSTALL_HINT = "install the optional extra: pip install 'virtuplex[segment]' (cellpose>=3)"


@dataclasses.dataclass(frozen=True)
class CellposeSettings:
    """How Cellpose runs; lengths in µm, areas in µm².

    ``diameter_um``: typical object diameter; ``None`` leaves the scale to the model (right for
    Cellpose 4, which is trained across sizes; a Cellpose 3 model assumes its training diameter,
    30 px for cells and 17 px for nuclei, so give the diameter for those).
    """

    diameter_um: float | None = None
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_area_um2: float = 8.0
    tile_px: int = 2048
    overlap_um: float = 32.0
    batch_size: int = 8

    def check(self) -> None:
        """Refuse values outside their physical range before the model is loaded."""
        if self.diameter_um is not None and not 0.5 <= self.diameter_um <= 500:
            raise ValueError(f"diameter_um={self.diameter_um}: must be between 0.5 and 500 µm")
        if not self.min_area_um2 >= 0:
            raise ValueError(f"min_area_um2={self.min_area_um2}: must be >= 0")
        if not 64 <= self.tile_px <= 16384:
            raise ValueError(f"tile_px={self.tile_px}: must be between 64 and 16384 px")
        if not 0 < self.overlap_um <= 1000:
            raise ValueError(f"overlap_um={self.overlap_um}: must be in (0, 1000] µm")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be a positive integer")


def check_weights_file(path: str | os.PathLike) -> Path:
    """The weights must be an existing, non-empty file whose pickle runs no code (checked without loading it)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such Cellpose weights file; give the path of a weights file you already "
                                "have (virtuplex never downloads models)")
    if not path.is_file():
        raise ModelFileError(f"{path}: is a folder, not a Cellpose weights file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the Cellpose weights file is empty (0 bytes); copy it again")
    try:
        calls = unsafe_globals(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ModelFileError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
    if calls:
        raise UnsafeModelFileError(f"{path}: refusing this Cellpose weights file: unpickling it would run code from the "
                                   f"file (it calls {', '.join(calls[:3])}); re-save only the state dict")
    return path


def import_cellpose() -> tuple[Any, int]:
    """``cellpose.models`` and Cellpose's major version; a clear ImportError when the extra is missing."""
    try:
        models = importlib.import_module("cellpose.models")
    except ImportError as exc:
        raise ImportError(f"Cellpose segmentation needs the cellpose package ({exc}); {INSTALL_HINT}") from None
    version = importlib.metadata.version("cellpose")
    major = int(version.split(".")[0])
    if major < 3:
        raise ImportError(f"cellpose {version} is too old for this adapter; {INSTALL_HINT}")
    return models, major


def resolve_torch_device(device: str) -> Any:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device (``auto``: CUDA when available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or auto") from None


class CellposeSegmenter:
    """A Cellpose model loaded once from a local weights file; :meth:`segment_he` / :meth:`segment_plane` reuse it."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu"):
        self.weights = check_weights_file(weights)
        models, self.major = import_cellpose()
        self.device = resolve_torch_device(device)
        gpu = self.device.type != "cpu"
        if self.major >= 4:
            self.model = models.CellposeModel(gpu=gpu, pretrained_model=str(self.weights), device=self.device)
        else:
            self.model = models.CellposeModel(gpu=gpu, pretrained_model=str(self.weights), model_type=None,
                                              device=self.device)

    def segment_he(self, rgb: Any, mpp: float, settings: CellposeSettings | None = None) -> np.ndarray:
        """Instance labels (int32) of an RGB H&E at ``mpp`` µm/px (a ``(H, W, 3)`` array or a lazy ``(3, H, W)`` image)."""
        shape, read = rgb_reader(rgb)
        if self.major >= 4:
            return self.segment_regions(shape, lambda y, x, h, w: read(y, x, h, w).astype(np.float32), mpp, settings)
        return self.segment_regions(shape, lambda y, x, h, w: hematoxylin_od(read(y, x, h, w)), mpp, settings)

    def segment_plane(self, plane: Any, mpp: float, settings: CellposeSettings | None = None) -> np.ndarray:
        """Instance labels (int32) of one nuclear plane ``(H, W)`` (DAPI; brighter = more DNA)."""
        return self.segment_regions(*plane_reader(plane), mpp, settings)

    def segment_regions(self, shape: tuple[int, int], read: RegionReader, mpp: float,
                        settings: CellposeSettings | None = None) -> np.ndarray:
        """Tile-by-tile Cellpose over an image given by a region reader (``(h, w)`` or ``(h, w, C)`` float32)."""
        settings = settings or CellposeSettings()
        settings.check()
        mpp = check_mpp(mpp)
        check_size(*shape)
        low, high = intensity_bounds(shape, read, settings.tile_px)
        scale = np.where(high > low, high - low, 1.0).astype(np.float32)
        diameter = None if settings.diameter_um is None else settings.diameter_um / mpp
        min_px = int(round(settings.min_area_um2 / (mpp * mpp)))

        def region(y: int, x: int, h: int, w: int) -> np.ndarray:
            image = (read(y, x, h, w).astype(np.float32) - low) / scale
            kwargs: dict[str, Any] = dict(batch_size=settings.batch_size, normalize=False, diameter=diameter,
                                          flow_threshold=settings.flow_threshold,
                                          cellprob_threshold=settings.cellprob_threshold, min_size=min_px)
            if image.ndim == 3:
                kwargs["channel_axis"] = -1
            if self.major < 4:
                kwargs["channels"] = [0, 0]
            masks = self.model.eval(image, **kwargs)[0]
            return np.asarray(masks, dtype=np.int32)

        return segment_tiled(shape, region, settings.tile_px, math.ceil(settings.overlap_um / mpp))


def intensity_bounds(shape: tuple[int, int], read: RegionReader, tile_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel 1st and 99th percentiles over a regular sample of the whole image (Cellpose's own scaling)."""
    step = max(1, math.ceil(math.sqrt(shape[0] * shape[1] / THRESHOLD_SAMPLE)))
    samples = []
    for (y, x, h, w), _ in tiles(shape, tile_px, 0):
        region = np.asarray(read(y, x, h, w), np.float32)[(-y) % step :: step, (-x) % step :: step]
        samples.append(region.reshape(-1, *region.shape[2:]))
    values = np.concatenate(samples)
    return (np.percentile(values, 1.0, axis=0).astype(np.float32),
            np.percentile(values, 99.0, axis=0).astype(np.float32))


def segment_cellpose(image: Any, mpp: float, weights: str | os.PathLike, kind: str = "he",
                     settings: CellposeSettings | None = None, device: str = "cpu") -> np.ndarray:
    """One-call Cellpose: ``kind`` ``he`` (RGB H&E) or ``dapi`` (one nuclear plane); returns int32 labels."""
    if kind not in ("he", "dapi"):
        raise ValueError(f"kind={kind!r}: must be 'he' or 'dapi'")
    (settings or CellposeSettings()).check()
    check_mpp(mpp)
    segmenter = CellposeSegmenter(weights, device)
    return segmenter.segment_he(image, mpp, settings) if kind == "he" else segmenter.segment_plane(image, mpp, settings)
