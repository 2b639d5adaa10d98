"""Running matrix cells: status, resumable execution, metrics read back from the cell's own files.

A cell is complete when ``<out>/<paper>/<cell>/cell.json`` exists with the fingerprint of the
arguments it ran with; it is written last, atomically, so a killed matrix leaves the interrupted
cell without it and a rerun redoes exactly the unfinished cells (a cell whose arguments changed is
"stale" and reruns too). The cell's command writes into ``<cell>/work``; a partial ``work`` left by a
kill is cleared before the rerun, so no half-written table is ever read as a result.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.outputs import json_default
from experiments.matrix_cells import Cell, MetricSource, resolve

log = logging.getLogger(__name__)
DONE_FILE = "cell.json"
STATUSES = ("done", "stale", "partial", "pending")


@dataclass(frozen=True)
class CellPaths:
    root: Path

    def dir(self, cell: Cell) -> Path:
        return self.root / cell.paper / cell.name

    def work(self, cell: Cell) -> Path:
        return self.dir(cell) / "work"

    def done(self, cell: Cell) -> Path:
        return self.dir(cell) / DONE_FILE


def read_record(paths: CellPaths, cell: Cell) -> dict | None:
    try:
        return json.loads(paths.done(cell).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def cell_status(paths: CellPaths, cell: Cell, scale: str) -> str:
    """done | stale (finished with other arguments) | partial (started, killed or failed) | pending."""
    record = read_record(paths, cell)
    if record is not None:
        return "done" if record.get("fingerprint") == cell.fingerprint(scale) else "stale"
    return "partial" if paths.work(cell).exists() else "pending"


def _select(table: pd.DataFrame, source: MetricSource, where: str) -> pd.DataFrame:
    for column, value in source.where.items():
        if column not in table.columns:
            raise ValueError(f"{where}: no column {column!r} (columns: {list(table.columns)})")
        table = table[table[column].astype(str) == str(value)]
    return table


def read_metric(work: Path, source: MetricSource) -> float:
    """One number from the cell's output (NaN when the row exists but the value does not)."""
    path = work / source.file
    if not path.exists():
        raise ValueError(f"{path}: the cell's command did not write this file (metric source)")
    if source.path is not None:
        value: Any = json.loads(path.read_text())
        for key in source.path.split("."):
            if isinstance(value, list):
                value = value[int(key)]
            elif isinstance(value, dict) and key in value:
                value = value[key]
            else:
                raise ValueError(f"{path}: no key {source.path!r} (stopped at {key!r})")
        return float("nan") if value is None else float(value)
    rows = _select(pd.read_csv(path), source, str(path))
    if source.column not in rows.columns:
        raise ValueError(f"{path}: no column {source.column!r}")
    values = pd.to_numeric(rows[source.column], errors="coerce")
    if len(values) == 0:
        raise ValueError(f"{path}: no row matches {source.where}")
    if len(values) > 1 and source.aggregate is None:
        raise ValueError(f"{path}: {len(values)} rows match {source.where}; add `aggregate: mean|max|min`")
    if source.aggregate:
        return float(getattr(values, source.aggregate)())
    return float(values.iloc[0])


def collect_metrics(cell: Cell, work: Path) -> dict[str, float]:
    return {key: read_metric(work, source) for key, source in cell.metrics.items()}


def run_cell(cell: Cell, paths: CellPaths, scale: str, data: dict[str, str], cells: dict[str, Cell],
             logger: Any = None) -> dict:
    """Run one cell (its dependencies must be done) and write its ``cell.json``; returns the record."""
    deps = [d for d in cell.dependencies() if cell_status(paths, cells[d], scale) != "done"]
    if deps:
        raise ValueError(f"cell {cell.name}: run {deps} first (its inputs)")
    work = paths.work(cell)
    if work.exists():
        log.info("cell %s: clearing the partial output of an earlier, unfinished run", cell.name)
        shutil.rmtree(work)
    paths.done(cell).unlink(missing_ok=True)
    work.mkdir(parents=True)
    args = resolve(cell.arguments(scale), work, data, {n: paths.dir(c) for n, c in cells.items()})
    t0 = time.perf_counter()
    if cell.module:
        log.info("cell %s: python -m %s %s", cell.name, cell.module, " ".join(args))
        code = importlib.import_module(cell.module).main(args)
        if code:
            raise ValueError(f"cell {cell.name}: `python -m {cell.module}` exited {code} (its error is above); "
                             "rerun the matrix to retry this cell")
    metrics = collect_metrics(cell, paths.work(cells[cell.reads]) if cell.reads else work)
    record = {"cell": cell.name, "paper": cell.paper, "scale": scale, "fingerprint": cell.fingerprint(scale),
              "module": cell.module, "args": args, "seconds": round(time.perf_counter() - t0, 1),
              "metrics": metrics, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if logger is not None:
        logger(cell, paths.work(cells[cell.reads]) if cell.reads else work, record)
    tmp = paths.done(cell).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=json_default))
    os.replace(tmp, paths.done(cell))
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not math.isnan(v))
    log.info("cell %s done in %.0f s: %s", cell.name, record["seconds"], shown)
    return record
