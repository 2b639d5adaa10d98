"""Risk groups from VirTues cell-token cluster composition, with Kaplan–Meier curves (paper Fig. 4a–d).

    python -m experiments.virtues_tokens --ckpt C --data DIR --split all --out TOKENS
    python -m experiments.virtues_risk --tokens TOKENS --data DIR --out OUT [--clusters 120] [--groups 4]
        [--time-column survival_time] [--event-column survival_event] [--overwrite]

Protocol and caveats in :mod:`analysis.virtues_risk`. Writes ``groups.csv`` (tissue, k-means group,
risk), ``group_hazard.csv``, ``proportions.csv`` (tissues × clusters), ``summary.csv`` (log-rank
statistic and p, group sizes) and ``kaplan_meier.png`` to ``OUT`` (atomically).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pandas as pd

from analysis.outputs import atomic_output_dir
from analysis.virtues_risk import cluster_proportions, group_tissues, plot_kaplan_meier, stratify
from datamodules.store import DatasetStore
from experiments.commands import load_cell_tokens, refuse_existing_output, run_command

log = logging.getLogger("experiments.virtues_risk")

COMMAND = "virtues_risk"


def run(args: argparse.Namespace) -> pd.DataFrame:

    refuse_existing_output(args.out, args.overwrite, COMMAND)
    tissues = DatasetStore(args.data).tissues().set_index("tissue_id")
    for column in (args.time_column, args.event_column):
        if column not in tissues:
            raise ValueError(f"{args.data}: tissue table has no column {column!r} (columns: {list(tissues.columns)})")
    cells = load_cell_tokens(args.tokens)
    with_outcome = tissues.index[tissues[args.time_column].notna() & tissues[args.event_column].notna()]
    keep = cells.obs["tissue_id"].astype(str).isin(with_outcome).to_numpy()
    proportions = cluster_proportions(cells.X[keep], cells.obs["tissue_id"].astype(str).to_numpy()[keep],
                                      args.clusters, args.seed)
    groups = group_tissues(proportions, args.groups, args.seed)
    time, event = tissues[args.time_column], tissues[args.event_column]
    result = stratify(groups, time, event)
    summary = pd.DataFrame([{"n_tissues": len(groups), "n_cells": int(keep.sum()), "clusters": args.clusters,
                             "groups": args.groups, "n_high": int((result.risk == "high").sum()),
                             "n_low": int((result.risk == "low").sum()), "logrank_statistic": result.logrank_statistic,
                             "logrank_p": result.logrank_p}])
    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        pd.concat([groups, result.risk], axis=1).rename_axis("tissue_id").to_csv(tmp / "groups.csv")
        result.group_hazard.rename_axis("group").to_csv(tmp / "group_hazard.csv")
        proportions.to_csv(tmp / "proportions.csv")
        summary.to_csv(tmp / "summary.csv", index=False)
        plot_kaplan_meier(result, time, event, str(tmp / "kaplan_meier.png"))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_risk", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="output folder of experiments.virtues_tokens")
    p.add_argument("--data", required=True, help="the dataset (its tissue table holds the outcome)")
    p.add_argument("--out", required=True)
    p.add_argument("--clusters", type=int, default=120, help="k-means clusters of cell tokens (paper: 120)")
    p.add_argument("--groups", type=int, default=4, help="k-means groups of tissues (paper: 4)")
    p.add_argument("--time-column", default="survival_time")
    p.add_argument("--event-column", default="survival_event")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.clusters < 2 or args.groups < 2:
            raise ValueError("--clusters and --groups must be >= 2")
        print(run(args).to_string(index=False))

    return run_command(body)

if __name__ == "__main__":
    sys.exit(main())
