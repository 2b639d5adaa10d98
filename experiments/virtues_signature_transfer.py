"""Transfer of discovered virtual biomarkers to an independent cohort, survival risk strata (paper Fig. 5h–k).

    python -m experiments.virtues_biomarkers --tokens TOKENS1 --data DIR1 --out BIOMARKERS
    python -m experiments.virtues_signature_transfer --biomarkers BIOMARKERS --discovery-tokens TOKENS1
        --tokens TOKENS2 --data DIR2 --out OUT [--time-column survival_time] [--event-column survival_event]
        [--response-protective] [--reference-column COL] [--phenotype-column COL] [--seed 0] [--overwrite]

Protocol and open choices (R = 2 and R = −1 go to the medium stratum; which end is "high risk"):
:mod:`analysis.virtues_signature_transfer`. Writes to ``OUT`` (atomically): ``classifiers.csv``
(held-out recall/precision/AUROC per signature forest), ``cell_memberships.parquet`` (predicted
membership of every independent cell), ``patients.csv`` (proportions, ranks, R, stratum, survival,
ratio baselines and their tertile groups), ``survival.csv`` (group sizes, events, log-rank high vs low,
C-index for R and every baseline), ``phenotypes.csv`` (with ``--phenotype-column``), ``summary.json``,
``fig5j_kaplan_meier.png`` and ``fig5k_c_index.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.outputs import atomic_output_dir, json_default
from analysis.virtues_biomarker_figures import plot_c_index, plot_kaplan_meier
from analysis.virtues_signature_transfer import TransferConfig, TransferResult, transfer_signatures
from datamodules.store import DatasetStore
from experiments.commands import load_cell_tokens, refuse_existing_output, run_command
from experiments.virtues_biomarkers import SIGNATURE_CELLS, add_cell_type_arguments, ratio_types_from

log = logging.getLogger("experiments.virtues_signature_transfer")

COMMAND = "virtues_signature_transfer"


def read_biomarkers(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(signatures.csv, signature cell memberships) of an ``experiments.virtues_biomarkers`` output."""
    folder = Path(folder)
    for name in ("signatures.csv", SIGNATURE_CELLS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: --biomarkers must be an output folder of "
                                    "experiments.virtues_biomarkers")
    return pd.read_csv(folder / "signatures.csv"), pd.read_parquet(folder / SIGNATURE_CELLS)


def write_transfer(result: TransferResult, folder: Path) -> None:
    result.classifiers.to_csv(folder / "classifiers.csv", index=False)
    result.membership.rename_axis("obs_name").to_parquet(folder / "cell_memberships.parquet")
    result.patients.to_csv(folder / "patients.csv")
    result.survival.to_csv(folder / "survival.csv", index=False)
    if len(result.phenotypes):
        result.phenotypes.to_csv(folder / "phenotypes.csv")
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2, default=json_default))
    plot_kaplan_meier(result.patients, result.survival, folder / "fig5j_kaplan_meier.png")
    plot_c_index(result.survival, folder / "fig5k_c_index.png")


def run(args: argparse.Namespace) -> TransferResult:
    refuse_existing_output(args.out, args.overwrite, COMMAND)
    signatures, membership = read_biomarkers(args.biomarkers)
    config = TransferConfig(
        n_trees=args.trees, max_depth=args.max_depth, holdout=args.holdout, seed=args.seed, n_jobs=args.n_jobs,
        high_above=args.high_above, low_below=args.low_below, high_r_is_high_risk=not args.response_protective,
        patient_column=args.patient_column, time_column=args.time_column, event_column=args.event_column,
        timepoint_column=args.timepoint_column, timepoint=args.timepoint or None,
        cell_type_column=args.cell_type_column, tumour_types=args.tumour_types, ratio_types=ratio_types_from(args),
        reference_column=args.reference_column, phenotype_column=args.phenotype_column)
    discovery = load_cell_tokens(args.discovery_tokens)
    cells = load_cell_tokens(args.tokens)
    tissues = DatasetStore(args.data).tissues()
    result = transfer_signatures(discovery, membership, signatures, cells, tissues, config)
    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        write_transfer(result, tmp)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_signature_transfer",
                                description=__doc__.split("\n")[0])
    p.add_argument("--biomarkers", required=True, help="output folder of experiments.virtues_biomarkers")
    p.add_argument("--discovery-tokens", required=True, help="the token folder the biomarkers were discovered on")
    p.add_argument("--tokens", required=True, help="token folder of the independent cohort (same checkpoint)")
    p.add_argument("--data", required=True, help="the independent dataset (its tissue table holds survival)")
    p.add_argument("--out", required=True)
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--max-depth", type=int, default=16)
    p.add_argument("--holdout", type=float, default=0.2, help="share of discovery cells held out to score each forest")
    p.add_argument("--high-above", type=float, default=2.0, help="R > this: the paper's high-risk stratum")
    p.add_argument("--low-below", type=float, default=-1.0, help="R < this: the paper's low-risk stratum")
    p.add_argument("--response-protective", action="store_true",
                   help="call R > high-above LOW risk (response signatures protective); default: the paper's naming")
    p.add_argument("--patient-column", default="patient_id")
    p.add_argument("--time-column", default="survival_time")
    p.add_argument("--event-column", default="survival_event")
    p.add_argument("--timepoint-column", default="timepoint")
    p.add_argument("--timepoint", default="", help="only tissues of this timepoint ('' = all)")
    p.add_argument("--reference-column", default=None, help="tissue-table column with a reference risk grouping")
    p.add_argument("--phenotype-column", default=None, help="tissue-table column with the immune phenotype (Fig. 5i)")
    add_cell_type_arguments(p)
    p.add_argument("--n-jobs", type=int, default=1, help="random-forest worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.trees < 1 or args.max_depth < 1 or not 0 < args.holdout < 1 or args.low_below > args.high_above:
            raise ValueError("--trees and --max-depth >= 1, 0 < --holdout < 1 and --low-below <= --high-above required")
        result = run(args)
        print(result.classifiers[["signature", "kind", "recall", "precision", "auroc"]].to_string(index=False))
        print(result.survival[["predictor", "n_low", "n_medium", "n_high", "logrank_p", "c_index"]].to_string(index=False))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
