"""How far treatment shifts each patient's cell states, responders against non-responders (paper Fig. 5b).

    python -m experiments.virtues_tokens --ckpt C --data DIR --split all --out TOKENS
    python -m experiments.virtues_treatment_response --tokens TOKENS --data DIR --out OUT
        [--patient-column patient_id] [--time-column timepoint] [--response-column response]
        [--timepoints pre,on,post] [--epsilon 1e-3] [--max-cells 1000] [--sinkhorn-iterations 1000]
        [--embedding umap|pca] [--embedding-fraction 0.1] [--support 500] [--device cpu] [--seed 0] [--overwrite]

Method and numerical choices in :mod:`analysis.virtues_treatment_response`. Both representations
the paper shows are analysed: the VirTues cell tokens and the cells' mean marker abundances
(``obsm['mean_expression']``, Fig. 5b right). Writes to ``OUT`` (atomically):

* ``w2_per_patient.csv`` — representation, patient, response, t1, t2, cells, entropic W2, Sinkhorn error;
* ``cohort_w2.csv`` — per representation and transition: mean/median W2 per cohort, Mann–Whitney p;
* ``barycentre_medians.csv`` / ``displacement.csv`` — the cohort trajectories in the 2-D embedding;
* ``embedding.csv`` — the embedded 1/10 subsample (representation, cell, patient, time point, x, y);
* ``treatment_response.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from analysis.outputs import atomic_output_dir, json_default
from analysis.virtues_treatment_response import (
    EMBEDDING_FRACTION,
    EPSILON,
    MAX_CELLS,
    SINKHORN_ITERATIONS,
    SUPPORT_SIZE,
    TIMEPOINTS,
    CohortTrajectories,
    cohort_contrast,
    cohort_trajectories,
    compare_cohorts,
    embed_2d,
    embedding_subsample,
    patient_distances,
    plot_treatment_response,
    transitions,
)
from datamodules.store import DatasetStore
from experiments.commands import load_cell_tokens, refuse_existing_output, run_command

log = logging.getLogger("experiments.virtues_treatment_response")

COMMAND = "virtues_treatment_response"
REPRESENTATIONS = ("virtues_cell_tokens", "mean_expression")


@dataclass
class TreatmentResponseResult:
    distances: pd.DataFrame  # w2_per_patient.csv
    cohorts: pd.DataFrame  # cohort_w2.csv
    medians: pd.DataFrame  # barycentre_medians.csv
    displacements: pd.DataFrame  # displacement.csv
    trajectories: dict[str, CohortTrajectories] = field(default_factory=dict)
    out: Path | None = None


def cells_with_design(tokens_dir: str | Path, data: str | Path, patient_column: str = "patient_id",
                      time_column: str = "timepoint", response_column: str = "response",
                      order: Sequence[str] = TIMEPOINTS):  # type: ignore[no-untyped-def]
    """The token folder's cells joined with their tissue's patient, time point and response; cells of
    tissues lacking any of the three, or at a time point outside ``order``, are left out (logged)."""
    tissues = DatasetStore(data).tissues().set_index("tissue_id")
    missing = [c for c in (patient_column, time_column, response_column) if c not in tissues]
    if missing:
        raise ValueError(f"{data}: tissue table has no column(s) {missing} (columns: {list(tissues.columns)}); "
                         "pass --patient-column / --time-column / --response-column")
    cells = load_cell_tokens(tokens_dir)
    tid = cells.obs["tissue_id"].astype(str)
    design = pd.DataFrame({"patient": tid.map(tissues[patient_column]), "timepoint": tid.map(tissues[time_column]),
                           "response": tid.map(tissues[response_column])}, index=cells.obs_names)
    keep = design.notna().all(axis=1) & design["timepoint"].astype(str).isin(list(order))
    if (~keep).any():
        log.info("%d of %d cells have no patient / time point / response or a time point outside %s; left out",
                 int((~keep).sum()), len(keep), list(order))
    if not keep.any():
        raise ValueError(f"no cell has a patient, a time point in {list(order)} and a response")
    design = design[keep]
    values = set(pd.to_numeric(design["response"], errors="coerce").unique().tolist())
    if not values <= {0, 1}:
        raise ValueError(f"{response_column} must be 0/1 (non-responder / responder), got {sorted(map(str, values))}")
    design["response"] = design["response"].astype(int)
    design["patient"] = design["patient"].astype(str)
    design["timepoint"] = design["timepoint"].astype(str)
    return cells[keep.to_numpy()], design


def treatment_response(tokens_dir: str | Path, data: str | Path, out: str | Path | None = None,
                       patient_column: str = "patient_id", time_column: str = "timepoint",
                       response_column: str = "response", order: Sequence[str] = TIMEPOINTS, epsilon: float = EPSILON,
                       max_cells: int | None = MAX_CELLS, sinkhorn_iterations: int = SINKHORN_ITERATIONS,
                       embedding: str = "umap", embedding_fraction: float = EMBEDDING_FRACTION,
                       support: int = SUPPORT_SIZE, device: str = "cpu", seed: int = 0, overwrite: bool = False,
                       progress: bool = True) -> TreatmentResponseResult:
    """Per-patient entropic W2 between consecutive time points and cohort barycentre trajectories, for
    the cell tokens and the mean marker abundances; tables and figure written to ``out`` when given."""
    if out is not None:
        refuse_existing_output(out, overwrite, COMMAND)
    if len(order) < 2:
        raise ValueError(f"need at least two time points, got {list(order)}")
    cells, design = cells_with_design(tokens_dir, data, patient_column, time_column, response_column, order)
    features = {"virtues_cell_tokens": np.asarray(cells.X, np.float32)}
    if "mean_expression" in cells.obsm:
        features["mean_expression"] = np.asarray(cells.obsm["mean_expression"], np.float32)
    sub = embedding_subsample(len(design), embedding_fraction, seed)
    distances, cohorts, embedded, trajectories = {}, [], {}, {}
    n_pairs = sum(1 for _, g in design.groupby("patient") for t1, t2 in transitions(order)
                  if {t1, t2} <= set(g["timepoint"]))
    with Progress(disable=not progress) as bar:
        for rep, x in features.items():
            task = bar.add_task(f"W2 {rep}", total=n_pairs)
            distances[rep] = patient_distances(x, design["patient"], design["timepoint"], design["response"], order,
                                               max_cells, seed, epsilon, sinkhorn_iterations, device,
                                               progress=lambda k, task=task: bar.advance(task, k))
            cohorts.append(compare_cohorts(distances[rep]).assign(representation=rep))
            points = embed_2d(x[sub], embedding, seed)
            part = design.iloc[sub]
            embedded[rep] = pd.DataFrame({"cell": part.index, "patient_id": part["patient"].to_numpy(),
                                          "timepoint": part["timepoint"].to_numpy(),
                                          "response": part["response"].to_numpy(), "x": points[:, 0], "y": points[:, 1]})
            trajectories[rep] = cohort_trajectories(points, part["patient"], part["timepoint"], part["response"], order,
                                                    support, seed)
    dist = pd.concat([d.assign(representation=r) for r, d in distances.items()], ignore_index=True)
    coh = pd.concat(cohorts, ignore_index=True)
    med = pd.concat([t.medians.assign(representation=r) for r, t in trajectories.items()], ignore_index=True)
    disp = pd.concat([t.displacements.assign(representation=r) for r, t in trajectories.items()], ignore_index=True)
    result = TreatmentResponseResult(dist, coh, med, disp, trajectories, None if out is None else Path(out))
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite, command=COMMAND) as tmp:
            dist.to_csv(tmp / "w2_per_patient.csv", index=False)
            coh.to_csv(tmp / "cohort_w2.csv", index=False)
            med.to_csv(tmp / "barycentre_medians.csv", index=False)
            disp.to_csv(tmp / "displacement.csv", index=False)
            pd.concat([e.assign(representation=r) for r, e in embedded.items()]).to_csv(tmp / "embedding.csv", index=False)
            plot_treatment_response({r: (embedded[r], trajectories[r]) for r in features}, distances,
                                    str(tmp / "treatment_response.png"))
            contrast = {r: cohort_contrast(coh[coh["representation"] == r], disp[disp["representation"] == r])
                        for r in features}
            tok = contrast["virtues_cell_tokens"]
            detail = "; ".join(f"{k}: W2 responders {'>' if v['responders_shift_more'] else '<='} non-responders "
                               f"(p {v['mannwhitney_p']:.3g}), displacement angle {v.get('displacement_angle_deg', float('nan')):.0f}°, "
                               f"norm ratio {v.get('displacement_norm_ratio', float('nan')):.2f}" for k, v in tok.items())
            (tmp / "summary.json").write_text(json.dumps({
                "tokens": str(tokens_dir), "data": str(data), "timepoints": list(order), "epsilon": epsilon,
                "epsilon_relative_to": "the largest squared distance of each pair (cost / max(cost))",
                "solver": "ot.sinkhorn2(method='sinkhorn_log')", "max_cells_per_timepoint": max_cells,
                "sinkhorn_iterations": sinkhorn_iterations, "embedding": embedding,
                "embedding_fraction": embedding_fraction, "barycentre_support": support, "seed": seed,
                "n_cells": len(design), "n_patients": int(design["patient"].nunique()),
                "responders_shift_more": all(v["responders_shift_more"] for v in tok.values()),
                "direction_detail": detail, "contrast": contrast,
                "cohort_w2": coh.to_dict("records"), "displacements": disp.to_dict("records")},
                indent=1, default=json_default))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_treatment_response", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="output folder of experiments.virtues_tokens")
    p.add_argument("--data", required=True, help="the dataset (its tissue table holds patient, time point, response)")
    p.add_argument("--out", required=True)
    p.add_argument("--patient-column", default="patient_id")
    p.add_argument("--time-column", default="timepoint")
    p.add_argument("--response-column", default="response", help="0 = non-responder, 1 = responder")
    p.add_argument("--timepoints", default=",".join(TIMEPOINTS), help="time points in treatment order")
    p.add_argument("--epsilon", type=float, default=EPSILON, help="entropic regularisation, relative to the pair's max cost")
    p.add_argument("--max-cells", type=int, default=MAX_CELLS, help="cells per patient and time point for W2 (0 = all)")
    p.add_argument("--sinkhorn-iterations", type=int, default=SINKHORN_ITERATIONS)
    p.add_argument("--embedding", default="umap", choices=["umap", "pca"], help="2-D embedding for the barycentres")
    p.add_argument("--embedding-fraction", type=float, default=EMBEDDING_FRACTION, help="share of cells embedded (paper 1/10)")
    p.add_argument("--support", type=int, default=SUPPORT_SIZE, help="barycentre support points (paper 500)")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where POT runs Sinkhorn (torch backend)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.epsilon <= 0 or args.max_cells < 0 or args.sinkhorn_iterations < 1 or args.support < 1:
            raise ValueError("--epsilon, --sinkhorn-iterations and --support must be positive, --max-cells >= 0")
        order = [t.strip() for t in args.timepoints.split(",") if t.strip()]
        result = treatment_response(args.tokens, args.data, args.out, args.patient_column, args.time_column,
                                    args.response_column, order, args.epsilon, args.max_cells or None,
                                    args.sinkhorn_iterations, args.embedding, args.embedding_fraction, args.support,
                                    args.device, args.seed, args.overwrite, progress=not args.no_progress)
        print(result.cohorts.to_string(index=False))
        print(result.displacements.to_string(index=False))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
