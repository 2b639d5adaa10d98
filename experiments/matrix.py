"""Run a paper's experiment matrix: every table and figure as a resumable cell, compared in W&B.

    python -m experiments.matrix --paper rosie|virtues [--list] [--only NAME[,NAME]] [--scale cpu|paper]
        [--out runs/matrix] [--data KEY=DIR ...] [--launcher serial|slurm|local] [--no-wandb]
    make exp-matrix PAPER=rosie            (also: virtuplex matrix run --paper rosie)

Cells are the YAML files in ``experiments/configs/matrix/<paper>/`` (:mod:`experiments.matrix_cells`).
A rerun skips finished cells and redoes unfinished ones (:mod:`experiments.matrix_run`), then writes
``<out>/<paper>/tables.md`` (the paper's tables rebuilt from our cells, its numbers beside ours) and
``comparison.png``. Each cell is an offline W&B run in one group (:mod:`experiments.matrix_wandb`).

``--launcher slurm`` submits the cells through submitit (a maintained launcher library, so no sbatch
templates here): one job array per dependency wave, later waves held with ``afterok`` on earlier
ones, each cell's ``resources`` (gpus_per_node, nodes, timeout_min, cpus_per_task) as its request.
A preempted or requeued job resubmits itself (submitit's checkpoint hook) and skips finished cells;
the training commands inside resume from their own ``last.ckpt`` where they have one.
``--launcher local`` runs the same submitit path as local processes (to try it without a cluster).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from datamodules.command_line import run_command
from experiments.matrix_cells import CONFIG_ROOT, PAPERS, SCALES, Cell, load_matrix
from experiments.matrix_run import CellPaths, cell_status, read_record, run_cell
from experiments.matrix_tables import plot_comparison, render_tables
from experiments.matrix_wandb import cell_logger

log = logging.getLogger(__name__)
LAUNCHERS = ("serial", "slurm", "local")


def parse_data(items: list[str], defaults: dict[str, str]) -> dict[str, str]:
    data = dict(defaults)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "default", item
        data[key.strip()] = value.strip()
    return data


def selected(cells: dict[str, Cell], only: str | None) -> list[str]:
    """The cells to run: all, or ``--only`` names plus whatever they read (dependencies first)."""
    if not only:
        return list(cells)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in cells]
    if unknown:
        raise ValueError(f"--only: unknown cell(s) {unknown}; --list shows the {len(cells)} cells")
    keep: set[str] = set()

    def add(name: str) -> None:
        if name not in keep:
            keep.add(name)
            for dep in cells[name].dependencies():
                add(dep)

    for name in wanted:
        add(name)
    return [n for n in cells if n in keep]


def list_cells(cells: dict[str, Cell], paths: CellPaths, scale: str) -> str:
    rows = [f"{'cell':28s} {'status':8s} {'seconds':>8s}  reproduces"]
    for cell in cells.values():
        record = read_record(paths, cell) or {}
        rows.append(f"{cell.name:28s} {cell_status(paths, cell, scale):8s} {str(record.get('seconds', '')):>8s}  "
                    f"{cell.reproduces}")
    return "\n".join(rows)


class CellJob:
    """A picklable submitit job: run one cell unless finished; resubmits itself when preempted."""

    def __init__(self, paper: str, name: str, out: str, scale: str, data: dict[str, str], use_wandb: bool,
                 config_root: str) -> None:
        self.paper, self.name, self.out, self.scale, self.data = paper, name, out, scale, data
        self.use_wandb, self.config_root = use_wandb, config_root

    def __call__(self) -> str:
        matrix = load_matrix(self.paper, Path(self.config_root))
        cells, paths = matrix["cells"], CellPaths(Path(self.out))
        if cell_status(paths, cells[self.name], self.scale) == "done":
            return "skipped (done)"
        run_cell(cells[self.name], paths, self.scale, self.data, cells,
                 cell_logger(Path(self.out), matrix["group"], self.use_wandb))
        return "done"

    def checkpoint(self) -> Any:  # submitit calls this on preemption/timeout: requeue the same cell
        import submitit  # lazy: only the cluster launchers need it

        return submitit.helpers.DelayedSubmission(CellJob(self.paper, self.name, self.out, self.scale, self.data,
                                                          self.use_wandb, self.config_root))


def waves(cells: dict[str, Cell], names: list[str]) -> list[list[str]]:
    """Dependency levels: cells of one wave read only cells of earlier waves."""
    level: dict[str, int] = {}
    for name in names:  # names are in dependency order
        level[name] = 1 + max((level.get(d, -1) for d in cells[name].dependencies() if d in names), default=-1)
    return [[n for n in names if level[n] == k] for k in range(max(level.values(), default=-1) + 1)]


def submit(args: argparse.Namespace, cells: dict[str, Cell], names: list[str], data: dict[str, str],
           paths: CellPaths) -> int:
    """Submit the cells through submitit (slurm, or local processes); waits for the local launcher."""
    import submitit  # lazy: only the cluster launchers need it

    folder = paths.root / args.paper / "submitit"
    cluster = "slurm" if args.launcher == "slurm" else "local"
    jobs_before: list[Any] = []
    for wave in waves(cells, [n for n in names if cell_status(paths, cells[n], args.scale) != "done"]):
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        res = {"timeout_min": 120, "nodes": 1, "gpus_per_node": 0, "cpus_per_task": 4}
        for name in wave:
            res.update({k: v for k, v in cells[name].resources.items() if k in res})
        params: dict[str, Any] = dict(res, name=f"matrix-{args.paper}")
        if cluster == "slurm":
            params.update(slurm_array_parallelism=args.array_parallelism, slurm_partition=args.partition)
            if jobs_before:
                params["slurm_additional_parameters"] = {"dependency": "afterok:" + ":".join(j.job_id for j in jobs_before)}
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        jobs = executor.submit_array([CellJob(args.paper, n, str(paths.root), args.scale, data, not args.no_wandb,
                                              args.config_root) for n in wave])
        print("submitted " + ", ".join(f"{n} ({j.job_id})" for n, j in zip(wave, jobs)))
        if cluster == "local":
            for name, job in zip(wave, jobs):
                print(f"{name}: {job.result()}")
        jobs_before = jobs
    if cluster == "slurm":
        print(f"follow with `squeue --me`; when the jobs end, rerun with --launcher serial --list (or without "
              f"--launcher) to write {paths.root / args.paper / 'tables.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--paper", required=True, choices=PAPERS)
    parser.add_argument("--scale", default="cpu", choices=SCALES, help="cpu: minutes on 2 cores (default); paper: the paper's sizes")
    parser.add_argument("--list", action="store_true", help="print the cells and their status, run nothing")
    parser.add_argument("--only", default=None, help="run these cells (comma-separated) and the cells they read")
    parser.add_argument("--out", default="runs/matrix", help="matrix folder (cells in <out>/<paper>/<cell>)")
    parser.add_argument("--data", action="append", default=[], help="dataset folder: DIR or KEY=DIR (repeatable)")
    parser.add_argument("--launcher", default="serial", choices=LAUNCHERS)
    parser.add_argument("--partition", default=None, help="slurm partition")
    parser.add_argument("--array-parallelism", type=int, default=16, help="slurm: cells running at once")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the cells to W&B")
    parser.add_argument("--config-root", default=str(CONFIG_ROOT), help="folder of the matrix configs (<root>/<paper>/*.yaml)")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.paper, Path(args.config_root))
    cells: dict[str, Cell] = matrix["cells"]
    paths = CellPaths(Path(args.out))
    if args.list:
        print(list_cells(cells, paths, args.scale))
        return 0
    data = parse_data(args.data, matrix["data"])
    names = selected(cells, args.only)
    if args.launcher != "serial":
        return submit(args, cells, names, data, paths)
    logger = cell_logger(paths.root, matrix["group"], not args.no_wandb)
    todo = [n for n in names if cell_status(paths, cells[n], args.scale) != "done"]
    print(f"{args.paper} matrix: {len(names) - len(todo)} of {len(names)} cells done; running {todo or 'none'}")
    for i, name in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}: {cells[name].reproduces}", flush=True)
        run_cell(cells[name], paths, args.scale, data, cells, logger)
    out = paths.root / args.paper
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(render_tables(args.paper, cells, paths, args.scale))
    plot_comparison(args.paper, cells, paths, args.scale, out / "comparison.png")
    print(f"tables: {out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
