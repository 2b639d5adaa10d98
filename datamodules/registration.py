"""Co-registration of an H&E image to the DAPI channel of a co-stained CODEX sample (ROSIE Methods).

ROSIE: "The CODEX DAPI channel and a grayscale version of the H&E image are used to perform image
registration. Both images have their contrast enhanced using contrast-limited adaptive histogram
equalization. The SIFT features of each image are then found and matched based on the RANSAC
algorithm to find an image transformation from the H&E image to the CODEX coordinate space. The
transformation was limited to a partial affine transformation (translation, rotation, uniform
scaling). If the initial alignment based on the grayscale H&E image was not successful, the process
was repeated using the nuclear channel of the deconvolved H&E image ... or individual color
channels of the H&E image."

Nuclei are dark in H&E and bright in DAPI, and SIFT descriptors are not invariant to contrast
inversion, so every H&E signal is inverted (or, for hematoxylin, taken as optical density) so that
nuclei are bright in both images before CLAHE.

    python -m experiments.data_register --he HE.tif --dapi CODEX.ome.tif [--dapi-channel DAPI] --out HE_registered.ome.tif
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence

import numpy as np

DAPI_PATTERN = re.compile(r"^(dapi.*|hoechst.*|dna\d*|dsdna|draq\d|h3|hh3|histone.*h3|nuc)$", re.IGNORECASE)


class RegistrationError(ValueError):
    """No transform with enough consistent matches was found (the images may not show the same tissue)."""


@dataclasses.dataclass
class Registration:
    """`transform` maps H&E pixel coordinates (x, y) to DAPI pixel coordinates: dst = A @ [x, y, 1]."""

    transform: np.ndarray  # (2, 3) float64
    n_inliers: int
    n_matches: int
    residual_px: float  # median reprojection error of the inliers, in full-resolution DAPI pixels
    signal: str  # which H&E signal succeeded: grey, hematoxylin, red, green, blue

    @property
    def scale(self) -> float:
        return float(math.hypot(self.transform[0, 0], self.transform[1, 0]))

    @property
    def rotation_deg(self) -> float:
        return float(math.degrees(math.atan2(self.transform[1, 0], self.transform[0, 0])))

    @property
    def translation(self) -> tuple[float, float]:
        return float(self.transform[0, 2]), float(self.transform[1, 2])

    def to_dict(self) -> dict:
        return {"transform": self.transform.tolist(), "n_inliers": self.n_inliers, "n_matches": self.n_matches,
                "residual_px": self.residual_px, "signal": self.signal, "scale": self.scale,
                "rotation_deg": self.rotation_deg, "translation": self.translation}


# ============================================================================================
# Signals
# ============================================================================================


def to_uint8(signal: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust min–max to uint8 (percentiles, so a few hot pixels do not flatten the contrast)."""
    x = np.asarray(signal, dtype=np.float32)
    lo, hi = np.percentile(x, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((x - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)


def clahe(signal: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    import cv2

    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(to_uint8(signal))


def he_signals(rgb: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """H&E signals to try in ROSIE's order, each with nuclei bright: grey, hematoxylin, colours."""
    from skimage.color import rgb2gray, rgb2hed

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"H&E must be (Y,X,3) RGB, got shape {rgb.shape}")
    yield "grey", 1.0 - rgb2gray(rgb)
    yield "hematoxylin", rgb2hed(rgb)[..., 0]
    for i, name in enumerate(("red", "green", "blue")):
        yield name, 255.0 - rgb[..., i].astype(np.float32)


def find_dapi_channel(names: Sequence[str], preferred: str | None = None) -> int:
    if preferred is not None:
        if preferred not in names:
            raise RegistrationError(f"channel {preferred!r} not among {list(names)}")
        return list(names).index(preferred)
    for i, n in enumerate(names):
        if DAPI_PATTERN.match(str(n)):
            return i
    raise RegistrationError(f"no DAPI/Hoechst/DNA channel among {list(names)[:12]}{'...' if len(names) > 12 else ''}")


# ============================================================================================
# Registration
# ============================================================================================


def _downsample(img: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Image shrunk to at most `max_side` px and the 3×3 map full-res px → small px (pixel centres)."""
    import cv2

    s = min(1.0, max_side / max(img.shape))
    if s >= 1.0:
        return img, np.eye(3)
    h, w = img.shape
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    sx, sy = small.shape[1] / w, small.shape[0] / h
    d = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])
    return small, d


def match_sift(moving: np.ndarray, fixed: np.ndarray, ratio: float = 0.75, n_features: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoint coordinates (N,2) in `moving` and `fixed` after Lowe's ratio test."""
    import cv2

    sift = cv2.SIFT_create(nfeatures=n_features)
    kp_m, des_m = sift.detectAndCompute(moving, None)
    kp_f, des_f = sift.detectAndCompute(fixed, None)
    if des_m is None or des_f is None or len(kp_m) < 2 or len(kp_f) < 2:
        return np.zeros((0, 2)), np.zeros((0, 2))
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_m, des_f, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    src = np.array([kp_m[m.queryIdx].pt for m in good], dtype=np.float64).reshape(-1, 2)
    dst = np.array([kp_f[m.trainIdx].pt for m in good], dtype=np.float64).reshape(-1, 2)
    return src, dst


def register_images(moving: np.ndarray, fixed: np.ndarray, max_side: int = 2048, ratio: float = 0.75,
                    ransac_px: float = 3.0, min_inliers: int = 12, signal: str = "grey") -> Registration:
    """Partial-affine (rotation, uniform scale, translation) transform moving → fixed by SIFT + RANSAC.

    Both 2-D signals are CLAHE-enhanced; large images are registered at `max_side` px and the
    transform is mapped back to full resolution.
    """
    import cv2

    m_small, d_m = _downsample(clahe(moving), max_side)
    f_small, d_f = _downsample(clahe(fixed), max_side)
    src, dst = match_sift(m_small, f_small, ratio=ratio)
    if len(src) < max(3, min_inliers):
        raise RegistrationError(f"only {len(src)} SIFT matches survive the ratio test ({signal} signal)")
    a_small, inliers = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.RANSAC,
                                                   ransacReprojThreshold=ransac_px, maxIters=5000, confidence=0.999,
                                                   refineIters=20)
    if a_small is None:
        raise RegistrationError(f"RANSAC found no consistent transform ({signal} signal, {len(src)} matches)")
    inliers = inliers.reshape(-1).astype(bool)
    if inliers.sum() < min_inliers:
        raise RegistrationError(f"{int(inliers.sum())} RANSAC inliers < {min_inliers} ({signal} signal, {len(src)} matches)")
    t_small = np.vstack([a_small, [0, 0, 1]])
    full = np.linalg.inv(d_f) @ t_small @ d_m
    # residual in full-resolution fixed pixels
    def to_full(pts: np.ndarray, d: np.ndarray) -> np.ndarray:
        return (np.linalg.inv(d) @ np.c_[pts, np.ones(len(pts))].T).T[:, :2]

    src_f, dst_f = to_full(src[inliers], d_m), to_full(dst[inliers], d_f)
    pred = (full @ np.c_[src_f, np.ones(len(src_f))].T).T[:, :2]
    residual = float(np.median(np.linalg.norm(pred - dst_f, axis=1)))
    return Registration(full[:2].copy(), int(inliers.sum()), int(len(src)), residual, signal)


def register_he_to_dapi(he_rgb: np.ndarray, dapi: np.ndarray, max_side: int = 2048, ratio: float = 0.75,
                        ransac_px: float = 3.0, min_inliers: int = 12, max_residual_px: float = 3.0) -> Registration:
    """H&E (Y,X,3) uint8 → DAPI (Y,X) transform; tries ROSIE's fallback signals in turn."""
    failures = []
    for name, signal in he_signals(he_rgb):
        try:
            reg = register_images(signal, dapi, max_side=max_side, ratio=ratio, ransac_px=ransac_px,
                                  min_inliers=min_inliers, signal=name)
        except RegistrationError as exc:
            failures.append(str(exc))
            continue
        if reg.residual_px <= max_residual_px:
            return reg
        failures.append(f"{name} signal: median residual {reg.residual_px:.2f} px > {max_residual_px}")
    raise RegistrationError("registration failed for every H&E signal: " + "; ".join(failures))


def warp_to(image: np.ndarray, transform: np.ndarray, shape: tuple[int, int], fill: float = 0,
            channels_last: bool = False, interpolation: str = "linear") -> np.ndarray:
    """Resample `image` ((C,Y,X), (Y,X), or (Y,X,C) with `channels_last`) into the `shape` grid.

    `transform` maps source pixel (x, y) to destination pixel (x, y), as returned by registration.
    """
    import cv2

    flags = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "cubic": cv2.INTER_CUBIC}[interpolation]
    image = np.asarray(image)
    planes = image[None] if image.ndim == 2 else (np.moveaxis(image, -1, 0) if channels_last else image)
    h, w = shape
    m = np.asarray(transform, dtype=np.float64).reshape(2, 3)
    work_dtype = planes.dtype if planes.dtype in (np.uint8, np.uint16, np.float32, np.float64) else np.float32
    out = np.empty((planes.shape[0], h, w), dtype=work_dtype)
    for i, plane in enumerate(planes):
        out[i] = cv2.warpAffine(np.ascontiguousarray(plane, dtype=work_dtype), m, (w, h), flags=flags,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    out = out.astype(image.dtype, copy=False)
    if image.ndim == 2:
        return out[0]
    return np.moveaxis(out, 0, -1) if channels_last else out



# ============================================================================================
# Slide scale: register from downsampled images, warp tile by tile
# ============================================================================================


def _full_to_small(factor: float) -> np.ndarray:
    """3×3 map from full-resolution px to the px of a factor-``f`` block-mean thumbnail (pixel centres)."""
    f = float(factor)
    return np.array([[1 / f, 0, 0.5 / f - 0.5], [0, 1 / f, 0.5 / f - 0.5], [0, 0, 1.0]])


def register_downsampled(he: object, dapi: object, max_side: int = 2048, **kwargs: float) -> Registration:
    """H&E → DAPI registration of slide-sized images from their thumbnails, mapped to full resolution.

    ``he`` (``(3,H,W)`` uint8) and ``dapi`` (``(1,H,W)``) are lazy readers (``shape``, ``read``; a
    :class:`datamodules.slide_readers.SlideReader` uses its pyramid). Both are block-averaged to at
    most ``max_side`` px, registered as in :func:`register_he_to_dapi`, and the transform is
    composed with the two scalings; the residual is reported in full-resolution DAPI px.
    """
    from datamodules.slide_readers import ReadableReader, SlideReader

    he_r = he if isinstance(he, SlideReader) else ReadableReader(he)
    dapi_r = dapi if isinstance(dapi, SlideReader) else ReadableReader(dapi)
    he_small, f_he = he_r.thumbnail(max_side)
    dapi_small, f_dapi = dapi_r.thumbnail(max_side)
    side = max(he_small.shape[1:] + dapi_small.shape[1:]) + 1
    reg = register_he_to_dapi(np.moveaxis(he_small, 0, -1), dapi_small[0], max_side=side, **kwargs)
    small = np.vstack([reg.transform, [0, 0, 1]])
    full = np.linalg.inv(_full_to_small(f_dapi)) @ small @ _full_to_small(f_he)
    return Registration(full[:2].copy(), reg.n_inliers, reg.n_matches, reg.residual_px * f_dapi, reg.signal)


class WarpedImage:
    """``source`` resampled into a ``shape`` grid by ``transform`` (source px → destination px), lazily.

    ``read(y, x, h, w)`` reads only the source region the destination tile maps from (plus a
    margin for the interpolation) and warps it, so a slide is registered with a few tiles in memory;
    the result equals :func:`warp_to` of the whole image up to rounding of the interpolation
    weights. Pixels mapping outside the source get ``fill``.
    """

    def __init__(self, source: object, transform: np.ndarray, shape: tuple[int, int], fill: float = 0,
                 interpolation: str = "linear", margin: int = 3):
        self.source = source
        c = int(source.shape[0])  # type: ignore[attr-defined]
        self.shape = (c, int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(source.dtype)  # type: ignore[attr-defined]
        self.forward = np.vstack([np.asarray(transform, dtype=np.float64).reshape(2, 3), [0, 0, 1]])
        self.inverse = np.linalg.inv(self.forward)
        self.fill, self.interpolation, self.margin = fill, interpolation, margin
        self.name = f"{getattr(source, 'name', 'image')} (registered)"

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        import cv2

        _, sh, sw = self.source.shape  # type: ignore[attr-defined]
        corners = np.array([[x - 1, y - 1, 1], [x + w, y - 1, 1], [x - 1, y + h, 1], [x + w, y + h, 1]], dtype=np.float64).T
        src = (self.inverse @ corners)[:2]
        x0 = max(0, int(math.floor(src[0].min())) - self.margin)
        y0 = max(0, int(math.floor(src[1].min())) - self.margin)
        x1 = min(sw, int(math.ceil(src[0].max())) + self.margin + 1)
        y1 = min(sh, int(math.ceil(src[1].max())) + self.margin + 1)
        c = self.shape[0]
        if x1 <= x0 or y1 <= y0:
            out = np.full((c, h, w), self.fill, dtype=self.dtype)
        else:
            block = np.asarray(self.source.read(y0, x0, y1 - y0, x1 - x0))  # type: ignore[attr-defined]
            # destination-local (x, y) -> source-local: shift, invert, shift
            local = (np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1.0]]) @ self.inverse
                     @ np.array([[1, 0, x], [0, 1, y], [0, 0, 1.0]]))
            flags = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "cubic": cv2.INTER_CUBIC}[self.interpolation]
            work = block.dtype if block.dtype in (np.uint8, np.uint16, np.float32, np.float64) else np.float32
            out = np.empty((c, h, w), dtype=work)
            for i, plane in enumerate(block):
                out[i] = cv2.warpAffine(np.ascontiguousarray(plane, dtype=work), local[:2], (w, h),
                                        flags=flags | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                                        borderValue=self.fill)
            out = out.astype(self.dtype, copy=False)
        return out if channels is None else out[list(channels)]
