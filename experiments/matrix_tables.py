"""``tables.md`` of a matrix: each paper table/figure rebuilt from our cells, the paper's numbers beside ours.

Cells sharing a ``table`` become rows of one markdown table; every metric gets two columns, ours
and the paper's (``—`` where the paper gives no number, e.g. values it only plots). Each table ends
with what differs from the paper (synthetic data, CPU size), taken from the cells. A bar chart
(``comparison.png``) puts every cell's headline metric beside the paper's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from experiments.matrix_cells import Cell
from experiments.matrix_run import CellPaths, cell_status, read_record


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}"


def _tables(cells: dict[str, Cell]) -> dict[str, list[Cell]]:
    grouped: dict[str, list[Cell]] = {}
    for cell in cells.values():
        grouped.setdefault(cell.table, []).append(cell)
    return grouped


def render_tables(paper: str, cells: dict[str, Cell], paths: CellPaths, scale: str) -> str:
    """The markdown of ``tables.md``."""
    lines = [f"# {paper.upper()} experiment matrix ({scale} size)", "",
             "Each table rebuilds a table or figure of the paper from our runs; `paper` columns quote the "
             "published numbers (— where the paper only plots them). Status and run time per cell at the end.", ""]
    for title, group in _tables(cells).items():
        keys = list(dict.fromkeys(k for c in group for k in c.metrics))
        lines += [f"## {title}", "", "| cell | " + " | ".join(f"{k} | paper" for k in keys) + " |",
                  "|---" * (1 + 2 * len(keys)) + "|"]
        for cell in group:
            record = read_record(paths, cell) or {}
            ours = record.get("metrics", {}) if cell_status(paths, cell, scale) == "done" else {}
            values = [f"{_fmt(ours.get(k))} | {_fmt(cell.paper_numbers.get(k))}" for k in keys]
            lines.append(f"| {cell.row} | " + " | ".join(values) + " |")
        differs = list(dict.fromkeys(c.differs.strip() for c in group if c.differs.strip()))
        lines += ["", *(f"What differs: {d}" for d in differs), ""]
        for cell in group:
            source = cells[cell.reads] if cell.reads else cell
            if paths.work(source).exists():
                figures = [p for pattern in cell.figures for p in sorted(paths.work(source).glob(pattern))]
                lines += [f"![{cell.name}: {p.stem}]({p.relative_to(paths.root / paper)})" for p in figures[:2]]
        lines.append("")
    lines += ["## Cells", "", "| cell | reproduces | status | seconds |", "|---|---|---|---|"]
    for cell in cells.values():
        record = read_record(paths, cell) or {}
        lines.append(f"| {cell.name} | {cell.reproduces} | {cell_status(paths, cell, scale)} | "
                     f"{record.get('seconds', '—')} |")
    return "\n".join(lines) + "\n"


def plot_comparison(paper: str, cells: dict[str, Cell], paths: CellPaths, scale: str, path: Path) -> Path | None:
    """Bars of each done cell's metrics that the paper also reports: ours beside the paper's."""
    import matplotlib  # lazy: plotting is optional for the matrix logic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ours, theirs = [], [], []
    for cell in cells.values():
        record = read_record(paths, cell)
        if record is None or cell_status(paths, cell, scale) != "done":
            continue
        for key, value in record["metrics"].items():
            if key in cell.paper_numbers and value is not None and not math.isnan(float(value)):
                labels.append(f"{cell.name}\n{key}")
                ours.append(float(value))
                theirs.append(cell.paper_numbers[key])
    if not labels:
        return None
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4.2))
    ax.bar(x - 0.2, ours, 0.4, label="ours (synthetic, CPU size)" if scale == "cpu" else "ours")
    ax.bar(x + 0.2, theirs, 0.4, label="paper")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_title(f"{paper.upper()} matrix: our cells beside the paper's numbers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
