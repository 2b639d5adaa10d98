"""Tissue structures of one region by SCGP (ROSIE Fig. 4), optionally scored against a reference partition.

    python -m experiments.scgp --cells R.cell_data.csv --expression R.expression.csv --out OUT
        [--reference R.scgp_annotations.csv] [--resolution R] [--seed 0] [--um-per-px 0.3775] [--overwrite]
    python -m experiments.scgp --cells R.h5ad --out OUT ...      (X = expression, obsm['spatial'] = centroids)

Inputs are the SCGP authors' CSV tables: cells ``CELL_ID,X,Y`` (centroids in pixels), expression
``CELL_ID,<marker>,...`` (raw mean intensity per cell), reference ``CELL_ID,SCGP`` (-1 = unassigned;
a ``partition`` column, as in this command's own ``partitions.csv``, or named labels work too), so the
partition of ROSIE's predicted expression can be scored against the one of the measured expression.
The method and its defaults are in :mod:`analysis.scgp`.

Writes to ``OUT`` (atomically): ``partitions.csv`` (cell_id, partition; -1 = unassigned), ``map.png``,
``scgp.json`` (the parameters used), and with ``--reference`` ``scores.csv`` (ARI, macro and per-label
F1 with its bootstrap 95 % CI) and ``mapping.csv`` (each partition's reference label, sizes, overlap).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.outputs import atomic_output_dir, json_default
from analysis.scgp import (
    DELAUNAY_CUTOFF_UM,
    FEATURE_KNN,
    SCGP_UM_PER_PX,
    UNASSIGNED,
    default_resolution,
    partition_scores,
    plot_partition_maps,
    scgp_partition,
)
from datamodules.layout import check_mpp
from datamodules.user_tables import read_user_table
from experiments.commands import refuse_existing_output, run_command

log = logging.getLogger("experiments.scgp")

COMMAND = "scgp"
ID_COLUMN = "CELL_ID"
#: Reference values that mean "in no structure" (SCGP writes -1).
UNASSIGNED_WORDS = frozenset({"-1", "-1.0", "", "nan", "na", "none", "unassigned"})


def read_cells_csv(cells_path: Path, expression_path: Path) -> tuple[pd.Index, np.ndarray, np.ndarray, list[str]]:
    """Cell ids, centroids (px), expression and marker names from the two CSVs, rows in the cells' order."""
    cells = _id_table(cells_path, "cell table")
    missing = [c for c in ("X", "Y") if c not in cells.columns]
    if missing:
        raise ValueError(f"{cells_path}: no column(s) {missing} (columns: {list(cells.columns)}); the cell table "
                         "needs CELL_ID,X,Y (centroids in pixels)")
    xy = _numeric(cells[["X", "Y"]], cells_path, "coordinate")
    expression = _id_table(expression_path, "expression table")
    markers = [c for c in expression.columns]
    if not markers:
        raise ValueError(f"{expression_path}: no marker columns besides {ID_COLUMN}; it needs CELL_ID,<marker>,...")
    _same_ids(cells.index, expression.index, cells_path, expression_path)
    values = _numeric(expression.loc[cells.index, markers], expression_path, "expression")
    return cells.index, xy, values, markers


def read_cells_h5ad(path: Path) -> tuple[pd.Index, np.ndarray, np.ndarray, list[str]]:
    """Cell ids (obs names), centroids (``obsm['spatial']``, px), expression (X) and markers (var names)."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable AnnData .h5ad file ({str(exc).splitlines()[0]})") from None
    if "spatial" not in adata.obsm:
        raise ValueError(f"{path}: no obsm['spatial'] (cell centroids, pixels); add it, or give --cells CELLS.csv "
                         "--expression EXPR.csv")
    ids = pd.Index(adata.obs_names.astype(str), name=ID_COLUMN)
    if ids.has_duplicates:
        raise ValueError(f"{path}: {int(ids.duplicated().sum())} duplicate cell id(s) in obs_names, e.g. "
                         f"{ids[ids.duplicated()][0]!r}; every cell needs its own id")
    xy = np.asarray(adata.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"{path}: obsm['spatial'] has shape {xy.shape}; it needs one (x, y) row per cell")
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    frame = pd.DataFrame(x, index=ids, columns=[str(v) for v in adata.var_names])
    coords = pd.DataFrame(xy[:, :2], index=ids, columns=["X", "Y"])
    return ids, _numeric(coords, path, "obsm['spatial'] coordinate"), _numeric(frame, path, "expression (X)"), \
        list(frame.columns)


def read_reference(path: Path, ids: pd.Index, cells_path: Path) -> tuple[np.ndarray, dict[int, str]]:
    """Integer reference labels in the cells' order (-1 = unassigned) and each label's name."""
    table = _id_table(path, "reference partition table", dtype=str)
    columns = {c.lower(): c for c in table.columns}
    column = columns.get("scgp") or columns.get("partition") or (table.columns[0] if len(table.columns) == 1 else None)
    if column is None:
        raise ValueError(f"{path}: no SCGP (or partition) column among {list(table.columns)}; the reference needs "
                         "CELL_ID,SCGP")
    _same_ids(ids, table.index, cells_path, path)
    raw = table.loc[ids, column].fillna("").astype(str).str.strip()
    unassigned = raw.str.lower().isin(UNASSIGNED_WORDS)
    names = sorted(set(raw[~unassigned]))
    numbers = [_integer(n) for n in names]
    numeric = bool(names) and all(v is not None for v in numbers)
    if numeric:  # SCGP's 0, 1, ... (also as 1.0 when a blank made the column float)
        codes = dict(zip(names, numbers))
        if min(codes.values()) < 0:
            raise ValueError(f"{path}: column {column} has negative labels other than -1 (unassigned)")
        if len(set(codes.values())) < len(codes):
            raise ValueError(f"{path}: column {column} spells one label two ways (e.g. 1 and 1.0)")
    else:
        codes = {n: i for i, n in enumerate(names)}
    labels = np.where(unassigned, UNASSIGNED, raw.map(lambda v: codes.get(v, UNASSIGNED))).astype(np.int64)
    return labels, {code: str(code) if numeric else name for name, code in codes.items()}


def run(args: argparse.Namespace) -> dict[str, object]:
    """Read and check everything, partition, score, and write OUT; returns the summary."""
    um_per_px = check_mpp(args.um_per_px, "--um-per-px")
    if args.resolution is not None and not args.resolution > 0:
        raise ValueError(f"--resolution {args.resolution} must be > 0 (CPM resolution, e.g. 3e-4; default: "
                         "scaled to the number of cells)")
    if args.feature_knn < 2 or not args.distance_cutoff_um > 0 or args.bootstrap < 0:
        raise ValueError("--feature-knn must be >= 2 (it counts the cell itself), --distance-cutoff-um > 0 and "
                         "--bootstrap >= 0")
    refuse_existing_output(args.out, args.overwrite, COMMAND)
    cells_path = Path(args.cells)
    if cells_path.suffix.lower() == ".h5ad":
        if args.expression:
            raise ValueError(f"--cells {cells_path} is an AnnData file, which holds the expression (X): drop "
                             "--expression")
        ids, xy_px, expression, markers = read_cells_h5ad(cells_path)
    else:
        if not args.expression:
            raise ValueError("--expression EXPR.csv is required with a CSV cell table (or give --cells X.h5ad)")
        ids, xy_px, expression, markers = read_cells_csv(cells_path, Path(args.expression))
    if len(ids) == 0:
        raise ValueError(f"{cells_path}: no cells")
    reference = read_reference(Path(args.reference), ids, cells_path) if args.reference else None

    resolution = args.resolution if args.resolution is not None else default_resolution(len(ids))
    start = time.perf_counter()
    partition = scgp_partition(xy_px * um_per_px, expression, resolution=resolution, feature_knn=args.feature_knn,
                               max_distance_um=args.distance_cutoff_um, seed=args.seed)
    seconds = time.perf_counter() - start
    summary: dict[str, object] = {
        "cells": len(ids), "markers": markers, "partitions": int(len(set(partition) - {UNASSIGNED})),
        "unassigned_cells": int((partition == UNASSIGNED).sum()), "resolution": resolution, "seed": args.seed,
        "feature_knn": args.feature_knn, "distance_cutoff_um": args.distance_cutoff_um, "um_per_px": um_per_px,
        "seconds": round(seconds, 2)}
    panels = {"SCGP": partition}
    label_names: dict[int, str] = {}
    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        pd.DataFrame({"cell_id": ids, "partition": partition}).to_csv(tmp / "partitions.csv", index=False)
        if reference is not None:
            ref, label_names = reference
            sample = np.full(len(ids), cells_path.name.split(".")[0])
            scores, match = partition_scores(partition, ref, sample, n_boot=args.bootstrap, seed=args.seed)
            scores = scores.rename(columns={f"f1_{c}": f"f1_{n}" for c, n in label_names.items()})
            scores.to_csv(tmp / "scores.csv", index=False)
            _mapping_table(match.mapping, match.contingency, partition, label_names).to_csv(
                tmp / "mapping.csv", index=False)
            panels = {"SCGP (mapped to reference)": _display_labels(partition, match.mapping, ref),
                      "reference": ref}
            summary.update(ari=float(scores["ari"].iloc[0]), f1_macro=float(scores["f1_macro"].iloc[0]),
                           f1_macro_ci=[float(scores["f1_macro_ci_low"].iloc[0]),
                                        float(scores["f1_macro_ci_high"].iloc[0])])
        plot_partition_maps(xy_px, panels, tmp / "map.png", title=cells_path.name, label_names=label_names)
        (tmp / "scgp.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.scgp", description=__doc__.split("\n")[0])
    p.add_argument("--cells", required=True, help="CELL_ID,X,Y table (pixels), or an AnnData .h5ad")
    p.add_argument("--expression", help="CELL_ID,<marker>,... table of raw per-cell expression (CSV input)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--reference", help="CELL_ID,SCGP table of a reference partition to score against")
    p.add_argument("--resolution", type=float, default=None,
                   help="CPM resolution (default: 4.83 / number of cells, the SCGP DKD example's 3e-4 at 16,092 cells)")
    p.add_argument("--seed", type=int, default=0, help="seed of Leiden and of the F1 bootstrap")
    p.add_argument("--um-per-px", type=float, default=SCGP_UM_PER_PX,
                   help=f"pixel size of X,Y in µm (default {SCGP_UM_PER_PX}, the SCGP authors' CODEX)")
    p.add_argument("--distance-cutoff-um", type=float, default=DELAUNAY_CUTOFF_UM,
                   help=f"longest spatial edge in µm (SCGP default {DELAUNAY_CUTOFF_UM:g})")
    p.add_argument("--feature-knn", type=int, default=FEATURE_KNN,
                   help=f"feature neighbours, counting the cell itself (SCGP default {FEATURE_KNN})")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the F1 CI")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        s = run(args)
        line = (f"SCGP: {s['cells']} cells, {s['partitions']} partitions ({s['unassigned_cells']} cells unassigned), "
                f"resolution {s['resolution']:.3g}, {s['seconds']} s")
        if "ari" in s:
            low, high = s["f1_macro_ci"]  # type: ignore[misc]
            line += f"\nARI vs reference: {s['ari']:.3f}   F1 (macro): {s['f1_macro']:.3f} [{low:.3f}, {high:.3f}]"
        print(f"{line}\nwritten to {args.out}")

    return run_command(body)


def _id_table(path: Path, what: str, dtype: type | None = None) -> pd.DataFrame:
    """A table indexed by its CELL_ID column (any case), ids as stripped strings, unique."""
    table = read_user_table(path, what=what)
    id_column = next((c for c in table.columns if c.lower() == ID_COLUMN.lower()), None)
    if id_column is None:
        raise ValueError(f"{path}: no {ID_COLUMN} column (columns: {list(table.columns)[:8]}); the {what} needs "
                         f"one id per cell in a column named {ID_COLUMN}")
    ids = table.pop(id_column)
    if ids.isna().any():
        raise ValueError(f"{path}: {int(ids.isna().sum())} row(s) without a {ID_COLUMN}; every row needs a cell id")
    table.index = pd.Index(_id_strings(ids), name=ID_COLUMN)
    if table.index.has_duplicates:
        dup = table.index[table.index.duplicated()]
        raise ValueError(f"{path}: {len(dup)} duplicate {ID_COLUMN}(s), e.g. {dup[0]!r}; every cell needs its own id")
    return table.astype(dtype) if dtype is not None else table


def _id_strings(ids: pd.Series) -> list[str]:
    """Ids as text, with integer-valued floats (1.0, as Excel writes them) read as integers."""
    out = []
    for v in ids:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(str(v).strip())
    return out


def _integer(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _same_ids(ids: pd.Index, other: pd.Index, ids_path: Path, other_path: Path) -> None:
    only_here, only_there = ids.difference(other), other.difference(ids)
    if len(only_here) or len(only_there):
        example = (only_here if len(only_here) else only_there)[0]
        raise ValueError(f"{other_path}: cell ids do not match {ids_path}: {len(only_here)} of the {len(ids)} cell(s) "
                         f"there are missing here, and {len(only_there)} id(s) here are not there (e.g. {example!r}); "
                         "give tables of the same cells")


def _numeric(frame: pd.DataFrame, path: Path, what: str) -> np.ndarray:
    """``frame`` as float64, refusing text and NaN/inf with the column and cell named."""
    bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        column = bad[0]
        numbers = pd.to_numeric(frame[column], errors="coerce")
        cell = frame.index[numbers.isna() & frame[column].notna()]
        example = f" (cell {cell[0]}: {frame.loc[cell[0], column]!r})" if len(cell) else ""
        raise ValueError(f"{path}: {what} column(s) {bad[:5]} are not numeric{example}; every {what} value must be "
                         "a number")
    values = frame.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(f"{path}: {int((~finite).sum())} missing or infinite {what} value(s), e.g. cell "
                         f"{frame.index[row]} column {frame.columns[col]}; fill or drop those cells")
    return values


def _mapping_table(mapping: dict[int, int], contingency: pd.DataFrame, partition: np.ndarray,
                   names: dict[int, str]) -> pd.DataFrame:
    rows = []
    for part, label in sorted(mapping.items()):
        overlap = int(contingency.loc[part, label]) if label != UNASSIGNED else 0
        rows.append({"partition": part, "reference": names.get(label, "unassigned" if label == UNASSIGNED else label),
                     "partition_cells": int((partition == part).sum()), "overlap_cells": overlap})
    return pd.DataFrame(rows, columns=["partition", "reference", "partition_cells", "overlap_cells"])


def _display_labels(partition: np.ndarray, mapping: dict[int, int], ref: np.ndarray) -> np.ndarray:
    """Partitions shown in their reference label's colour; unmatched ones get labels of their own."""
    shown = np.full(len(partition), UNASSIGNED, dtype=np.int64)
    spare = int(max(ref.max(initial=-1), max(mapping.values(), default=-1))) + 1
    for part, label in sorted(mapping.items()):
        if label == UNASSIGNED:
            label, spare = spare, spare + 1
        shown[partition == part] = label
    return shown


if __name__ == "__main__":
    sys.exit(main())
