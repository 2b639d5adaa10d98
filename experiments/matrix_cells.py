"""The cells of a per-paper experiment matrix: one YAML file per paper table or figure.

A cell names what it reproduces, the command that produces it (an existing ``experiments.*``
entry point with its usual config: cells compose the model/data/trainer configs, they never copy
them), its CPU-size arguments and the paper-size ones, the metrics read back from the command's
output files, and the paper's published numbers. Cells of one table (e.g. the backbone comparison)
share a ``table`` name and are rendered as rows of one markdown table.

Why YAML plus a generic "command" job instead of one Python runner per figure: a lab adds a cell
(another backbone, a real dataset) by copying a file, and every cell is resumable and loggable the
same way. Placeholders in arguments: ``{work}`` (the cell's own output folder), ``{data}`` /
``{data:NAME}`` (dataset folders from the matrix's ``data`` map) and ``{cell:NAME}`` (the work folder
of another cell, which then runs first).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent / "configs" / "matrix"
PAPERS = ("rosie", "virtues")
SCALES = ("cpu", "paper")
_PLACEHOLDER = re.compile(r"\{(work|data|cell)(?::([A-Za-z0-9_.-]+))?\}")


@dataclass(frozen=True)
class MetricSource:
    """Where one metric lives in a cell's output: a CSV row (``where`` column filters) or a JSON path."""

    file: str
    column: str | None = None
    where: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    aggregate: str | None = None  # mean | max | min over the matching CSV rows


@dataclass(frozen=True)
class Cell:
    """One experiment of the matrix (see the module docstring for the fields' meaning)."""

    paper: str
    name: str
    reproduces: str
    table: str
    row: str
    module: str | None
    args: tuple[str, ...]
    paper_args: tuple[str, ...]
    metrics: dict[str, MetricSource]
    paper_numbers: dict[str, float]
    differs: str
    tables: tuple[str, ...] = ()
    figures: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    resources: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    reads: str | None = None  # a cell that only reads another cell's outputs (no command of its own)

    def arguments(self, scale: str) -> tuple[str, ...]:
        if scale not in SCALES:
            raise ValueError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
        return self.paper_args if scale == "paper" and self.paper_args else self.args

    def dependencies(self) -> list[str]:
        """Cells whose outputs this one reads (``{cell:NAME}`` placeholders and ``after``)."""
        deps = list(self.after) + ([self.reads] if self.reads else [])
        for arg in (*self.args, *self.paper_args):
            deps += [name for kind, name in _PLACEHOLDER.findall(arg) if kind == "cell" and name]
        return list(dict.fromkeys(deps))

    def fingerprint(self, scale: str) -> str:
        """Changes when what the cell computes changes (its command and arguments), not its paper numbers."""
        text = json.dumps({"module": self.module, "args": self.arguments(scale), "scale": scale, "reads": self.reads},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _metric(name: str, spec: Any, source: str) -> MetricSource:
    if not isinstance(spec, dict) or "file" not in spec or not (("column" in spec) ^ ("path" in spec)):
        raise ValueError(f"{source}: metric {name!r} needs `file` and exactly one of `column` (CSV) or `path` (JSON)")
    return MetricSource(file=str(spec["file"]), column=spec.get("column"), where=dict(spec.get("where", {})),
                        path=spec.get("path"), aggregate=spec.get("aggregate"))


def load_cell(path: Path, paper: str) -> Cell:
    """One cell from its YAML file, with the field names checked (a typo is an error, not a silent default)."""
    raw = yaml.safe_load(path.read_text()) or {}
    allowed = {"name", "reproduces", "table", "row", "module", "args", "paper_args", "metrics", "paper",
               "differs", "tables", "figures", "after", "resources", "reads"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "reproduces", "metrics"):
        if key not in raw:
            raise ValueError(f"{path}: missing `{key}`")
    if not raw.get("module") and not raw.get("reads"):
        raise ValueError(f"{path}: give `module` (the command the cell runs) or `reads` (the cell whose outputs it reads)")
    if raw["name"] != path.stem:
        raise ValueError(f"{path}: `name: {raw['name']}` must equal the file name ({path.stem})")
    return Cell(
        paper=paper, name=raw["name"], reproduces=raw["reproduces"], table=raw.get("table", raw["reproduces"]),
        row=raw.get("row", raw["name"]), module=raw.get("module"),
        args=tuple(str(a) for a in raw.get("args", [])), paper_args=tuple(str(a) for a in raw.get("paper_args", [])),
        metrics={k: _metric(k, v, str(path)) for k, v in raw["metrics"].items()},
        paper_numbers={k: float(v) for k, v in (raw.get("paper") or {}).items()},
        differs=raw.get("differs", ""), tables=tuple(raw.get("tables", [])), figures=tuple(raw.get("figures", [])),
        after=tuple(raw.get("after", [])), resources=dict(raw.get("resources", {})), source=str(path),
        reads=raw.get("reads"))


def load_matrix(paper: str, root: Path = CONFIG_ROOT) -> dict[str, Any]:
    """``{"data": {...}, "cells": {name: Cell}}`` of one paper, cells in dependency order."""
    if paper not in PAPERS:
        raise ValueError(f"--paper {paper!r}: choose one of {', '.join(PAPERS)}")
    folder = root / paper
    settings = yaml.safe_load((folder / "_matrix.yaml").read_text()) if (folder / "_matrix.yaml").exists() else {}
    cells = {p.stem: load_cell(p, paper) for p in sorted(folder.glob("*.yaml")) if not p.name.startswith("_")}
    for cell in cells.values():
        missing = [d for d in cell.dependencies() if d not in cells]
        if missing:
            raise ValueError(f"{cell.source}: depends on unknown cell(s) {missing}")
    preferred = [n for n in settings.get("order", []) if n in cells] + [n for n in cells if n not in settings.get("order", [])]
    return {"data": dict(settings.get("data", {})), "group": settings.get("group", f"{paper}-matrix"),
            "cells": {name: cells[name] for name in dependency_order({n: cells[n] for n in preferred})}}


def dependency_order(cells: dict[str, Cell]) -> list[str]:
    """Cells sorted so that each comes after the cells it reads (a cycle is an error)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(f"matrix cells depend on each other in a circle: {' -> '.join((*chain, name))}")
        state[name] = 1
        for dep in cells[name].dependencies():
            visit(dep, (*chain, name))
        state[name] = 2
        order.append(name)

    for name in cells:
        visit(name, ())
    return order


def resolve(args: tuple[str, ...], work: Path, data: dict[str, str], cell_dirs: dict[str, Path]) -> list[str]:
    """Arguments with ``{work}``, ``{data[:NAME]}`` and ``{cell:NAME}`` filled in."""

    def fill(match: re.Match) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "work":
            return str(work)
        if kind == "data":
            key = name or "default"
            if key not in data:
                raise ValueError(f"matrix data {key!r} is not defined (known: {sorted(data)}); set it with --data {key}=DIR")
            return str(data[key])
        return str(cell_dirs[name] / "work")

    return [_PLACEHOLDER.sub(fill, a) for a in args]
