"""Cell-type linear probe on VirTues cell tokens, against the cells' mean expression (paper Fig. 3a–b).

    python -m experiments.virtues_tokens --ckpt C --data DIR --out TOKENS --split all
    python -m experiments.virtues_cell_probe --tokens TOKENS --data DIR --out PROBE [--label cell_type]
        [--train-split train] [--test-split test] [--overwrite]

Reads ``TOKENS/cells/*.h5ad`` (written by ``experiments.virtues_tokens``), splits cells by their
tissue's split in the dataset's tissue table (patient-level, as in training), fits the logistic
regression probe of :mod:`analysis.virtues_probes` on the training cells' tokens and, as the
reference, on their mean expression, and scores both on the test cells. Writes ``summary.csv``
(``features,accuracy,macro_f1,n_train,n_test``), ``per_class.csv``, ``confusion_<features>.csv`` and
``per_class_f1.png`` to ``PROBE`` (atomically).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.outputs import atomic_output_dir
from analysis.virtues_probes import linear_probe, plot_per_class_f1
from datamodules.store import DatasetStore
from experiments.commands import load_cell_tokens, run_command

log = logging.getLogger("experiments.virtues_cell_probe")


def run(tokens_dir: str | Path, data: str | Path, out: str | Path, label: str = "cell_type", train_split: str = "train",
        test_split: str = "test", overwrite: bool = False) -> pd.DataFrame:

    cells = load_cell_tokens(tokens_dir, [label])
    split_of = DatasetStore(data).tissues().set_index("tissue_id")["split"].astype(str)
    split = cells.obs["tissue_id"].astype(str).map(split_of)
    labelled = cells.obs[label].notna().to_numpy()
    train = ((split == train_split).to_numpy()) & labelled
    test = ((split == test_split).to_numpy()) & labelled
    if not train.any() or not test.any():
        raise ValueError(f"no labelled cells in split {train_split!r} ({int(train.sum())}) or {test_split!r} "
                         f"({int(test.sum())}): extract tokens for both (virtues_tokens --split all)")
    y = cells.obs[label].astype(str).to_numpy()
    results = [linear_probe("virtues_cell_tokens", cells.X[train], y[train], cells.X[test], y[test])]
    if "mean_expression" in cells.obsm:
        expr = cells.obsm["mean_expression"]
        results.append(linear_probe("mean_expression", expr[train], y[train], expr[test], y[test]))
    summary = pd.DataFrame([{"features": r.features, "accuracy": r.accuracy, "macro_f1": r.macro_f1,
                             "n_train": r.n_train, "n_test": r.n_test} for r in results])
    with atomic_output_dir(out, overwrite=overwrite, command="virtues_cell_probe") as tmp:
        summary.to_csv(tmp / "summary.csv", index=False)
        pd.concat([r.per_class for r in results]).to_csv(tmp / "per_class.csv", index=False)
        for r in results:
            r.confusion.to_csv(tmp / f"confusion_{r.features}.csv")
        plot_per_class_f1(results, str(tmp / "per_class_f1.png"))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_cell_probe", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="output folder of experiments.virtues_tokens")
    p.add_argument("--data", required=True, help="the dataset the tokens came from (its tissue table gives the splits)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label", default="cell_type", help="cells-table column to predict")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        summary = run(args.tokens, args.data, args.out, args.label, args.train_split, args.test_split, args.overwrite)
        print(summary.to_string(index=False))

    return run_command(body)

if __name__ == "__main__":
    sys.exit(main())
