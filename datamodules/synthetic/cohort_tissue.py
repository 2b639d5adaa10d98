"""Render one cohort tissue: the default tissue model, planted niches and cell states, IMC only.

Why IMC only: the cohort preset feeds VirTues (an IMC model), and skipping H&E and CODEX keeps a
120-tissue cohort within CPU-demo time. The order of draws (latent, layout, aggregate removal,
niches and states, cells, protein levels, states' marker changes, IMC, survival) is fixed, and each
tissue has its own seed sequence, so a tissue does not depend on the worker that renders it. The
tissue mask is the model's own tissue region (there is no H&E to threshold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from datamodules.synthetic.catalogue import CELL_TYPE_INDEX, NICHES, TYPE_NAMES
from datamodules.synthetic.cell_shapes import paint_cells
from datamodules.synthetic.cohort import CohortTissueSpec, draw_survival
from datamodules.synthetic.expression import cell_protein_levels, distance_to_tumour_um
from datamodules.synthetic.geometry import sample_at
from datamodules.synthetic.niches import (CELL_STATES, COARSE_TYPE, NICHE_NAMES, apply_cell_states, plant_niches,
                                          strip_aggregates)
from datamodules.synthetic.panels import HE_MPP
from datamodules.synthetic.render_multiplex import render_clean_panel, render_imc
from datamodules.synthetic.tissue_layout import draw_latent, lay_out_tissue

#: A planted niche counts as present in a tissue once it holds at least this many cells.
MIN_NICHE_CELLS = 5


@dataclasses.dataclass
class CohortTissue:
    """What is written for one cohort tissue."""

    tissue_id: str
    imc: np.ndarray  # (C, Y/2, X/2) float32 counts, 1 µm/px
    tissue_mask_1um: np.ndarray
    cell_mask_1um: np.ndarray
    cells: pd.DataFrame
    info: dict[str, object]


def simulate_cohort_tissue(spec: CohortTissueSpec, size: int, channel_names: Sequence[str],
                           protein_of: Mapping[str, str]) -> CohortTissue:
    """Draw and render one cohort tissue imaged with the panel `channel_names` (channel → protein key)."""
    rng = np.random.default_rng(np.random.SeedSequence(list(spec.seed_key)))
    latent = dataclasses.replace(draw_latent(rng), **spec.latent)
    layout = lay_out_tissue(rng, size, latent)
    strip_aggregates(rng, layout)
    plant_niches(rng, layout, spec.niche_counts, spec.state_probabilities)
    geometry, cells = paint_cells(rng, layout, latent)
    channel_keys = [protein_of[c] for c in channel_names]
    keys = list(dict.fromkeys(channel_keys))
    levels = cell_protein_levels(rng, layout, geometry, cells, latent, keys)
    apply_cell_states(rng, levels, keys, cells["state"])
    column = {k: i for i, k in enumerate(keys)}
    clean = render_clean_panel(levels[:, [column[k] for k in channel_keys]], channel_keys, geometry, layout)
    imc = render_imc(rng, clean, list(channel_names), layout)
    del clean
    h, w = layout.tissue.shape
    tissue_mask_1um = layout.tissue.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) >= 0.5
    cell_mask_1um = geometry.cell[::2, ::2]

    table = cohort_cells_table(spec.tissue_id, cells, geometry.cell, geometry.nucleus_area,
                               distance_to_tumour_um(layout))
    counts = table["niche"].value_counts()
    present = {n: int(counts.get(n, 0)) >= MIN_NICHE_CELLS for n in NICHE_NAMES}
    n = max(len(table), 1)
    info: dict[str, object] = {
        "tissue_id": spec.tissue_id, "patient_id": spec.patient_id, "cohort": spec.cohort,
        "n_cells": len(table),
        "tumour_cell_fraction": float((cells["type"] == CELL_TYPE_INDEX["Tumor"]).sum() / n),
        "immune_level": latent.immune, "architecture": "glandular" if latent.glandular else "solid",
        "grade": latent.grade,
        **{f"has_{name}": present[name] for name in NICHE_NAMES},
        **{f"n_cells_{name}": int(counts.get(name, 0)) for name in NICHE_NAMES},
    }
    if spec.timepoint is not None:
        info["timepoint"] = spec.timepoint
    if spec.response is not None:
        info["response"] = int(spec.response)
    if spec.survival:
        info.update(draw_survival(rng, present))
    return CohortTissue(spec.tissue_id, imc, tissue_mask_1um, cell_mask_1um, table, info)


def cohort_cells_table(tissue_id: str, cells: dict[str, np.ndarray], cell_labels: np.ndarray,
                       nucleus_area_px: np.ndarray, to_tumour_um: np.ndarray) -> pd.DataFrame:
    """Rows of `metadata/cells.parquet`: ids match the cell mask, lengths in µm, planted truth per cell.

    `niche` is the planted niche the cell belongs to ("none" outside niches); `compartment` is the
    default model's niche (stroma, tumor, gland, vessel, lymphoid_aggregate); `cell_state` is the
    planted state. They are ground truth for tests, not inputs to the analyses.
    """
    n = len(cells["y"])
    area_px = np.bincount(cell_labels.ravel(), minlength=n + 1)[1:]
    types = cells["type"].astype(int)
    planted = cells["planted"].astype(int)
    niche_names = np.array(list(NICHE_NAMES) + ["none"])
    type_names = np.array(TYPE_NAMES)[types]
    return pd.DataFrame({
        "tissue_id": tissue_id,
        "cell_id": np.arange(1, n + 1).astype(np.int64),
        "cell_type": type_names,
        "coarse_type": [COARSE_TYPE[t] for t in type_names],
        "cell_state": np.array(CELL_STATES)[cells["state"].astype(int)],
        "niche": niche_names[np.where(planted >= 0, planted, len(NICHE_NAMES))],
        "compartment": np.array(NICHES)[cells["niche"].astype(int)],
        "x": (cells["x"] * HE_MPP).astype(np.float64),
        "y": (cells["y"] * HE_MPP).astype(np.float64),
        "area": (area_px * HE_MPP**2).astype(np.float64),
        "nucleus_area": (nucleus_area_px[1:] * HE_MPP**2).astype(np.float64),
        "dist_to_tumor": sample_at(to_tumour_um, np.stack([cells["y"], cells["x"]], 1)).astype(np.float64),
    })
