"""Per-cell protein levels: cell-type profile, random positive subsets, tissue context, cell noise.

Why levels per cell rather than per channel: proteins measured in both panels (CODEX and IMC)
share one level per cell, so the two modalities agree. Context makes some markers depend on where
a cell is, not only what it is (hypoxia far from vessels, cancer-associated fibroblasts near
tumour, basal gland layer, interferon response in immune-hot tissue). No-signal proteins
(:data:`~datamodules.synthetic.catalogue.NO_SIGNAL_PROTEINS`) are drawn per cell independently of
type, context and morphology: as in real tissue, some markers cannot be predicted from H&E, and a
model that "predicts" them reveals leakage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from datamodules.synthetic.catalogue import CELL_TYPE_INDEX, PROTEINS, TYPE_BY_SHORT_NAME
from datamodules.synthetic.cell_shapes import CellGeometry
from datamodules.synthetic.geometry import sample_at
from datamodules.synthetic.tissue_layout import UM, TissueLatent, TissueLayout


def distance_to_tumour_um(layout: TissueLayout) -> np.ndarray:
    """Distance (µm) of every pixel to the tumour niche; 1000 µm everywhere when there is no tumour."""
    if layout.tumour.any():
        return ndimage.distance_transform_edt(~layout.tumour) / UM
    return np.full(layout.tumour.shape, 1e3)


def cell_protein_levels(rng: np.random.Generator, layout: TissueLayout, geometry: CellGeometry,
                        cells: dict[str, np.ndarray], latent: TissueLatent, keys: Sequence[str]) -> np.ndarray:
    """(n_cells + 1, K) protein levels (row 0 = background, zero).

    Type profile × random subset × context × log-normal cell noise × tissue batch factor.
    No-signal proteins are drawn from their own distribution with no reference to any cell property.
    """
    n = len(cells["y"])
    types = cells["type"].astype(int)
    points = np.stack([cells["y"], cells["x"]], 1)
    to_tumour = sample_at(distance_to_tumour_um(layout), points)
    if layout.vessels:
        to_vessel, _ = cKDTree(np.array([(v[0], v[1]) for v in layout.vessels])).query(points)
        to_vessel = to_vessel / UM
    else:
        to_vessel = np.full(n, 1e3)
    of_type = {short: types == CELL_TYPE_INDEX[name] for short, name in TYPE_BY_SHORT_NAME.items()}
    hot = latent.immune * (0.4 + 0.6 * latent.infiltration)
    out = np.zeros((n + 1, len(keys)), np.float32)
    for j, key in enumerate(keys):
        protein = PROTEINS[key]
        if protein.no_signal_distribution is not None:
            fraction, sd = protein.no_signal_distribution
            positive = rng.uniform(size=n) < fraction
            out[1:, j] = np.where(positive, np.exp(rng.normal(0, sd, n)), 0.03)
            continue
        level = np.zeros(n)
        for short, mean_level in protein.levels.items():
            level[of_type[short]] = mean_level
        for short, fraction in protein.positive_fraction.items():
            selected = of_type[short]
            level[selected] *= np.where(rng.uniform(size=int(selected.sum())) < fraction, 1.0, 0.1)
        _add_context(key, level, of_type, cells, points, to_tumour, to_vessel, hot, latent, layout)
        noise = np.exp(rng.normal(0, 0.3, n))
        out[1:, j] = level * noise
    batch = np.exp(rng.normal(0, 0.1, len(keys))).astype(np.float32)
    return out * batch[None, :]


def _add_context(key: str, level: np.ndarray, of_type: dict[str, np.ndarray], cells: dict[str, np.ndarray],
                 points: np.ndarray, to_tumour: np.ndarray, to_vessel: np.ndarray, hot: float,
                 latent: TissueLatent, layout: TissueLayout) -> None:
    """Raise (in place) the levels of protein `key` where the cell's surroundings call for it. Draws nothing."""
    tumour = of_type["tum"]
    if key == "HLA-DR":
        level[tumour] += 0.5 * hot
    elif key == "CD274":
        level[tumour] += 0.7 * hot * (to_tumour[tumour] < 1.0)
        level[of_type["mac"]] += 0.6 * hot
    elif key == "HLA-A":
        level[tumour] += 0.5 * hot
    elif key == "GZMB":
        level[of_type["cd8"]] *= 0.5 + 2.0 * hot
    elif key == "IFNG":
        level[of_type["cd8"]] += 0.5 * hot
        level[of_type["cd4"]] += 0.25 * hot
    elif key == "PDCD1":
        level[of_type["cd8"]] *= 0.5 + 2.0 * hot
    elif key == "VCAM1":
        level[of_type["endo"]] += 0.6 * latent.immune
    elif key == "CA9":
        hypoxia = np.clip((to_vessel - 45.0) / 70.0, 0, 1)
        level[tumour] += 1.0 * hypoxia[tumour]
    elif key in ("FAP", "MMP11"):
        near_tumour = np.exp(-to_tumour / 30.0)
        level[of_type["fib"]] += (0.9 if key == "FAP" else 0.6) * near_tumour[of_type["fib"]]
    elif key == "TP63":
        level[tumour & (cells["layer"] == 1)] += 0.9
    elif key == "KRT8_18":
        level[tumour & (cells["layer"] != 1)] += 0.5
    elif key == "PNAD":
        near_aggregate = ndimage.binary_dilation(layout.aggregate, iterations=int(15 * UM))
        level[of_type["endo"] & sample_at(near_aggregate, points)] += 0.7
