"""Risk ratios of each tissue structure's occurrence in the high- vs low-risk group (paper Fig. 4d, Suppl. Fig. 18).

    python -m experiments.virtues_risk --tokens TOKENS --data DIR --out RISK
    python -m experiments.virtues_tme_risk --data DIR --risk-groups RISK --out OUT [--structures has_]
    python -m experiments.virtues_tme_risk --data DIR --tokens TOKENS --out OUT [--clusters 120 --groups 4]
        [--time-column survival_time] [--event-column survival_event] [--horizon MONTHS] [--overwrite]

The cell-token stratification is the one of :mod:`analysis.virtues_risk`: read from an
``experiments.virtues_risk`` output (``--risk-groups``, its ``groups.csv``) or recomputed from the
tokens with the same functions (``--tokens``). The survival-only baseline and the risk-ratio method
are :mod:`analysis.virtues_tme_risk`. ``--structures`` is a column prefix (default ``has_``) or a
comma-separated list of boolean tissue-table columns.

Writes to ``OUT`` (atomically): ``risk_ratios.csv`` (stratification, structure, counts, risk ratio,
95 % CI, corrected), ``groups.csv`` (tissue, cell-token risk, survival-baseline risk),
``tme_risk_ratios.png`` (forest plot of both) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.outputs import atomic_output_dir, json_default
from analysis.virtues_risk import cluster_proportions, group_tissues, stratify
from analysis.virtues_tme_risk import plot_risk_ratios, structure_columns, structure_risk_ratios, survival_baseline_risk
from datamodules.store import DatasetStore
from datamodules.user_tables import read_user_table
from experiments.commands import load_cell_tokens, refuse_existing_output, run_command

log = logging.getLogger("experiments.virtues_tme_risk")

COMMAND = "virtues_tme_risk"
TOKEN_STRATIFICATION = "virtues_cell_tokens"
SURVIVAL_BASELINE = "survival_only"


@dataclass
class TMERiskResult:
    risk_ratios: pd.DataFrame
    groups: pd.DataFrame  # tissue_id -> risk of each stratification
    horizon: float
    logrank_p: float | None  # of the cell-token stratification, when recomputed here
    out: Path | None


def token_risk(tokens_dir: str | Path, tissues: pd.DataFrame, time_column: str, event_column: str,
               clusters: int = 120, groups: int = 4, seed: int = 0) -> tuple[pd.Series, float]:
    """The cell-token high/low risk of every tissue with an outcome (analysis.virtues_risk), and its log-rank p."""
    cells = load_cell_tokens(tokens_dir)
    with_outcome = tissues.index[tissues[time_column].notna() & tissues[event_column].notna()]
    tissue_of_cell = cells.obs["tissue_id"].astype(str).to_numpy()
    keep = pd.Series(tissue_of_cell).isin(with_outcome.astype(str)).to_numpy()
    proportions = cluster_proportions(cells.X[keep], tissue_of_cell[keep], clusters, seed)
    result = stratify(group_tissues(proportions, groups, seed), tissues[time_column], tissues[event_column])
    return result.risk, result.logrank_p


def read_risk_groups(folder: str | Path) -> pd.Series:
    """``risk`` of an ``experiments.virtues_risk`` output folder (its ``groups.csv``), by tissue."""
    path = Path(folder) / "groups.csv"
    if not path.is_file():
        raise FileNotFoundError(f"--risk-groups {folder}: no groups.csv (run experiments.virtues_risk first)")
    table = read_user_table(path, dtype={"tissue_id": str})
    if not {"tissue_id", "risk"} <= set(table.columns):
        raise ValueError(f"{path}: needs columns tissue_id and risk (has {list(table.columns)})")
    risk = table.set_index("tissue_id")["risk"].astype(str)
    bad = sorted(set(risk) - {"high", "low"})
    if bad:
        raise ValueError(f"{path}: risk must be 'high' or 'low', found {bad}")
    return risk


def tme_risk_ratios(data: str | Path, out: str | Path | None = None, risk_groups: str | Path | pd.Series | None = None,
                    tokens: str | Path | None = None, structures: str | Sequence[str] = "has_",
                    time_column: str = "survival_time", event_column: str = "survival_event",
                    horizon: float | None = None, clusters: int = 120, groups: int = 4, seed: int = 0,
                    overwrite: bool = False) -> TMERiskResult:
    """Risk ratio (Katz 95 % CI) of each structure's occurrence in the high-risk group, for the cell-token
    stratification (``risk_groups``: a virtues_risk folder or a Series; else recomputed from ``tokens``)
    and for the survival-only baseline; tables and figure written to ``out`` when given."""
    if out is not None:
        refuse_existing_output(out, overwrite, COMMAND)
    if (risk_groups is None) == (tokens is None):
        raise ValueError("give exactly one of --risk-groups (an experiments.virtues_risk output) or --tokens")
    tissues = DatasetStore(data).tissues()
    tissues = tissues.assign(tissue_id=tissues["tissue_id"].astype(str)).set_index("tissue_id")
    for column in (time_column, event_column):
        if column not in tissues:
            raise ValueError(f"{data}: tissue table has no column {column!r} (columns: {list(tissues.columns)})")
    columns = structure_columns(tissues, structures)
    logrank_p = None
    if tokens is not None:
        risk, logrank_p = token_risk(tokens, tissues, time_column, event_column, clusters, groups, seed)
    else:
        risk = risk_groups if isinstance(risk_groups, pd.Series) else read_risk_groups(risk_groups)
    unknown = sorted(set(risk.index) - set(tissues.index))
    if unknown:
        raise ValueError(f"risk groups name tissues not in {data}: {unknown[:5]}")
    baseline, horizon = survival_baseline_risk(tissues[time_column], tissues[event_column], horizon)
    table = pd.concat([structure_risk_ratios(risk, tissues, columns).assign(stratification=TOKEN_STRATIFICATION),
                       structure_risk_ratios(baseline, tissues, columns).assign(stratification=SURVIVAL_BASELINE)],
                      ignore_index=True)
    table = table[["stratification", *[c for c in table.columns if c != "stratification"]]]
    both = pd.concat([risk.rename(TOKEN_STRATIFICATION), baseline.rename(SURVIVAL_BASELINE)], axis=1)
    both.index.name = "tissue_id"
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite, command=COMMAND) as tmp:
            table.to_csv(tmp / "risk_ratios.csv", index=False)
            both.to_csv(tmp / "groups.csv")
            plot_risk_ratios(table, str(tmp / "tme_risk_ratios.png"))
            (tmp / "summary.json").write_text(json.dumps({
                "data": str(data), "risk_groups": None if risk_groups is None or isinstance(risk_groups, pd.Series)
                else str(risk_groups), "tokens": None if tokens is None else str(tokens), "structures": columns,
                "baseline_horizon": horizon, "baseline_rule": "high = event, or censored before the horizon",
                "n_high": int((risk == "high").sum()), "n_low": int((risk == "low").sum()),
                "logrank_p": logrank_p, "risk_ratios": table.to_dict("records")}, indent=1, default=json_default))
    return TMERiskResult(table, both.reset_index(), horizon, logrank_p, None if out is None else Path(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_tme_risk", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the dataset (tissue table: outcome and structure columns)")
    p.add_argument("--out", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--risk-groups", "--risk", dest="risk_groups", help="output folder of experiments.virtues_risk (its groups.csv)")
    src.add_argument("--tokens", help="output folder of experiments.virtues_tokens (stratify here)")
    p.add_argument("--structures", default="has_", help="column prefix, or comma-separated boolean columns")
    p.add_argument("--time-column", default="survival_time")
    p.add_argument("--event-column", default="survival_event")
    p.add_argument("--horizon", type=float, default=None, help="survival baseline: censored before it = high risk "
                                                               "(default: median follow-up)")
    p.add_argument("--clusters", type=int, default=120, help="with --tokens: k-means clusters (paper 120)")
    p.add_argument("--groups", type=int, default=4, help="with --tokens: k-means tissue groups (paper 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        structures = args.structures if "," not in args.structures else [s.strip() for s in args.structures.split(",")]
        result = tme_risk_ratios(args.data, args.out, args.risk_groups, args.tokens, structures, args.time_column,
                                 args.event_column, args.horizon, args.clusters, args.groups, args.seed, args.overwrite)
        print(result.risk_ratios.to_string(index=False))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
