"""What the experiment drivers (`make exp-rosie`, `make exp-virtues`) share: the training run, the
training-curve figure, the markdown report and its offline W&B mirror.

Why one module: both drivers train with their LightningCLI, read the CSV metrics back, plot curves,
write ``report.md`` with the same frame (title, body, figures, how to reproduce) and mirror the tables
to W&B. Kept here once, a driver only says what is specific to its method — which checkpoint it
evaluates, which curves it draws, the body of its report, the keys of its W&B summary.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from datamodules.store import DatasetStore, StoreError
from lightning_modules.components.model_files import load_torch_file

log = logging.getLogger(__name__)


# ============================================================================================
# Run folder, held-out tissues, training
# ============================================================================================


def new_run_dir(out: str | None, method: str) -> Path:
    """``out``, or ``runs/<method>/<timestamp>`` when not given; created."""
    run_dir = Path(out or f"runs/{method}/{dt.datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def held_out_tissues(data_dir: str, split: str) -> list[str]:
    """The tissue ids of ``split``; refused (``StoreError``) before training when there are none."""
    held_out = DatasetStore(data_dir).tissue_ids(split)
    if not held_out:
        raise StoreError(f"{data_dir}: no tissue in split {split!r}")
    return held_out


@dataclass
class TrainingRun:
    """What a driver needs from training: the checkpoint it evaluates, the logged metrics, the steps."""

    checkpoint: str
    metrics: pd.DataFrame | None
    steps: int


def train_with_cli(cli_main: Callable[[list[str]], Any], config: str, data_dir: str, run_dir: Path, extra: Sequence[str],
                   keep: Literal["best", "final"]) -> TrainingRun:
    """``fit`` with an entry point's LightningCLI (``cli_main``) on ``data_dir``, logging under ``run_dir``.

    ``keep="best"``: the checkpoint callback's best model (the final weights, saved as ``final.ckpt``,
    without one), copied to ``run_dir/model.ckpt``. ``keep="final"``: the final weights, saved as
    ``run_dir/model.ckpt`` — for time-bounded runs validated rarely, whose best-val checkpoint may be
    an early one. ``extra``: more LightningCLI arguments, e.g. ``--trainer.max_steps=40``.
    """
    args = ["fit", "--config", config, "--data.data_dirs", f"[{data_dir}]", "--trainer.default_root_dir", str(run_dir)]
    cli = cli_main(args + list(extra))
    trainer = cli.trainer
    model = run_dir / "model.ckpt"
    if keep == "best":
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not ckpt:
            ckpt = str(run_dir / "final.ckpt")
            trainer.save_checkpoint(ckpt)
        shutil.copyfile(ckpt, model)
    else:
        trainer.save_checkpoint(model)
    return TrainingRun(str(model), logged_metrics(trainer), int(trainer.global_step))


def logged_metrics(trainer: Any) -> pd.DataFrame | None:
    """The ``metrics.csv`` a CSV logger of ``trainer`` wrote (the last such logger's), or None."""
    metrics = None
    for logger in trainer.loggers:
        path = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
        if path.exists():
            metrics = pd.read_csv(path)
    return metrics


def checkpoint_hparams(ckpt: str) -> dict:
    """The hyper-parameters stored in a Lightning checkpoint (read through the safe loader)."""
    return load_torch_file(ckpt, mmap=True).get("hyper_parameters", {})


def device_name() -> str:
    """Where evaluation runs and what the report says: ``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ============================================================================================
# Training curves
# ============================================================================================


@dataclass(frozen=True)
class Curve:
    """One logged column drawn against ``step`` (rows where it is missing are skipped)."""

    column: str
    label: str | None = None
    marker: str | None = None


@dataclass(frozen=True)
class CurvePanel:
    """One subplot of the training-curve figure; curves whose column was not logged are left out."""

    title: str
    curves: tuple[Curve, ...]
    log_y: bool = False
    legend: bool = False


def plot_training_curves(metrics: pd.DataFrame | None, path: Path, panels: Sequence[CurvePanel],
                         required: str = "train/loss") -> Path | None:
    """The panels side by side, written to ``path``; None when ``required`` was never logged."""
    if metrics is None or required not in metrics.columns:
        return None
    import matplotlib  # lazy: selecting the Agg backend is a process-wide side effect

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for curve in panel.curves:
            if curve.column not in metrics.columns:
                continue
            rows = metrics[["step", curve.column]].dropna()
            style = {k: v for k, v in (("marker", curve.marker), ("label", curve.label)) if v is not None}
            ax.plot(rows["step"], rows[curve.column], lw=1, **style)
        ax.set(title=panel.title, xlabel="step", **({"yscale": "log"} if panel.log_y else {}))
        if panel.legend:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================================================
# Markdown report
# ============================================================================================


def format_metric(x: float) -> str:
    """A metric with three decimals, ``n/a`` when missing."""
    return "n/a" if pd.isna(x) else f"{x:.3f}"


def ranked_markers(rows: pd.DataFrame) -> str:
    """``"CD45 0.91, PanCK 0.88"`` from rows with ``marker`` and ``pearson_r``, in their order."""
    return ", ".join(f"{r.marker} {r.pearson_r:.2f}" for r in rows.itertuples())


def reproduce_command(make_target: str, module: str, argv: Sequence[str] | None) -> str:
    """The line of the report's "Reproduce" section: the make target and the equivalent command
    with the driver's arguments (``argv``, or the process's own when None)."""
    return f"make {make_target}  # = python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_report(run_dir: Path, title: str, body: list[str], figures: Sequence[Path], command: str) -> Path:
    """``run_dir/report.md``: ``# <title> — run <run folder>``, the driver's ``body`` lines, the
    figures (paths relative to ``run_dir``) and the command that reproduces the run; written atomically."""
    lines = [f"# {title} — run {run_dir.name}", "", *body]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in figures] + [""]
    lines += ["## Reproduce", "", "```", command, "```", ""]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


# ============================================================================================
# W&B mirror
# ============================================================================================


def log_to_wandb(run_dir: Path, project: str, run_name: str, summary: pd.DataFrame, per_marker: pd.DataFrame,
                 figures: Sequence[Path], summary_key: Callable[[Any], str]) -> None:
    """An offline W&B run under ``run_dir`` with the tables and figures of the report, and each summary
    row's Pearson R under ``summary_key(row)``. Failures are logged, not raised: the report is the
    deliverable, W&B a mirror of it."""
    try:
        import wandb  # lazy: only this optional mirror needs it, and a broken install must not stop the run

        run = wandb.init(project=project, name=run_name, dir=str(run_dir), mode="offline", job_type="evaluation",
                         reinit=True)
        run.log({"summary": wandb.Table(dataframe=summary), "per_marker": wandb.Table(dataframe=per_marker)})
        run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        for row in summary.itertuples(index=False):
            run.summary[summary_key(row)] = row.pearson_r
        run.finish()
    except Exception as exc:  # the report is the deliverable; W&B is a mirror of it
        log.warning("W&B logging skipped: %s", exc)
