"""Cell geometry: rasterise each placed cell into a nucleus, a cytoplasm and a membrane.

Why a geometry step between layout and rendering: H&E and every marker channel read the same
label images, so a marker's nuclear, membranous or cytoplasmic signal falls exactly on the nucleus
or cell body that H&E shows, and the cell masks written to the dataset are exact ground truth.
Nuclei are ellipses with boundary harmonics (pleomorphism grows with tumour grade) or lobes
(neutrophils); cytoplasm grows from each nucleus up to its type's extent.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from datamodules.synthetic.catalogue import CELL_TYPE_INDEX, CELL_TYPES
from datamodules.synthetic.geometry import gaussian_random_field
from datamodules.synthetic.tissue_layout import UM, TissueLatent, TissueLayout

TUMOR = CELL_TYPE_INDEX["Tumor"]


@dataclasses.dataclass
class CellGeometry:
    """Label images and per-cell properties of the painted cells (cell ids 1..n, 0 = background)."""

    nucleus: np.ndarray  # int32 label image of nuclei (= cell id)
    cell: np.ndarray  # int32 label image of whole cells
    membrane: np.ndarray  # bool
    chromatin: np.ndarray  # float32 chromatin density (H OD before staining strength), 0 outside nuclei
    nucleus_area: np.ndarray  # px, index = cell id
    cell_type: np.ndarray  # index = cell id (0: background = -1)


def paint_cells(rng: np.random.Generator, layout: TissueLayout,
                latent: TissueLatent) -> tuple[CellGeometry, dict[str, np.ndarray]]:
    """Rasterise nuclei (ellipses with harmonics, or lobes) and grow cytoplasm (nearest nucleus).

    Returns the geometry and the attributes of the cells that kept a visible nucleus (with their
    nucleus semi-axes in µm added).
    """
    shape = layout.tissue.shape
    placed = layout.cells
    n = len(placed["y"])
    types = placed["type"].astype(int)
    spec = [CELL_TYPES[t] for t in types]
    pleomorphism = np.where(types == TUMOR, 0.7 + 0.3 * (latent.grade - 1), 1.0)
    size_cv = np.array([s.size_cv for s in spec]) * pleomorphism
    scale = np.exp(rng.normal(0, 1, n) * size_cv) * np.where(types == TUMOR, 0.9 + 0.08 * latent.grade, 1.0)
    semi_major = np.array([s.nucleus[0] for s in spec]) * scale * UM
    semi_minor = np.array([s.nucleus[1] for s in spec]) * scale * np.exp(rng.normal(0, 0.06, n)) * UM
    semi_minor = np.minimum(semi_major, semi_minor)
    angle = np.where(np.isnan(placed["angle"]), rng.uniform(0, math.pi, n), placed["angle"])
    irregularity = np.array([s.irregularity for s in spec]) * pleomorphism
    harmonics = rng.uniform(0.3, 1.0, (n, 3)) * irregularity[:, None] * np.array([1.0, 0.6, 0.4])
    phase = rng.uniform(0, 2 * math.pi, (n, 3))
    lobes = np.array([s.lobes for s in spec])
    chromatin_of_cell = np.array([s.chromatin for s in spec]) * np.exp(rng.normal(0, 0.1, n))
    chromatin_of_cell = np.where(types == TUMOR, chromatin_of_cell * (0.9 + 0.1 * latent.grade), chromatin_of_cell)

    label = np.zeros(shape, np.int32)
    relative_radius = np.zeros(shape, np.float32)
    nucleoli = np.zeros(shape, np.float32)
    for i in range(n):
        cy, cx = placed["y"][i], placed["x"][i]
        reach = semi_major[i] * (1 + 2 * irregularity[i]) + 3
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, shape[0])
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        cos_a, sin_a = math.cos(angle[i]), math.sin(angle[i])
        along = dx * cos_a + dy * sin_a
        across = -dx * sin_a + dy * cos_a
        if lobes[i] > 1:
            lobe_r = semi_minor[i] * 0.5
            rel = np.full(along.shape, np.inf, np.float32)
            for j in range(lobes[i]):
                offset_along = (j - (lobes[i] - 1) / 2) * lobe_r * 1.55
                offset_across = 0.45 * lobe_r * (2 * abs(j - (lobes[i] - 1) / 2) - 1)
                rel = np.minimum(rel, np.sqrt((along - offset_along) ** 2 + (across - offset_across) ** 2) / lobe_r)
        else:
            nu, nv = along / semi_major[i], across / semi_minor[i]
            rr = np.sqrt(nu**2 + nv**2)
            th = np.arctan2(nv, nu)
            bound = 1 + harmonics[i, 0] * np.cos(2 * th + phase[i, 0]) + harmonics[i, 1] * np.cos(3 * th + phase[i, 1]) \
                + harmonics[i, 2] * np.cos(5 * th + phase[i, 2])
            rel = rr / bound
        window = label[y0:y1, x0:x1]
        free = (rel <= 1.0) & (window == 0)
        window[free] = i + 1
        relative_radius[y0:y1, x0:x1][free] = rel[free]
        if types[i] == TUMOR:
            for _ in range(1 + int(rng.uniform() < 0.3 * latent.grade)):
                offset_along = rng.uniform(-0.35, 0.35) * semi_major[i]
                offset_across = rng.uniform(-0.35, 0.35) * semi_minor[i]
                nucleolus_r = (0.6 + 0.15 * latent.grade) * UM
                dot = ((along - offset_along) ** 2 + (across - offset_across) ** 2 <= nucleolus_r * nucleolus_r) & free
                nucleoli[y0:y1, x0:x1][dot] = 0.55

    # drop cells whose nucleus was (almost) painted over, relabel 1..n
    counts = np.bincount(label.ravel(), minlength=n + 1)
    valid = counts[1:] >= max(4, int(1.0 * UM * UM))
    new_id = np.zeros(n + 1, np.int32)
    new_id[1:][valid] = np.arange(1, int(valid.sum()) + 1, dtype=np.int32)
    label = new_id[label]
    keep = np.flatnonzero(valid)
    nucleus_area = np.concatenate([[0], counts[1:][valid]]).astype(np.float64)

    # cytoplasm: pixels whose nearest nucleus pixel is within that cell's cytoplasm extent
    allowed = layout.tissue & ~layout.gland_lumen & ~layout.vessel_lumen
    distance, (iy, ix) = ndimage.distance_transform_edt(label == 0, return_indices=True)
    nearest = label[iy, ix]
    extent = np.concatenate([[0.0], np.array([spec[k].cytoplasm for k in keep]) * UM
                             * np.exp(rng.normal(0, 0.12, len(keep)))])
    cell = np.where((distance <= extent[nearest]) & allowed & (nearest > 0), nearest, 0).astype(np.int32)
    cell[label > 0] = label[label > 0]

    membrane = np.zeros(shape, bool)
    membrane[:-1] |= cell[:-1] != cell[1:]
    membrane[1:] |= cell[1:] != cell[:-1]
    membrane[:, :-1] |= cell[:, :-1] != cell[:, 1:]
    membrane[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    membrane &= cell > 0

    # chromatin: per-type density × texture (× vesicular rim for tumour) + nucleoli
    texture = gaussian_random_field(rng, shape, 0.9)
    type_of_label = np.concatenate([[-1], types[keep]])
    texture_amplitude = np.array([t.texture for t in CELL_TYPES] + [0.0])[type_of_label]
    density = np.concatenate([[0.0], chromatin_of_cell[keep]])
    is_tumour = type_of_label == TUMOR
    in_nucleus = label > 0
    chromatin = np.zeros(shape, np.float32)
    labels_in_nucleus = label[in_nucleus]
    rim = np.where(is_tumour[labels_in_nucleus], 0.7 + 0.55 * relative_radius[in_nucleus] ** 2, 1.0)
    chromatin[in_nucleus] = density[labels_in_nucleus] \
        * np.clip(1 + texture_amplitude[labels_in_nucleus] * 0.6 * texture[in_nucleus], 0.2, None) * rim
    chromatin[in_nucleus] += nucleoli[in_nucleus]
    kept_cells = {k: v[keep] for k, v in layout.cells.items()}
    kept_cells["nucleus_a"], kept_cells["nucleus_b"] = semi_major[keep] / UM, semi_minor[keep] / UM
    geometry = CellGeometry(nucleus=label, cell=cell, membrane=membrane, chromatin=chromatin,
                            nucleus_area=nucleus_area, cell_type=type_of_label)
    return geometry, kept_cells
