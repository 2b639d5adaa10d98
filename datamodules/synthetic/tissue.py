"""One synthetic tissue: draw its model once and render it into H&E, CODEX and IMC.

Why one function runs every step: the order of random draws *is* the dataset. Each tissue draws
from its own `SeedSequence([seed, index, 0x5EED])` in a fixed order (latent, layout, cells, H&E,
protein levels, CODEX, IMC, outcome), so a tissue is identical whichever process renders it and
whatever other tissues are generated beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from datamodules.preprocess import otsu_tissue_mask
from datamodules.synthetic.catalogue import CELL_TYPES, NICHES, TYPE_NAMES
from datamodules.synthetic.cell_shapes import paint_cells
from datamodules.synthetic.expression import cell_protein_levels, distance_to_tumour_um
from datamodules.synthetic.geometry import sample_at
from datamodules.synthetic.outcome import composition_summary, draw_clinical_outcome
from datamodules.synthetic.panels import CODEX_PROTEIN_KEYS, HE_MPP, IMC_PROTEIN, imc_channels_table
from datamodules.synthetic.render_he import render_he
from datamodules.synthetic.render_multiplex import render_clean_panel, render_codex, render_imc
from datamodules.synthetic.tissue_layout import draw_latent, lay_out_tissue

#: Salt of every tissue's seed sequence, so the stream is not shared with other uses of (seed, index).
TISSUE_SEED_SALT = 0x5EED


@dataclasses.dataclass
class Tissue:
    """Everything written to the dataset for one tissue."""

    tissue_id: str
    he: np.ndarray  # (3,Y,X) uint8, 0.5 µm/px
    codex: np.ndarray  # (50,Y,X) uint16, 0.5 µm/px
    imc: np.ndarray  # (43,Y/2,X/2) float32, 1 µm/px
    tissue_mask: np.ndarray  # 0.5 µm/px
    tissue_mask_1um: np.ndarray
    cell_mask: np.ndarray  # 0.5 µm/px
    cell_mask_1um: np.ndarray
    cells: pd.DataFrame
    info: dict[str, object]


def tissue_id_for(seed: int, index: int) -> str:
    """The id of tissue `index` of a dataset generated with `seed`."""
    return f"synth_s{seed}_{index:04d}"


def simulate_tissue(seed: int, index: int, size: int, imc_names: Sequence[str] | None = None) -> Tissue:
    """Draw and render tissue `index` of a dataset with `seed` (deterministic, independent of others)."""
    imc_names = list(imc_names if imc_names is not None else imc_channels_table()["channel_name"])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), TISSUE_SEED_SALT]))
    latent = draw_latent(rng)
    layout = lay_out_tissue(rng, size, latent)
    geometry, cells = paint_cells(rng, layout, latent)
    he = render_he(rng, layout, geometry, latent)

    codex_keys = list(CODEX_PROTEIN_KEYS)
    imc_keys = [IMC_PROTEIN[n] for n in imc_names]
    keys = list(dict.fromkeys(codex_keys + imc_keys))
    levels = cell_protein_levels(rng, layout, geometry, cells, latent, keys)
    column = {k: i for i, k in enumerate(keys)}
    clean_codex = render_clean_panel(levels[:, [column[k] for k in codex_keys]], codex_keys, geometry, layout)
    eosin_autofluorescence = np.clip(0.2 * layout.maps["collagen"] * (layout.tissue & ~layout.tumour)
                                     + 0.8 * layout.red_blood_cells, 0, 1)
    codex = render_codex(rng, clean_codex, layout, eosin_autofluorescence)
    del clean_codex
    clean_imc = render_clean_panel(levels[:, [column[k] for k in imc_keys]], imc_keys, geometry, layout)
    imc = render_imc(rng, clean_imc, imc_names, layout)
    del clean_imc

    tissue_mask = otsu_tissue_mask(he, "he")
    if tissue_mask.mean() < 0.2 or tissue_mask.mean() > 0.995:  # Otsu failed: fall back to the model's region
        tissue_mask = layout.tissue.copy()
    h, w = tissue_mask.shape
    tissue_mask_1um = tissue_mask.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) >= 0.5
    cell_mask_1um = geometry.cell[::2, ::2]

    tissue_id = tissue_id_for(seed, index)
    table = _cells_table(tissue_id, cells, geometry.cell, geometry.nucleus_area, distance_to_tumour_um(layout))
    composition = composition_summary(table)
    info: dict[str, object] = {
        "tissue_id": tissue_id,
        "immune_level": latent.immune,
        "infiltration": latent.infiltration,
        "immune_phenotype": latent.phenotype,
        "architecture": "glandular" if latent.glandular else "solid",
        "grade": latent.grade,
        "n_cells": len(cells["y"]),
        **composition,
        **draw_clinical_outcome(rng, composition, latent),
    }
    return Tissue(tissue_id, he, codex, imc, tissue_mask, tissue_mask_1um, geometry.cell, cell_mask_1um, table, info)


def _cells_table(tissue_id: str, cells: dict[str, np.ndarray], cell_labels: np.ndarray, nucleus_area_px: np.ndarray,
                 to_tumour_um: np.ndarray) -> pd.DataFrame:
    """The tissue's rows of `metadata/cells.parquet`: ids match the cell mask, lengths in µm."""
    n = len(cells["y"])
    area_px = np.bincount(cell_labels.ravel(), minlength=n + 1)[1:]
    points = np.stack([cells["y"], cells["x"]], 1)
    types = cells["type"].astype(int)
    return pd.DataFrame({
        "tissue_id": tissue_id,
        "cell_id": np.arange(1, n + 1).astype(np.int64),
        "cell_type": np.array(TYPE_NAMES)[types],
        "cell_category": [CELL_TYPES[t].category for t in types],
        "x": (cells["x"] * HE_MPP).astype(np.float64),  # µm (= px at 1 µm/px)
        "y": (cells["y"] * HE_MPP).astype(np.float64),
        "area": (area_px * HE_MPP**2).astype(np.float64),  # µm²
        "nucleus_area": (nucleus_area_px[1:] * HE_MPP**2).astype(np.float64),
        "niche": np.array(NICHES)[cells["niche"].astype(int)],
        "dist_to_tumor": sample_at(to_tumour_um, points).astype(np.float64),
    })
