"""Cell types transferred from one dataset to another measured with a different panel (paper Fig. 3e–g).

    python -m experiments.virtues_tokens --ckpt C --data SOURCE --out S_TOK --split all --channels-from TARGET
    python -m experiments.virtues_tokens --ckpt C --data TARGET --out T_TOK --split all --channels-from SOURCE
    python -m experiments.virtues_cross_panel --source-tokens S_TOK --target-tokens T_TOK --out OUT
        [--label cell_type] [--target-label COL] [--label-map MAP.csv] [--source-data SOURCE --source-split train]
        [--seed 0] [--overwrite]

Method in :mod:`analysis.virtues_cross_panel` (random forest, 100 trees, Gini, bootstrap, depth 16,
balanced by down-sampling). ``--label-map`` regroups the target's labels into the source's classes
(CSV with columns ``target,source``; the paper's Suppl. Table 6); target cells whose label maps to
no source class are left out and counted. The baseline is the same forest on the cells' mean
abundances of the shared markers (``obsm['mean_expression']``, columns matched by channel name).

Writes to ``OUT`` (atomically): ``per_class_f1.csv`` (representation, class, f1, chance, n_target),
``summary.csv`` (representation, macro_f1, n_train, n_test, classes_above_chance),
``confusion_<representation>.csv``, ``transfer_f1.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from analysis.outputs import atomic_output_dir, json_default
from analysis.virtues_cross_panel import TransferResult, plot_transfer_f1, shared_columns, transfer_random_forest
from datamodules.store import DatasetStore
from datamodules.user_tables import read_user_table
from experiments.commands import load_cell_tokens, refuse_existing_output, run_command

log = logging.getLogger("experiments.virtues_cross_panel")

COMMAND = "virtues_cross_panel"


@dataclass
class CrossPanelResult:
    results: dict[str, TransferResult]  # representation -> transfer result
    per_class: pd.DataFrame
    summary: pd.DataFrame
    n_target_unmapped: int
    out: Path | None


def read_label_map(path: str | Path) -> dict[str, str]:
    """``target,source`` rows -> {target label: source class}."""
    table = read_user_table(path)
    missing = {"target", "source"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: label map needs columns target,source (missing {sorted(missing)})")
    return {str(t): str(s) for t, s in zip(table["target"], table["source"]) if pd.notna(t) and pd.notna(s)}


def marker_names(tokens_dir: str | Path) -> list[str]:
    """The channels the tokens (and ``mean_expression``) of a virtues_tokens folder were computed from
    (one list for the whole run; read from its first cell file, since concatenation drops ``uns``)."""
    first = sorted((Path(tokens_dir) / "cells").glob("*.h5ad"))[:1]
    if not first:
        return []
    cells = ad.read_h5ad(first[0], backed="r")
    names = [str(n) for n in cells.uns.get("mean_expression_channels", [])]
    cells.file.close()
    return names


def _features(cells, representation: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    if representation == "virtues_cell_tokens":
        return np.asarray(cells.X, np.float32)
    return np.asarray(cells.obsm["mean_expression"], np.float32)


def cross_panel_transfer(source_tokens: str | Path, target_tokens: str | Path, out: str | Path | None = None,
                         label: str = "cell_type", target_label: str | None = None,
                         label_map: dict[str, str] | str | Path | None = None, source_data: str | Path | None = None,
                         source_split: str = "train", seed: int = 0, overwrite: bool = False) -> CrossPanelResult:
    """Train on ``source_tokens``' cells, score on ``target_tokens``' cells, for the cell tokens and the
    mean-abundance baseline; write the tables and the figure to ``out`` when given."""
    if out is not None:
        refuse_existing_output(out, overwrite, COMMAND)
    target_label = target_label or label
    src = load_cell_tokens(source_tokens, [label])
    tgt = load_cell_tokens(target_tokens, [target_label])
    keep_src = src.obs[label].notna().to_numpy()
    if source_data is not None and source_split != "all":
        split_of = DatasetStore(source_data).tissues().set_index("tissue_id")["split"].astype(str)
        keep_src &= (src.obs["tissue_id"].astype(str).map(split_of) == source_split).to_numpy()
    if not keep_src.any():
        raise ValueError(f"{source_tokens}: no labelled source cell{'' if source_data is None else f' in split {source_split!r}'}")
    mapping = read_label_map(label_map) if isinstance(label_map, (str, Path)) else label_map
    y_tgt = tgt.obs[target_label].astype(str).where(tgt.obs[target_label].notna(), None)
    if mapping is not None:
        y_tgt = y_tgt.map(lambda v: mapping.get(v) if v is not None else None)
    y_src = src.obs[label].astype(str).to_numpy()[keep_src]
    known = y_tgt.isin(set(y_src.tolist())).to_numpy()
    if not known.any():
        raise ValueError(f"no target cell's label ({target_label}) is one of the source classes {sorted(set(y_src))}; "
                         "pass --label-map")
    unmapped = int((~known).sum())
    if unmapped:
        log.info("%d target cells have a label outside the source classes; left out", unmapped)
    if src.X.shape[1] != tgt.X.shape[1]:
        raise ValueError(f"source tokens have {src.X.shape[1]} dims, target {tgt.X.shape[1]}: not the same model")
    s_ch, t_ch = marker_names(source_tokens), marker_names(target_tokens)
    if len(s_ch) != len(t_ch):
        log.warning("source tokens come from %d markers, target from %d: compute both with --channels-from", len(s_ch), len(t_ch))

    results: dict[str, TransferResult] = {}
    for rep in ("virtues_cell_tokens", "mean_expression"):
        if rep == "mean_expression" and ("mean_expression" not in src.obsm or "mean_expression" not in tgt.obsm):
            continue
        xs, xt = _features(src, rep), _features(tgt, rep)
        if rep == "mean_expression":
            i_s, i_t, names = shared_columns(s_ch, t_ch)
            if not names:
                log.warning("the two panels share no channel name: no mean-abundance baseline")
                continue
            xs, xt = xs[:, i_s], xt[:, i_t]
        results[rep] = transfer_random_forest(xs[keep_src], y_src, xt[known], y_tgt.to_numpy()[known].astype(str), seed)
    rows = [{"representation": rep, "class": c, "f1": r.per_class[c], "chance": r.chance[c],
             "n_target": int((y_tgt.to_numpy()[known] == c).sum())} for rep, r in results.items() for c in r.classes]
    per_class = pd.DataFrame(rows)
    summary = pd.DataFrame([{"representation": rep, "macro_f1": r.macro_f1, "n_train": r.n_train, "n_test": r.n_test,
                             "classes_above_chance": int(sum(r.per_class[c] > r.chance[c] for c in r.classes)),
                             "n_classes": len(r.classes)} for rep, r in results.items()])
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite, command=COMMAND) as tmp:
            per_class.to_csv(tmp / "per_class_f1.csv", index=False)
            summary.to_csv(tmp / "summary.csv", index=False)
            for rep, r in results.items():
                r.confusion.to_csv(tmp / f"confusion_{rep}.csv")
            plot_transfer_f1(per_class, str(tmp / "transfer_f1.png"))
            (tmp / "summary.json").write_text(json.dumps({
                "source_tokens": str(source_tokens), "target_tokens": str(target_tokens), "label": label,
                "target_label": target_label, "seed": seed, "n_target_unmapped": unmapped,
                "source_markers": list(map(str, s_ch)), "target_markers": list(map(str, t_ch)),
                "summary": summary.to_dict("records")}, indent=1, default=json_default))
    return CrossPanelResult(results, per_class, summary, unmapped, None if out is None else Path(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_cross_panel", description=__doc__.split("\n")[0])
    p.add_argument("--source-tokens", required=True, help="virtues_tokens output of the annotated dataset (shared markers)")
    p.add_argument("--target-tokens", required=True, help="virtues_tokens output of the dataset to annotate (shared markers)")
    p.add_argument("--out", required=True)
    p.add_argument("--label", default="cell_type", help="source cells-table column with the (coarse) labels")
    p.add_argument("--target-label", default=None, help="target column with its ground truth (default: --label)")
    p.add_argument("--label-map", default=None, help="CSV target,source regrouping target labels into source classes")
    p.add_argument("--source-data", default=None, help="source dataset: train only on its --source-split tissues")
    p.add_argument("--source-split", default="train", help="split of the source tissues to train on, or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        result = cross_panel_transfer(args.source_tokens, args.target_tokens, args.out, args.label, args.target_label,
                                      args.label_map, args.source_data, args.source_split, args.seed, args.overwrite)
        print(result.per_class.to_string(index=False))
        print(result.summary.to_string(index=False))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
