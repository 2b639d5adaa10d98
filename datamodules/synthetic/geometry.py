"""Random fields and placement primitives the tissue model is built from (all in pixels).

Why separate: the layout, the cell painter and the renderers all need the same few primitives
(smooth random fields, discs and rings clipped to the image, non-overlapping placement, reading a
map at cell centres). Every function draws from the generator it is given, in a fixed order, which
is what keeps the generated datasets byte-identical run to run.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal
from scipy.spatial import cKDTree

#: A window into an image: (rows, columns) slices.
Window = tuple[slice, slice]


def gaussian_random_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean unit-sd Gaussian random field with Gaussian correlation of `sigma` px (periodic)."""
    noise = rng.standard_normal(shape)
    freq_y = np.fft.fftfreq(shape[0])[:, None]
    freq_x = np.fft.rfftfreq(shape[1])[None, :]
    spectrum = np.fft.rfft2(noise) * np.exp(-2.0 * (math.pi * sigma) ** 2 * (freq_y**2 + freq_x**2))
    field = np.fft.irfft2(spectrum, s=shape)
    field -= field.mean()
    sd = field.std()
    return (field / sd if sd > 0 else field).astype(np.float32)


def fibre_field(rng: np.random.Generator, shape: tuple[int, int], theta: np.ndarray) -> np.ndarray:
    """Collagen-like fibres in [0, 1] that follow the orientation field `theta` (radians).

    Four oriented line kernels (FFT convolution) blended by cos⁴ of the angle difference: a cheap,
    vectorised stand-in for line-integral convolution.
    """
    noise = rng.standard_normal(shape).astype(np.float32)
    half = 15
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    out = np.zeros(shape, np.float32)
    weight_sum = np.zeros(shape, np.float32)
    for alpha in np.arange(4) * (math.pi / 4):
        along = xx * math.cos(alpha) + yy * math.sin(alpha)
        across = -xx * math.sin(alpha) + yy * math.cos(alpha)
        kernel = np.exp(-(across**2) / (2 * 0.9**2) - along**2 / (2 * 7.0**2))
        filtered = signal.fftconvolve(noise, kernel / np.sqrt((kernel**2).sum()), mode="same").astype(np.float32)
        weight = np.cos(theta - alpha) ** 4
        out += weight * filtered
        weight_sum += weight
    out /= weight_sum
    out /= max(float(out.std()), 1e-6)
    return (1.0 / (1.0 + np.exp(-2.5 * (out - 0.3)))).astype(np.float32)


def jittered_hex_grid(rng: np.random.Generator, shape: tuple[int, int], spacing: float,
                      jitter: float = 0.3) -> np.ndarray:
    """Hexagonal grid points (y, x) with uniform jitter: dense packing without overlaps."""
    row_step = spacing * 0.866
    offset_y, offset_x = rng.uniform(0, row_step), rng.uniform(0, spacing)
    rows = np.arange(offset_y, shape[0], row_step)
    points = []
    for i, y in enumerate(rows):
        xs = np.arange(offset_x + (spacing / 2) * (i % 2), shape[1], spacing)
        points.append(np.stack([np.full_like(xs, y), xs], 1))
    grid = np.concatenate(points) if points else np.zeros((0, 2))
    grid = grid + rng.uniform(-jitter * spacing, jitter * spacing, grid.shape)
    inside = (grid[:, 0] >= 0) & (grid[:, 0] < shape[0] - 0.5) & (grid[:, 1] >= 0) & (grid[:, 1] < shape[1] - 0.5)
    return grid[inside]


def sample_at(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Values of `image` at (y, x) `points`, rounded to the nearest pixel and clipped to the image."""
    iy = np.clip(np.round(points[:, 0]).astype(int), 0, image.shape[0] - 1)
    ix = np.clip(np.round(points[:, 1]).astype(int), 0, image.shape[1] - 1)
    return image[iy, ix]


def disc_window(shape: tuple[int, int], cy: float, cx: float, r: float) -> tuple[Window, np.ndarray]:
    """(window, boolean disc inside it) for a disc that may cross the border."""
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, shape[0])
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, shape[1])
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return (slice(y0, y1), slice(x0, x1)), (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ring_window(shape: tuple[int, int], cy: float, cx: float, r_in: float, r_out: float) -> tuple[Window, np.ndarray]:
    """(window, boolean annulus r_in < r <= r_out inside it)."""
    window, outer = disc_window(shape, cy, cx, r_out)
    yy, xx = np.ogrid[window[0], window[1]]
    return window, outer & ((yy - cy) ** 2 + (xx - cx) ** 2 > r_in * r_in)


def dart_throw_discs(rng: np.random.Generator, allowed: np.ndarray, radii: np.ndarray, gap: float,
                     tries: int = 40) -> list[tuple[float, float, float, int]]:
    """Non-overlapping discs (cy, cx, r, index into `radii`) centred on `allowed` pixels.

    Radii are tried in the given order (pass them large first), `tries` random centres each.
    """
    candidates = np.flatnonzero(allowed.ravel())
    placed: list[tuple[float, float, float, int]] = []
    if candidates.size == 0:
        return placed
    for i, r in enumerate(radii):
        for _ in range(tries):
            flat = candidates[rng.integers(candidates.size)]
            cy, cx = divmod(int(flat), allowed.shape[1])
            cy, cx = cy + rng.uniform(-0.5, 0.5), cx + rng.uniform(-0.5, 0.5)
            if all((cy - oy) ** 2 + (cx - ox) ** 2 >= (r + other_r + gap) ** 2 for oy, ox, other_r, _ in placed):
                placed.append((cy, cx, float(r), i))
                break
    return placed


def non_overlapping_mask(points: np.ndarray, radius: np.ndarray, previous_points: np.ndarray,
                         previous_radius: np.ndarray, factor: float = 0.9) -> np.ndarray:
    """Keep-mask dropping candidates closer than factor·(r_i + r_j) to a previous or earlier candidate."""
    keep = np.ones(len(points), bool)
    if len(points) == 0:
        return keep
    if len(previous_points):
        distance, nearest = cKDTree(previous_points).query(points)
        keep &= distance >= factor * (radius + previous_radius[nearest])
    tree = cKDTree(points)
    pairs = tree.query_pairs(r=factor * 2 * float(radius.max()), output_type="ndarray")
    if len(pairs):
        distance = np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1)
        too_close = pairs[distance < factor * (radius[pairs[:, 0]] + radius[pairs[:, 1]])]
        keep[np.unique(too_close.max(axis=1))] = False
    return keep
