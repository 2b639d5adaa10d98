"""Virtual biomarkers predictive of response from pre-treatment VirTues cell tokens (paper Fig. 5c–g).

    python -m experiments.virtues_tokens --ckpt C --data DIR --split all --out TOKENS
    python -m experiments.virtues_biomarkers --tokens TOKENS --data DIR --out OUT [--resolutions 4.0:5.0:0.05]
        [--max-cluster-cells 2000] [--n-response 2] [--n-nonresponse 2] [--max-overlap 0.5]
        [--timepoint pre] [--patient-column patient_id] [--response-column response] [--seed 0] [--overwrite]

Protocol and the choices the paper leaves open: :mod:`analysis.virtues_biomarkers`. Writes to ``OUT``
(atomically): ``candidates.csv`` (every cluster < max cells: resolution, size, univariate AUROC,
risk ratio with Katz CI, kind), ``signatures.csv`` (the selected RS/NRS), ``signature_cells.parquet``
(every cohort cell, index = token obs name, one bool column per signature — what
``experiments.virtues_signature_transfer`` trains on), ``patients.csv`` (response, ranks, ratios),
``auroc_folds.csv`` and ``auroc_comparison.csv`` (joint model vs ratio baselines, one-sided t-tests),
``composition.csv``, ``neighbourhoods.csv``, ``summary.json`` and figures ``fig5c_candidates.png`` …
``fig5g_neighbourhoods.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from analysis.outputs import atomic_output_dir, json_default
from analysis.virtues_biomarker_figures import (plot_auroc_comparison, plot_candidates, plot_composition,
                                                plot_embedding, plot_neighbourhoods)
from analysis.virtues_biomarker_stats import parse_resolutions
from analysis.virtues_biomarkers import RATIO_TYPES, TUMOUR_TYPES, BiomarkerDiscovery, DiscoveryConfig, discover_biomarkers
from datamodules.store import DatasetStore
from experiments.commands import load_cell_tokens, refuse_existing_output, run_command

log = logging.getLogger("experiments.virtues_biomarkers")

COMMAND = "virtues_biomarkers"
SIGNATURE_CELLS = "signature_cells.parquet"


def type_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_cell_type_arguments(p: argparse.ArgumentParser) -> None:
    """Cell-type column and the names of the ratio baselines' types (shared with the transfer command)."""
    p.add_argument("--cell-type-column", default="cell_type")
    p.add_argument("--tumour-types", type=type_list, default=TUMOUR_TYPES, help="comma list (case/punctuation ignored)")
    for name, types in RATIO_TYPES.items():
        p.add_argument(f"--{name.lower()}-types", type=type_list, default=types, help="comma list of cell-type names")


def ratio_types_from(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    return {name: getattr(args, f"{name.lower()}_types") for name in RATIO_TYPES}


def config_from(args: argparse.Namespace) -> DiscoveryConfig:
    return DiscoveryConfig(
        resolutions=tuple(parse_resolutions(args.resolutions)), max_cluster_cells=args.max_cluster_cells,
        n_response=args.n_response, n_nonresponse=args.n_nonresponse,
        univariate_cv=(args.folds, args.univariate_repeats), multivariate_cv=(args.folds, args.multivariate_repeats),
        max_overlap=args.max_overlap, n_pcs=args.n_pcs, n_neighbors=args.neighbors, connectivities=args.connectivities,
        seed=args.seed, patient_column=args.patient_column, timepoint_column=args.timepoint_column,
        timepoint=args.timepoint or None, response_column=args.response_column, cell_type_column=args.cell_type_column,
        tumour_types=args.tumour_types, ratio_types=ratio_types_from(args), embedding=args.embedding, progress=True)


def write_discovery(result: BiomarkerDiscovery, folder: Path) -> None:
    """Every table, the signature cells, summary.json and the Fig. 5c–g figures into ``folder``."""
    result.candidates.to_csv(folder / "candidates.csv", index=False)
    result.signatures.to_csv(folder / "signatures.csv", index=False)
    result.membership.rename_axis("obs_name").to_parquet(folder / SIGNATURE_CELLS)
    result.patients.to_csv(folder / "patients.csv")
    result.folds.to_csv(folder / "auroc_folds.csv", index=False)
    result.comparison.to_csv(folder / "auroc_comparison.csv", index=False)
    result.composition.to_csv(folder / "composition.csv", index=False)
    result.neighbourhoods.to_csv(folder / "neighbourhoods.csv", index=False)
    (folder / "summary.json").write_text(json.dumps(result.summary, indent=2, default=json_default))
    plot_candidates(result.candidates, result.signatures, folder / "fig5c_candidates.png")
    if result.embedding is not None:
        plot_embedding(result.embedding, result.cell_types, result.membership, folder / "fig5d_embedding.png")
    plot_auroc_comparison(result.folds, result.comparison, folder / "fig5e_auroc.png")
    plot_composition(result.composition, folder / "fig5f_composition.png")
    plot_neighbourhoods(result.neighbourhoods, folder / "fig5g_neighbourhoods.png")


def run(args: argparse.Namespace) -> BiomarkerDiscovery:
    refuse_existing_output(args.out, args.overwrite, COMMAND)
    config = config_from(args)
    tissues = DatasetStore(args.data).tissues()
    cells = load_cell_tokens(args.tokens, required_columns=[config.cell_type_column])
    result = discover_biomarkers(cells, tissues, config)
    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        write_discovery(result, tmp)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_biomarkers", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="output folder of experiments.virtues_tokens")
    p.add_argument("--data", required=True, help="the dataset (its tissue table: patient, timepoint, response)")
    p.add_argument("--out", required=True)
    p.add_argument("--resolutions", default="4.0:5.0:0.05", help="start:stop:step (inclusive) or a comma list; "
                   "paper: 4.0:5.0:0.05 for ~111 patients (larger cohorts need higher resolutions)")
    p.add_argument("--max-cluster-cells", type=int, default=2000, help="keep clusters with fewer cells (paper: 2000)")
    p.add_argument("--n-response", type=int, default=2)
    p.add_argument("--n-nonresponse", type=int, default=2)
    p.add_argument("--max-overlap", type=float, default=0.5,
                   help="skip a candidate whose Jaccard overlap with a selected signature exceeds this (1 = never)")
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--univariate-repeats", type=int, default=10)
    p.add_argument("--multivariate-repeats", type=int, default=25)
    p.add_argument("--n-pcs", type=int, default=50)
    p.add_argument("--neighbors", type=int, default=15)
    p.add_argument("--connectivities", choices=("umap", "gauss"), default="umap")
    p.add_argument("--embedding", choices=("umap", "pca", "none"), default="umap", help="2-D map of Fig. 5d")
    p.add_argument("--patient-column", default="patient_id")
    p.add_argument("--timepoint-column", default="timepoint")
    p.add_argument("--timepoint", default="pre", help="tissues taken at this timepoint ('' = all tissues)")
    p.add_argument("--response-column", default="response")
    add_cell_type_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.max_cluster_cells < 2 or min(args.n_response, args.n_nonresponse) < 0 or args.folds < 2 \
                or min(args.univariate_repeats, args.multivariate_repeats) < 1 or not 0 <= args.max_overlap <= 1:
            raise ValueError("--max-cluster-cells >= 2, --n-response/--n-nonresponse >= 0, --folds >= 2, "
                             "repeats >= 1 and 0 <= --max-overlap <= 1 are required")
        result = run(args)
        print(result.signatures[["signature", "candidate", "n_cells", "auroc", "risk_ratio"]].to_string(index=False))
        print(result.comparison[["predictor", "auroc_mean", "p_one_sided"]].to_string(index=False))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
