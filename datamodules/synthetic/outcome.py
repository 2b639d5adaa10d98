"""Clinical outcome of a tissue: response and survival from the composition actually placed.

Why from the *measured* composition rather than from the latent: survival and response models in
the project (VirTues risk, ABMIL) see cells, not latents. Making the outcome follow the CD8
infiltration of tumour that can be counted in the cells table (more → better), tumour fraction and
grade (more → worse), with noise, gives them a signal that exists and is imperfect.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from datamodules.synthetic.tissue_layout import TissueLatent


def composition_summary(cells: pd.DataFrame) -> dict[str, float]:
    """Composition summaries the outcome depends on (computed from the cells actually placed)."""
    n = max(len(cells), 1)
    tumour = int((cells["cell_type"] == "Tumor").sum())
    cd8_in_tumour = int(((cells["cell_type"] == "CD8_T") & (cells["dist_to_tumor"] <= 15.0)).sum())
    return {"tumour_cell_fraction": tumour / n, "cd8_infiltration": cd8_in_tumour / max(tumour, 1) * 100.0}


def draw_clinical_outcome(rng: np.random.Generator, composition: dict[str, float],
                          latent: TissueLatent) -> dict[str, float | int]:
    """Outcome from composition: CD8 infiltration of tumour protects, tumour burden and grade harm."""
    infiltration = min(composition["cd8_infiltration"] / 10.0, 1.5)  # CD8 per 100 tumour cells, saturating
    risk = -2.2 * (infiltration - 0.5) + 1.5 * (composition["tumour_cell_fraction"] - 0.4) + 0.35 * (latent.grade - 2) \
        + rng.normal(0, 0.3)
    weibull_shape = 1.5
    t_event = 40.0 * (-math.log(rng.uniform(1e-9, 1.0)) / math.exp(risk)) ** (1 / weibull_shape)
    t_censor = rng.uniform(24.0, 120.0)
    p_response = 1.0 / (1.0 + math.exp(-(3.5 * (infiltration - 0.5) + 1.0 * (latent.immune - 0.5) + rng.normal(0, 0.5))))
    return {
        "response": int(rng.uniform() < p_response),
        "survival_time": float(round(min(t_event, t_censor), 3)),
        "survival_event": int(t_event <= t_censor),
        "risk_score": float(risk),
    }
