"""H&E rendering: hematoxylin and eosin optical densities → RGB by Beer–Lambert.

Why physical stain mixing rather than painting colours: real H&E varies by stain strength, section
thickness and scanner, and ROSIE's colour augmentation and normalisation assume that variation
happens in optical-density space. Using the Ruifrok–Johnston stain vectors, a per-tissue stain
strength, thinner edges, blur and noise gives the synthetic slides the same kind of variation.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from datamodules.synthetic.catalogue import CELL_TYPE_INDEX, CELL_TYPES
from datamodules.synthetic.cell_shapes import CellGeometry
from datamodules.synthetic.geometry import gaussian_random_field
from datamodules.synthetic.panels import PX_PER_UM
from datamodules.synthetic.tissue_layout import TissueLatent, TissueLayout

#: Ruifrok & Johnston (2001) optical-density vectors (R, G, B) of hematoxylin and eosin.
STAIN_H = np.array([0.650, 0.704, 0.286])
STAIN_E = np.array([0.072, 0.990, 0.105])


def render_he(rng: np.random.Generator, layout: TissueLayout, geometry: CellGeometry, latent: TissueLatent) -> np.ndarray:
    """(3,Y,X) uint8 RGB by Beer–Lambert: I = I0 · 10^(−(OD_H·h + OD_E·e))."""
    shape = layout.tissue.shape
    n_cells = len(geometry.cell_type)
    type_of_label = geometry.cell_type
    eosin = np.array([t.eosin for t in CELL_TYPES] + [0.0])[type_of_label] * np.exp(rng.normal(0, 0.12, n_cells))
    basophilia = np.array([t.basophilia for t in CELL_TYPES] + [0.0])[type_of_label]
    eosin[0] = basophilia[0] = 0.0
    nucleus = geometry.nucleus > 0
    body = (geometry.cell > 0) & ~nucleus
    hematoxylin_od = np.zeros(shape, np.float32)
    eosin_od = np.zeros(shape, np.float32)
    hematoxylin_od += geometry.chromatin
    hematoxylin_od[body] += basophilia[geometry.cell[body]]
    vacuoles = np.clip(gaussian_random_field(rng, shape, 1.6), 0, None)
    foamy = np.where(type_of_label == CELL_TYPE_INDEX["Macrophage"], 0.5, 0.0)
    eosin_od[body] += eosin[geometry.cell[body]] * (1 - foamy[geometry.cell[body]] * np.clip(vacuoles[body], 0, 1.5) / 1.5)
    eosin_od[nucleus] += 0.07
    extracellular = layout.tissue & (geometry.cell == 0)
    stroma = extracellular & ~layout.tumour & ~layout.aggregate & ~layout.gland_lumen & ~layout.vessel_lumen
    eosin_od[stroma] += 0.06 + 0.32 * layout.maps["collagen"][stroma]
    hematoxylin_od[stroma] += 0.02 + 0.03 * layout.maps["collagen"][stroma]
    tumour_matrix = extracellular & layout.tumour & ~layout.gland_lumen
    eosin_od[tumour_matrix] += 0.16
    hematoxylin_od[tumour_matrix] += 0.03
    aggregate_matrix = extracellular & layout.aggregate
    eosin_od[aggregate_matrix] += 0.1
    hematoxylin_od[aggregate_matrix] += 0.05
    lumen = layout.gland_lumen
    eosin_od[lumen] += 0.04 * np.clip(1 + gaussian_random_field(rng, shape, 4.0)[lumen], 0, None)
    eosin_od += 0.9 * layout.red_blood_cells
    eosin_od += 0.25 * layout.maps["basement"] * layout.tissue
    # section thickness: smooth variation and thinner edges
    thickness = 1.0 + 0.12 * gaussian_random_field(rng, shape, shape[0] / 6)
    depth_um = ndimage.distance_transform_edt(layout.tissue) / PX_PER_UM
    thickness *= 0.65 + 0.35 * np.clip(depth_um / 8.0, 0, 1)
    hematoxylin_od *= thickness * latent.stain_h
    eosin_od *= thickness * latent.stain_e
    h_vector = STAIN_H + rng.normal(0, 0.02, 3)
    e_vector = STAIN_E + rng.normal(0, 0.02, 3)
    h_vector, e_vector = np.abs(h_vector) / np.linalg.norm(h_vector), np.abs(e_vector) / np.linalg.norm(e_vector)
    illumination = rng.uniform(238, 250, 3) + np.array([0.0, -2.0, 3.0])
    od = hematoxylin_od[None] * h_vector[:, None, None] + eosin_od[None] * e_vector[:, None, None]
    rgb = illumination[:, None, None] * np.power(10.0, -od, dtype=np.float32)
    rgb = ndimage.gaussian_filter(rgb, (0, 0.6, 0.6))
    rgb += rng.normal(0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
