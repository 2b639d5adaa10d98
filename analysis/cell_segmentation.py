"""Cell segmentation that needs no learned weights: nuclei from hematoxylin or DAPI, cells by expansion.

Why: ROSIE's main use is plain H&E, with no multiplex and no cell masks, yet cell-level expression,
phenotyping and neighbourhood analyses need cells. The paper segments the CODEX DAPI channel with
DeepCell/Mesmer; a user with only H&E has no DAPI, and a pretrained network is a file the user may
not have. This default always works: classical image analysis whose every size is in µm, converted
with the image's µm/px. A deep segmenter from the user's own weights is
:mod:`analysis.cell_segmentation_cellpose`.

Nuclei (:func:`segment_nuclei_he`, :func:`segment_nuclei_dapi`; defaults in :class:`NucleusSettings`)
    1. Stain image: the hematoxylin optical density of the H&E by colour deconvolution (Ruifrok &
       Johnston stain vectors, ``skimage.color.rgb2hed``, rescaled to base-10 OD), or the DAPI
       intensity. Gaussian smoothing, σ = ``smooth_um`` (0.25 µm), removes pixel noise but keeps
       the one-pixel gaps between neighbouring nuclei.
    2. A pixel is nuclear when its stain exceeds one global threshold *and* ``local_fraction``
       (0.8) of its neighbourhood's mean (Gaussian, σ = ``local_um``, 2 µm). The global threshold
       is the minimum cross-entropy (Li) threshold over a regular sample of the whole image, so the
       tiles of a slide agree (Otsu cuts inside the broad nuclear class and loses pale vesicular
       nuclei). The local test is the half-maximum edge of a blurred nucleus, and it keeps the thin
       pale gaps inside a dense lymphocyte aggregate, where the global cut would merge everything.
       Enclosed holes up to ``fill_holes_um2`` (20 µm²: pale chromatin, nucleoli) are filled.
    3. Touching nuclei are split by a seeded watershed on the distance transform (smoothed, σ =
       ``split_smooth_um``, 0.5 µm): one seed per maximum at least ``separation_um`` (2.5 µm, about
       the radius of a lymphocyte nucleus) from a higher one.
    4. Size filters: objects under ``min_area_um2`` (8 µm², debris) or over ``max_area_um2``
       (400 µm², folds and unsplit clumps) are dropped.

Cells (:func:`nuclei_to_cells`)
    Each nucleus grows by ``expand_um`` (default :data:`DEFAULT_EXPAND_UM` = 2 µm, between a
    lymphocyte's ~1 µm rim of cytoplasm and an epithelial cell's several µm) into the background,
    the nearest nucleus winning each pixel (``skimage.segmentation.expand_labels``), so cells never
    overlap and a cell keeps its nucleus' id. For H&E, growth is limited to stained tissue
    (:func:`stained_tissue`): no cell reaches into glass or a lumen.

Slides
    Everything runs on tiles of ``tile_px`` (2048) px overlapping by ``overlap_um`` (32 µm): an
    object belongs to the tile whose core holds its centroid, so each object smaller than the
    overlap is segmented whole, once (:func:`segment_tiled`). The label images are in memory (9
    bytes/px: nuclei, tissue, cells): images above :data:`MAX_PIXELS` (10⁹ px) raise
    :class:`SegmentationTooLargeError`.

:func:`object_f1` scores a segmentation against reference masks (one-to-one matches at IoU ≥ 0.5).
Everything is deterministic: no random draws, a fixed tile order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_li
from skimage.segmentation import expand_labels, watershed

#: Largest image (pixels) segmented in memory (int32 nuclei and cells, bool tissue: 9 GB at the limit).
MAX_PIXELS = 1_000_000_000
#: Pixels sampled on a regular grid to choose the global threshold.
THRESHOLD_SAMPLE = 4_000_000
#: rgb2hed divides the natural-log optical density by ln(10⁶); this factor gives base-10 OD.
HED_TO_OD10 = math.log(1e6) / math.log(10.0)
#: Default growth of a nucleus into its cell body, µm.
DEFAULT_EXPAND_UM = 2.0

#: ``read(y, x, h, w)``: one region of an image, as an array.
RegionReader = Callable[[int, int, int, int], np.ndarray]


class SegmentationTooLargeError(ValueError):
    """The image is larger than an in-memory label image allows (:data:`MAX_PIXELS`)."""


@dataclasses.dataclass(frozen=True)
class NucleusSettings:
    """How nuclei are found; lengths in µm, areas in µm² (converted with the image's µm/px).

    ``threshold`` is in stain units (hematoxylin OD for H&E, the DAPI image's own units); ``None``
    chooses it from the image (Li). The module docstring explains each step and default.
    """

    smooth_um: float = 0.25
    threshold: float | None = None
    local_um: float = 2.0
    local_fraction: float = 0.8
    fill_holes_um2: float = 20.0
    separation_um: float = 2.5
    split_smooth_um: float = 0.5
    min_area_um2: float = 8.0
    max_area_um2: float = 400.0
    tile_px: int = 2048
    overlap_um: float = 32.0

    def check(self) -> None:
        """Refuse values outside their physical range before any pixel is read."""
        for name in ("smooth_um", "local_um", "fill_holes_um2", "separation_um", "split_smooth_um", "min_area_um2"):
            if not 0 <= getattr(self, name) <= 1e6:
                raise ValueError(f"{name}={getattr(self, name)}: must be between 0 and 10⁶ (µm or µm²)")
        if not 0 <= self.local_fraction < 1:
            raise ValueError(f"local_fraction={self.local_fraction}: must be in [0, 1) (0 turns the local test off)")
        if not self.max_area_um2 > self.min_area_um2:
            raise ValueError(f"max_area_um2={self.max_area_um2} must exceed min_area_um2={self.min_area_um2}")
        if not 64 <= self.tile_px <= 16384:
            raise ValueError(f"tile_px={self.tile_px}: must be between 64 and 16384 px")
        if not 0 < self.overlap_um <= 1000:
            raise ValueError(f"overlap_um={self.overlap_um}: must be in (0, 1000] µm (objects are cut at tile edges otherwise)")


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Nucleus and cell instance masks of one image (int32, 0 = background; a cell has its nucleus' id)."""

    nuclei: np.ndarray
    cells: np.ndarray
    threshold: float


@dataclasses.dataclass(frozen=True)
class ObjectMatch:
    """Object-level agreement of a predicted and a reference instance mask."""

    n_true: int
    n_pred: int
    n_matched: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float


# ----------------------------------------------------------------------------------------- inputs


def check_mpp(mpp: float) -> float:
    """µm/px must be a physical pixel size (0.001–1000), as everywhere in the project."""
    mpp = float(mpp)
    if not 0.001 <= mpp <= 1000:
        raise ValueError(f"mpp={mpp}: µm per pixel must be between 0.001 and 1000")
    return mpp


def check_size(height: int, width: int, what: str = "image") -> None:
    """Refuse an image whose label image would not fit the in-memory limit."""
    if height * width > MAX_PIXELS:
        raise SegmentationTooLargeError(
            f"{what} of {height}×{width} px is larger than the {MAX_PIXELS:.0e} px that cell segmentation holds in "
            "memory (9 bytes per px of labels); segment regions of the slide separately")


def rgb_reader(rgb: Any) -> tuple[tuple[int, int], RegionReader]:
    """(H, W) and a reader of ``(h, w, 3)`` uint8 regions of an RGB H&E.

    ``rgb`` is an ``(H, W, 3)`` array (numpy, or any sliceable array such as zarr, read region by
    region), or a lazy image with ``shape (3, H, W)`` and ``read(y, x, h, w) -> (3, h, w)`` (the
    project's image interface), so a slide is never read whole.
    """
    lazy = hasattr(rgb, "read") and len(rgb.shape) == 3 and rgb.shape[0] == 3
    if not lazy and (len(rgb.shape) != 3 or rgb.shape[2] not in (3, 4)):
        raise ValueError(f"H&E must be an RGB image (H, W, 3), got shape {tuple(rgb.shape)}")
    if np.dtype(rgb.dtype) != np.uint8:
        raise ValueError(f"H&E must be 8-bit RGB (uint8), got {rgb.dtype}; convert with skimage.util.img_as_ubyte")
    if lazy:
        return (int(rgb.shape[1]), int(rgb.shape[2])), lambda y, x, h, w: np.moveaxis(np.asarray(rgb.read(y, x, h, w)), 0, -1)
    return (int(rgb.shape[0]), int(rgb.shape[1])), lambda y, x, h, w: np.asarray(rgb[y : y + h, x : x + w, :3])


def plane_reader(plane: Any, what: str = "DAPI") -> tuple[tuple[int, int], RegionReader]:
    """(H, W) and a reader of float32 regions of a 2-D image (numpy or any sliceable array)."""
    if len(plane.shape) != 2:
        raise ValueError(f"{what} must be one 2-D plane (H, W), got shape {tuple(plane.shape)}")
    shape = (int(plane.shape[0]), int(plane.shape[1]))
    return shape, lambda y, x, h, w: np.asarray(plane[y : y + h, x : x + w], np.float32)


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (base 10) of an ``(h, w, 3)`` uint8 RGB region, float32."""
    return (rgb2hed(rgb[..., :3])[..., 0] * HED_TO_OD10).astype(np.float32)


def stained_tissue(rgb: np.ndarray, mpp: float, min_od: float = 0.15, smooth_um: float = 2.0) -> np.ndarray:
    """Stained tissue: total optical density of the RGB (smoothed, σ ``smooth_um``) above ``min_od``.

    Glass and lumens transmit nearly all light (summed OD ≈ 0.03–0.1 from the scanner's
    illumination); stained tissue absorbs more.
    """
    od = -np.log10(np.maximum(rgb[..., :3].astype(np.float32), 1.0) / 255.0).sum(axis=-1)
    return smooth(od, smooth_um / check_mpp(mpp)) > min_od


def smooth(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing in float32 (a no-op for σ 0)."""
    image = np.asarray(image, np.float32)
    return ndimage.gaussian_filter(image, sigma_px) if sigma_px > 0 else image


# ------------------------------------------------------------------------------------- the tiling


Box = tuple[int, int, int, int]


def tiles(shape: tuple[int, int], core_px: int, margin_px: int) -> list[tuple[Box, Box]]:
    """(core, region) boxes (y, x, h, w), row-major; a region is its core grown by the margin, clipped."""
    height, width = shape
    out = []
    for y in range(0, height, core_px):
        for x in range(0, width, core_px):
            h, w = min(core_px, height - y), min(core_px, width - x)
            y0, x0 = max(y - margin_px, 0), max(x - margin_px, 0)
            y1, x1 = min(y + h + margin_px, height), min(x + w + margin_px, width)
            out.append(((y, x, h, w), (y0, x0, y1 - y0, x1 - x0)))
    return out


def map_tiles(shape: tuple[int, int], compute: Callable[[int, int, int, int], np.ndarray], core_px: int,
              margin_px: int, dtype: Any) -> np.ndarray:
    """A whole image from a per-region computation whose value at a pixel needs at most ``margin_px`` around it."""
    out = np.zeros(shape, dtype)
    for (y, x, h, w), (y0, x0, rh, rw) in tiles(shape, core_px, margin_px):
        out[y : y + h, x : x + w] = compute(y0, x0, rh, rw)[y - y0 : y - y0 + h, x - x0 : x - x0 + w]
    return out


def segment_tiled(shape: tuple[int, int], segment_region: RegionReader, core_px: int, margin_px: int) -> np.ndarray:
    """Instance labels of a whole image from a function that segments one region.

    ``segment_region(y, x, h, w)`` returns int labels of that region (0 = background). Regions are
    core tiles of ``core_px`` grown by ``margin_px`` on every side; an object is kept by the tile
    whose core holds its centroid and written only where no earlier object lies, so every object
    appears once, with ids 1..n in tile order.
    """
    check_size(*shape)
    out = np.zeros(shape, np.int32)
    next_id = 1
    for (y, x, h, w), (y0, x0, rh, rw) in tiles(shape, core_px, margin_px):
        labels = np.asarray(segment_region(y0, x0, rh, rw))
        owned = owned_labels(labels, (y - y0, x - x0, h, w))
        if owned.size == 0:
            continue
        new = np.zeros(int(labels.max()) + 1, np.int32)
        new[owned] = np.arange(next_id, next_id + owned.size, dtype=np.int32)
        next_id += owned.size
        relabelled = new[labels]
        target = out[y0 : y0 + rh, x0 : x0 + rw]
        free = (relabelled > 0) & (target == 0)
        target[free] = relabelled[free]
    return out


def owned_labels(labels: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
    """Sorted ids of the objects of ``labels`` whose centroid lies in ``core`` = (y, x, h, w)."""
    flat = labels.reshape(-1)
    n = int(flat.max()) if flat.size else 0
    if n <= 0:
        return np.zeros(0, np.int64)
    rows, cols = np.divmod(np.arange(flat.size), labels.shape[1])
    count = np.bincount(flat, minlength=n + 1).astype(np.float64)
    cy = np.bincount(flat, weights=rows, minlength=n + 1) / np.maximum(count, 1)
    cx = np.bincount(flat, weights=cols, minlength=n + 1) / np.maximum(count, 1)
    y, x, h, w = core
    inside = (count > 0) & (cy >= y) & (cy < y + h) & (cx >= x) & (cx < x + w)
    inside[0] = False
    return np.flatnonzero(inside)


# ------------------------------------------------------------------------------------------ nuclei


def choose_threshold(shape: tuple[int, int], stain_region: RegionReader, tile_px: int, smooth_px: float) -> float:
    """Li threshold of the smoothed stain over a regular sample of the whole image (``inf``: uniform, no nuclei)."""
    step = max(1, math.ceil(math.sqrt(shape[0] * shape[1] / THRESHOLD_SAMPLE)))
    samples = []
    for (y, x, h, w), _ in tiles(shape, tile_px, 0):
        stain = smooth(stain_region(y, x, h, w), smooth_px)
        samples.append(stain[(-y) % step :: step, (-x) % step :: step].reshape(-1))
    values = np.concatenate(samples)
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return math.inf
    return float(threshold_li(values))


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """``mask`` with enclosed background components of at most ``max_px`` pixels filled."""
    holes, n = ndimage.label(~mask)
    if n == 0:
        return mask
    size = np.bincount(holes.reshape(-1), minlength=n + 1)
    fill = size <= max_px
    fill[0] = False
    fill[np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])] = False  # open to the edge
    return mask | fill[holes]


def split_nuclei(foreground: np.ndarray, separation_px: float, smooth_px: float) -> np.ndarray:
    """Seeded watershed on the distance transform: touching nuclei get one label each.

    Seeds are maxima of the smoothed distance to the background at least ``separation_px`` apart:
    two round nuclei that touch have two such maxima, joined by a narrower neck.
    """
    distance = smooth(ndimage.distance_transform_edt(foreground), smooth_px)
    components, _ = ndimage.label(foreground)
    peaks = peak_local_max(distance, min_distance=max(1, int(round(separation_px))), labels=components,
                           exclude_border=False)
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-distance, markers, mask=foreground).astype(np.int32)


def nuclei_in_region(stain: np.ndarray, threshold: float, mpp: float, settings: NucleusSettings) -> np.ndarray:
    """Nucleus labels of one stain region (higher = more stain), given the image's global ``threshold``."""
    px2 = mpp * mpp
    smoothed = smooth(stain, settings.smooth_um / mpp)
    foreground = smoothed > threshold
    if settings.local_fraction > 0:
        foreground &= smoothed > settings.local_fraction * smooth(smoothed, settings.local_um / mpp)
    if settings.fill_holes_um2 > 0:
        foreground = fill_small_holes(foreground, settings.fill_holes_um2 / px2)
    labels = split_nuclei(foreground, settings.separation_um / mpp, settings.split_smooth_um / mpp)
    area = np.bincount(labels.reshape(-1))
    keep = (area >= settings.min_area_um2 / px2) & (area <= settings.max_area_um2 / px2)
    keep[0] = False
    return np.where(keep[labels], labels, 0).astype(np.int32)


def segment_nuclei(shape: tuple[int, int], stain_region: RegionReader, mpp: float,
                   settings: NucleusSettings | None = None) -> tuple[np.ndarray, float]:
    """Nuclei of any stain image given by a region reader (more stain = nucleus); labels and the threshold used."""
    settings = settings or NucleusSettings()
    settings.check()
    mpp = check_mpp(mpp)
    check_size(*shape)
    threshold = settings.threshold
    if threshold is None:
        threshold = choose_threshold(shape, stain_region, settings.tile_px, settings.smooth_um / mpp)
    if not math.isfinite(threshold):
        return np.zeros(shape, np.int32), float(threshold)
    margin = math.ceil(settings.overlap_um / mpp)
    labels = segment_tiled(shape, lambda y, x, h, w: nuclei_in_region(stain_region(y, x, h, w), float(threshold), mpp,
                                                                      settings), settings.tile_px, margin)
    return labels, float(threshold)


def segment_nuclei_he(rgb: Any, mpp: float, settings: NucleusSettings | None = None) -> np.ndarray:
    """Nucleus instance labels (int32) of an RGB H&E at ``mpp`` µm/px, from its hematoxylin channel."""
    shape, read = rgb_reader(rgb)
    return segment_nuclei(shape, lambda y, x, h, w: hematoxylin_od(read(y, x, h, w)), mpp, settings)[0]


def segment_nuclei_dapi(dapi: Any, mpp: float, settings: NucleusSettings | None = None) -> np.ndarray:
    """Nucleus instance labels (int32) of a DAPI (or other nuclear stain) plane ``(H, W)`` at ``mpp`` µm/px.

    ``dapi`` is any sliceable 2-D array (numpy, or zarr read region by region); brighter = more DNA.
    """
    return segment_nuclei(*plane_reader(dapi), mpp, settings)[0]


# ------------------------------------------------------------------------------------------- cells


def nuclei_to_cells(nuclei: np.ndarray, mpp: float, expand_um: float = DEFAULT_EXPAND_UM,
                    within: np.ndarray | None = None, tile_px: int = 2048) -> np.ndarray:
    """Cell bodies: every nucleus grown by ``expand_um`` µm, the nearest nucleus winning each pixel.

    ``within`` (bool, same shape) limits growth to those pixels (nuclei are always kept). Computed
    tile by tile with a margin of the growth distance, which gives exactly the whole-image result.
    """
    mpp = check_mpp(mpp)
    if not 0 <= expand_um <= 100:
        raise ValueError(f"expand_um={expand_um}: must be between 0 and 100 µm")
    nuclei = np.asarray(nuclei)
    if nuclei.ndim != 2 or not np.issubdtype(nuclei.dtype, np.integer):
        raise ValueError(f"nuclei must be a 2-D integer label image, got {nuclei.shape} {nuclei.dtype}")
    if within is not None and np.shape(within) != nuclei.shape:
        raise ValueError(f"within mask shape {np.shape(within)} differs from the nuclei's {nuclei.shape}")
    check_size(*nuclei.shape)
    distance = expand_um / mpp

    def grow(y: int, x: int, h: int, w: int) -> np.ndarray:
        region = nuclei[y : y + h, x : x + w].astype(np.int32)
        grown = expand_labels(region, distance) if distance > 0 else region
        if within is not None:
            grown = np.where(np.asarray(within[y : y + h, x : x + w], bool) | (region > 0), grown, 0)
        return grown

    return map_tiles(nuclei.shape, grow, tile_px, math.ceil(distance) + 1, np.int32)


def segment_cells_he(rgb: Any, mpp: float, expand_um: float = DEFAULT_EXPAND_UM,
                     settings: NucleusSettings | None = None) -> Segmentation:
    """Nuclei from the hematoxylin channel, grown by ``expand_um`` µm within stained tissue.

    The H&E is read three times, region by region (threshold sample, nuclei, tissue), so a lazy
    slide is never held whole.
    """
    shape, read = rgb_reader(rgb)
    nuclei, threshold = segment_nuclei(shape, lambda y, x, h, w: hematoxylin_od(read(y, x, h, w)), mpp, settings)
    tile = (settings or NucleusSettings()).tile_px
    tissue = map_tiles(shape, lambda y, x, h, w: stained_tissue(read(y, x, h, w), mpp), tile,
                       math.ceil(8.0 / mpp), bool)  # 4σ of stained_tissue's smoothing
    return Segmentation(nuclei, nuclei_to_cells(nuclei, mpp, expand_um, within=tissue, tile_px=tile), threshold)


def segment_cells_dapi(dapi: Any, mpp: float, expand_um: float = DEFAULT_EXPAND_UM,
                       settings: NucleusSettings | None = None) -> Segmentation:
    """Nuclei from a DAPI plane, grown by ``expand_um`` µm (DAPI shows no cytoplasm to limit growth)."""
    nuclei, threshold = segment_nuclei(*plane_reader(dapi), mpp, settings)
    return Segmentation(nuclei, nuclei_to_cells(nuclei, mpp, expand_um, tile_px=(settings or NucleusSettings()).tile_px),
                        threshold)


# ------------------------------------------------------------------------------------------ scoring


def object_f1(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.5,
              rows_per_chunk: int = 4096) -> ObjectMatch:
    """Precision, recall and F1 of one-to-one object matches with IoU ≥ ``iou``.

    Overlaps are counted in row chunks (memory bounded for slide-sized masks). Pairs are matched
    greedily by decreasing IoU, each object at most once; for ``iou`` > 0.5 an object overlaps at
    most one partner that much, so the matching is the unique maximum one (at exactly 0.5 a tie is
    broken by the higher IoU, then the lower ids). Two empty masks agree perfectly (all 1.0).
    """
    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"predicted mask {pred.shape} and reference mask {true.shape} must be 2-D of one shape")
    if not 0 < iou <= 1:
        raise ValueError(f"iou={iou}: must be in (0, 1]")
    for name, arr in (("predicted", pred), ("reference", true)):
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
            raise ValueError(f"{name} mask must hold non-negative integer instance ids, got {arr.dtype}")
    n_p = int(pred.max()) + 1 if pred.size else 1
    n_t = int(true.max()) + 1 if true.size else 1
    area_p, area_t = np.zeros(n_p, np.int64), np.zeros(n_t, np.int64)
    keys, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for r in range(0, pred.shape[0], rows_per_chunk):
        p = pred[r : r + rows_per_chunk].reshape(-1).astype(np.int64)
        t = true[r : r + rows_per_chunk].reshape(-1).astype(np.int64)
        area_p += np.bincount(p, minlength=n_p)
        area_t += np.bincount(t, minlength=n_t)
        both = (p > 0) & (t > 0)
        k, c = np.unique(p[both] * n_t + t[both], return_counts=True)
        keys.append(k)
        counts.append(c)
    key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    inter = np.bincount(inverse, weights=np.concatenate(counts), minlength=key.size)
    pid, tid = key // n_t, key % n_t
    pair_iou = inter / (area_p[pid] + area_t[tid] - inter)
    used_p, used_t = np.zeros(n_p, bool), np.zeros(n_t, bool)
    matched = []
    for k in np.lexsort((tid, pid, -pair_iou)):
        if pair_iou[k] < iou:
            break
        if not used_p[pid[k]] and not used_t[tid[k]]:
            used_p[pid[k]] = used_t[tid[k]] = True
            matched.append(pair_iou[k])
    n_pred, n_true, tp = int((area_p[1:] > 0).sum()), int((area_t[1:] > 0).sum()), len(matched)
    if n_pred == 0 and n_true == 0:
        return ObjectMatch(0, 0, 0, 1.0, 1.0, 1.0, 0.0)
    return ObjectMatch(n_true, n_pred, tp, tp / max(n_pred, 1), tp / max(n_true, 1), 2 * tp / (n_pred + n_true),
                       float(np.mean(matched)) if matched else 0.0)
