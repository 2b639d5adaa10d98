"""The cohort design: patients, timepoints, response, survival, and which niches each tissue gets.

Why a design separate from the rendering: the planted truth (which niches go with response, how
treatment shifts cell states in each response group, which niches carry risk) is a handful of
numbers the downstream tests and analyses must be able to read. They live here, as constants, and
go into the `cohort.json` manifest verbatim (:func:`planted_truth`).

* **Discovery cohort**: each patient is a responder or not (half each, shuffled). Responders carry
  the response niches with probability 0.85 and the non-response niches with 0.15; non-responders
  the reverse. The same patient is sampled before (`pre`), during (`on`) and after (`post`)
  treatment; treatment shifts cell states differently per response group (:data:`STATE_SHIFTS`).
* **Validation cohort**: independent patients (own seed stream), one tissue each, every niche
  present with probability 0.5; the hazard rises with each non-response niche present and falls with
  each response niche present (log-hazard ±:data:`RISK_PER_NICHE`), survival drawn from the niches
  actually placed (:func:`draw_survival`).
* **Panel B cohort**: independent tissues imaged with the second panel, niches present at random.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from datamodules.synthetic.niches import NICHE_NAMES

COHORT_SEED_SALT = 0xC0407
RESPONSE_NICHES: tuple[str, ...] = ("cd8_tumour_contact", "tls")
NON_RESPONSE_NICHES: tuple[str, ...] = ("suppressive_macrophage", "caf_exclusion")
TIMEPOINTS: tuple[str, ...] = ("pre", "on", "post")
#: P(a niche of the group is present in a patient | response group).
P_PRESENT = {"responder": {"response": 0.85, "non_response": 0.15},
             "non_responder": {"response": 0.15, "non_response": 0.85}}
#: Log-hazard added per non-response niche present (subtracted per response niche) in validation.
RISK_PER_NICHE = 1.0
RISK_NOISE_SD = 0.35
WEIBULL_SHAPE, WEIBULL_SCALE_MONTHS = 1.5, 40.0
CENSOR_MONTHS = (24.0, 120.0)
#: Background (non-niche) state probabilities before treatment: type → {state: probability}.
BASE_STATES: dict[str, dict[str, float]] = {
    "cd8": {"activated": 0.15, "exhausted": 0.15}, "cd4": {"activated": 0.1}, "mac": {"suppressive": 0.2},
    "fib": {"caf": 0.15}, "tum": {"proliferating": 0.3}, "b": {}, "endo": {},
}
#: Treatment shift: per response group and timepoint, the background state probabilities that replace
#: the base ones, the tumour-fraction factor, the immune-level increment and extra niche instances.
STATE_SHIFTS: dict[str, dict[str, dict]] = {
    "responder": {
        "on": {"states": {"cd8": {"activated": 0.45, "exhausted": 0.08}, "cd4": {"activated": 0.3},
                          "tum": {"proliferating": 0.15}},
               "tumour_factor": 0.65, "immune_add": 0.2, "extra_niches": {"cd8_tumour_contact": 1}},
        "post": {"states": {"cd8": {"activated": 0.6, "exhausted": 0.05}, "cd4": {"activated": 0.4},
                            "tum": {"proliferating": 0.08}, "mac": {"suppressive": 0.1}},
                 "tumour_factor": 0.4, "immune_add": 0.3, "extra_niches": {"cd8_tumour_contact": 1}},
    },
    "non_responder": {
        "on": {"states": {"mac": {"suppressive": 0.5}, "cd8": {"activated": 0.08, "exhausted": 0.35},
                          "tum": {"proliferating": 0.4}},
               "tumour_factor": 1.0, "immune_add": 0.0, "extra_niches": {"suppressive_macrophage": 1}},
        "post": {"states": {"mac": {"suppressive": 0.65}, "cd8": {"activated": 0.05, "exhausted": 0.5},
                            "tum": {"proliferating": 0.5}, "fib": {"caf": 0.3}},
                 "tumour_factor": 1.1, "immune_add": 0.0, "extra_niches": {"suppressive_macrophage": 1}},
    },
}


@dataclasses.dataclass
class CohortTissueSpec:
    """What one cohort tissue must contain; rendering it is deterministic given `seed_key`."""

    tissue_id: str
    patient_id: str
    cohort: str  # "discovery", "validation" or "panel_b"
    seed_key: tuple[int, ...]
    niche_counts: dict[str, int]
    state_probabilities: dict[str, dict[str, float]]
    latent: dict[str, float | int | bool]  # TissueLatent fields that replace the drawn ones
    timepoint: str | None = None
    response: int | None = None
    survival: bool = False


def instances_per_niche(size: int) -> int:
    """Instances of a present niche in a tissue of `size` px (more room, more instances)."""
    return max(1, int(round(1.5 * (size / 512) ** 2)))


def _patient_latent(rng: np.random.Generator) -> dict[str, float | int | bool]:
    """Patient-level tissue latent: what stays the same across a patient's samples."""
    return {"immune": float(rng.uniform(0.15, 0.45)), "tumour_fraction": float(rng.uniform(0.3, 0.55)),
            "grade": int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])), "glandular": bool(rng.uniform() < 0.5)}


def _presence(rng: np.random.Generator, p_response: float, p_non_response: float) -> dict[str, bool]:
    """Which niches a patient carries."""
    return {name: bool(rng.uniform() < (p_response if name in RESPONSE_NICHES else p_non_response))
            for name in NICHE_NAMES}


def _states_with(shift: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]]:
    states = {k: dict(v) for k, v in BASE_STATES.items()}
    for short, per_state in (shift or {}).items():
        states[short] = dict(per_state)
    return states


def discovery_specs(n_patients: int, size: int, seed: int) -> list[CohortTissueSpec]:
    """Three tissues (pre, on, post) per discovery patient, responders and non-responders balanced."""
    design = np.random.default_rng([int(seed), COHORT_SEED_SALT, 0])
    responses = design.permutation(np.arange(n_patients) % 2 == 0).astype(int)
    per = instances_per_niche(size)
    specs = []
    for p in range(n_patients):
        group = "responder" if responses[p] else "non_responder"
        prng = np.random.default_rng([int(seed), COHORT_SEED_SALT, 1, p])
        latent = _patient_latent(prng)
        present = _presence(prng, P_PRESENT[group]["response"], P_PRESENT[group]["non_response"])
        for t, timepoint in enumerate(TIMEPOINTS):
            shift = STATE_SHIFTS[group].get(timepoint, {})
            counts = {n: per * int(present[n]) + int(shift.get("extra_niches", {}).get(n, 0)) for n in NICHE_NAMES}
            tissue_latent = dict(latent)
            tissue_latent["tumour_fraction"] = min(0.7, latent["tumour_fraction"] * shift.get("tumour_factor", 1.0))
            tissue_latent["immune"] = min(1.0, latent["immune"] + shift.get("immune_add", 0.0))
            specs.append(CohortTissueSpec(
                tissue_id=f"disc_s{seed}_p{p:03d}_{timepoint}", patient_id=f"disc_s{seed}_p{p:03d}",
                cohort="discovery", seed_key=(int(seed), COHORT_SEED_SALT, 2, p, t), niche_counts=counts,
                state_probabilities=_states_with(shift.get("states")), latent=tissue_latent,
                timepoint=timepoint, response=int(responses[p])))
    return specs


def independent_specs(cohort: str, n_tissues: int, size: int, seed: int) -> list[CohortTissueSpec]:
    """One tissue per patient, each niche present with probability 0.5 (validation: with survival)."""
    code = {"validation": 3, "panel_b": 4}[cohort]
    prefix = {"validation": "val", "panel_b": "pb"}[cohort]
    per = instances_per_niche(size)
    specs = []
    for i in range(n_tissues):
        prng = np.random.default_rng([int(seed), COHORT_SEED_SALT, code, i, 1])
        latent = _patient_latent(prng)
        present = _presence(prng, 0.5, 0.5)
        specs.append(CohortTissueSpec(
            tissue_id=f"{prefix}_s{seed}_{i:04d}", patient_id=f"{prefix}_s{seed}_p{i:04d}", cohort=cohort,
            seed_key=(int(seed), COHORT_SEED_SALT, code, i),
            niche_counts={n: per * int(present[n]) for n in NICHE_NAMES},
            state_probabilities=_states_with(None), latent=latent, survival=cohort == "validation"))
    return specs


def niche_risk(present: dict[str, bool]) -> float:
    """The planted log-hazard of a tissue from the niches it carries (before noise)."""
    return RISK_PER_NICHE * (sum(present[n] for n in NON_RESPONSE_NICHES) - sum(present[n] for n in RESPONSE_NICHES))


def draw_survival(rng: np.random.Generator, present: dict[str, bool]) -> dict[str, float | int]:
    """Weibull survival time (months) and event from the niches present, with noise and uniform censoring."""
    risk = niche_risk(present) + float(rng.normal(0, RISK_NOISE_SD))
    t_event = WEIBULL_SCALE_MONTHS * (-math.log(rng.uniform(1e-9, 1.0)) / math.exp(risk)) ** (1 / WEIBULL_SHAPE)
    t_censor = float(rng.uniform(*CENSOR_MONTHS))
    return {"survival_time": float(round(min(t_event, t_censor), 3)), "survival_event": int(t_event <= t_censor),
            "risk_score": float(risk)}


def planted_truth() -> dict[str, object]:
    """The design constants, as written to `cohort.json` (what the tests and analyses may check)."""
    return {
        "response_niches": list(RESPONSE_NICHES),
        "non_response_niches": list(NON_RESPONSE_NICHES),
        "p_niche_present": P_PRESENT,
        "timepoints": list(TIMEPOINTS),
        "base_states": BASE_STATES,
        "treatment_shift": STATE_SHIFTS,
        "treatment_shift_direction": {
            "responder": {"CD8_T activated fraction": "up", "CD4_T activated fraction": "up",
                          "tumour cell fraction": "down", "Tumor proliferating fraction": "down",
                          "cd8_tumour_contact niche cells": "up"},
            "non_responder": {"Macrophage suppressive fraction": "up", "CD8_T exhausted fraction": "up",
                              "Tumor proliferating fraction": "up", "suppressive_macrophage niche cells": "up"},
        },
        "validation_risk": {"log_hazard_per_non_response_niche": RISK_PER_NICHE,
                            "log_hazard_per_response_niche": -RISK_PER_NICHE, "noise_sd": RISK_NOISE_SD,
                            "weibull_shape": WEIBULL_SHAPE, "weibull_scale_months": WEIBULL_SCALE_MONTHS,
                            "censoring_uniform_months": list(CENSOR_MONTHS),
                            "risk_niches": list(NON_RESPONSE_NICHES), "protective_niches": list(RESPONSE_NICHES)},
    }
