"""`make exp-rosie`: train ROSIE, predict the held-out tissues, evaluate against measured CODEX and
the paper's two baselines, and write a report.

    python -m experiments.rosie_experiment --config experiments/configs/rosie/synthetic.yaml \
        --data data/synthetic [--out runs/rosie/<run>] [--split test] [--stride 8]

Outputs in `runs/rosie/<run>/`: `report.md` (the layout of the paper's Table 2 plus figures),
`summary.csv` (one row per method: rosie, he_expression, cell_morphology; columns
`method,pearson_r,spearman_r,c_index,n_patches`), `per_marker.csv`, `per_sample.csv`, figures,
the best checkpoint, the predicted tissues (a dataset folder with OME-Zarr + OME-TIFF + QC), and an
offline W&B run with the same tables and figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import experiments.cli  # noqa: F401  (W&B offline by default)
from datamodules.command_errors import run_command
from datamodules.store import StoreError
from lightning_modules.components.model_files import load_torch_file

log = logging.getLogger("rosie_experiment")


def reference_histograms(data_dir: str, split: str = "train") -> np.ndarray:
    """256-bin H&E histograms (inside the tissue mask) of the training tissues, for the W1 QC score."""
    from analysis.rosie_metrics import he_histograms
    from datamodules.store import DatasetStore

    store = DatasetStore(data_dir)
    hists = []
    for tid in store.tissue_ids(split):
        image = store.image("he", tid)
        hists.append(he_histograms(image.read_all(), store.tissue_mask(tid, image.mpp)))
    return np.stack(hists)


def train(config: str, data_dir: str, run_dir: Path, extra: list[str]) -> tuple[str, pd.DataFrame | None]:
    from experiments.rosie_train import main as rosie_train

    args = ["fit", "--config", config, "--data.data_dirs", f"[{data_dir}]", "--trainer.default_root_dir", str(run_dir)]
    cli = rosie_train(args + extra)
    ckpt = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    if not ckpt:
        ckpt = str(run_dir / "final.ckpt")
        cli.trainer.save_checkpoint(ckpt)
    best = run_dir / "model.ckpt"
    shutil.copyfile(ckpt, best)
    metrics = None
    for logger in cli.trainer.loggers:
        path = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
        if path.exists():
            metrics = pd.read_csv(path)
    return str(best), metrics


def plot_training(metrics: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metrics is None or "train/loss" not in metrics.columns:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    loss = metrics[["step", "train/loss"]].dropna()
    axes[0].plot(loss["step"], loss["train/loss"], lw=1)
    axes[0].set(title="training loss (masked MSE)", xlabel="step", yscale="log")
    if "val/pearson_r" in metrics.columns:
        val = metrics[["step", "val/pearson_r"]].dropna()
        axes[1].plot(val["step"], val["val/pearson_r"], marker="o", lw=1)
    axes[1].set(title="validation Pearson R (patches)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path, summary: pd.DataFrame, per_marker: pd.DataFrame, qc: dict, info: dict,
                 figures: list[Path]) -> Path:
    names = {"rosie": "ROSIE", "he_expression": "H&E expression", "cell_morphology": "Cell morphology"}
    lines = [
        f"# ROSIE on {info['data']} — run {run_dir.name}",
        "",
        f"Held-out split `{info['split']}`: {info['n_tissues']} tissues, {info['n_markers']} markers, stride {info['stride']} px. "
        f"Model `{info['arch']}`, trained {info['train_minutes']:.1f} min on {info['device']}; inference {info['patches_per_s']:.0f} patches/s.",
        "",
        "## Expression metrics (layout of the paper's Table 2)",
        "",
        f"| Evaluation dataset ({info['n_markers']} biomarkers) | Pearson R | Spearman R | C-index (sample) | patches |",
        "|---|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        c = "n/a" if pd.isna(row.c_index) else f"{row.c_index:.3f}"
        lines.append(f"| {names.get(row.method, row.method)} | {row.pearson_r:.3f} | {row.spearman_r:.3f} | {c} | {int(row.n_patches)} |")
    lines += ["", "Metrics as in the Methods: Pearson and Spearman R across 8×8-px patches per marker and sample, "
              "averaged; C-index of per-sample 75th percentiles; patches below the 90th percentile of background noise excluded.",
              f"With {info['n_tissues']} held-out tissues the sample-level C-index rests on very few pairs: read it as indicative only.", ""]
    if "rosie" in set(per_marker.get("method", [])):
        pm = per_marker[per_marker["method"] == "rosie"].sort_values("pearson_r", ascending=False)
        top = ", ".join(f"{r.marker} {r.pearson_r:.2f}" for r in pm.head(8).itertuples())
        low = ", ".join(f"{r.marker} {r.pearson_r:.2f}" for r in pm.tail(5).itertuples())
        lines += [f"Best-predicted markers: {top}.", "", f"Least-predicted markers: {low}.", ""]
    if qc:
        lines += ["## Quality control", "", "| tissue | mean dynamic range (p99−p1) | W1 to training H&E |", "|---|---|---|"]
        for tid, q in qc.items():
            w1 = q.get("w1_distance")
            lines.append(f"| {tid} | {q.get('mean_dynamic_range', float('nan')):.3f} | {'n/a' if w1 is None else f'{w1:.4f}'} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in figures] + [""]
    lines += ["## Reproduce", "", "```", info["command"], "```", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_to_wandb(run_dir: Path, summary: pd.DataFrame, per_marker: pd.DataFrame, figures: list[Path]) -> None:
    try:
        import wandb

        run = wandb.init(project="virtuplex-rosie", name=f"{run_dir.name}-eval", dir=str(run_dir), mode="offline",
                         job_type="evaluation", reinit=True)
        run.log({"summary": wandb.Table(dataframe=summary), "per_marker": wandb.Table(dataframe=per_marker)})
        run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        for row in summary.itertuples(index=False):
            run.summary[f"{row.method}/pearson_r"] = row.pearson_r
        run.finish()
    except Exception as exc:  # the report is the deliverable; W&B is a mirror of it
        log.warning("W&B logging skipped: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rosie_experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/configs/rosie/synthetic.yaml")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--out", default=None, help="run folder (default runs/rosie/<timestamp>)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--ckpt", default=None, help="skip training and evaluate this checkpoint")
    parser.add_argument("--trainer-arg", action="append", default=[], help="extra LightningCLI args, e.g. --trainer-arg=--trainer.max_time=00:00:02:00")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> int:

    from experiments.rosie_evaluation_pipeline import evaluate
    from datamodules.store import DatasetStore
    from experiments.rosie_predict import main as rosie_predict

    run_dir = Path(args.out or f"runs/rosie/{dt.datetime.now():%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    store = DatasetStore(args.data)
    held_out = store.tissue_ids(args.split)
    if not held_out:
        raise StoreError(f"{args.data}: no tissue in split {args.split!r}")

    t0 = time.perf_counter()
    metrics = None
    if args.ckpt:
        ckpt = args.ckpt
    else:
        ckpt, metrics = train(args.config, args.data, run_dir, args.trainer_arg)
    train_minutes = (time.perf_counter() - t0) / 60

    ref = run_dir / "reference_he_histograms.npy"
    np.save(ref, reference_histograms(args.data))
    pred_dir = run_dir / "predictions"
    code = rosie_predict(["--ckpt", ckpt, "--he", args.data, "--split", args.split, "--out", str(pred_dir),
                          "--stride", str(args.stride), "--ome-tiff", "--reference-hist", str(ref), "--overwrite"])
    if code:
        raise ValueError(f"prediction of the held-out tissues failed (exit {code}; its error is above)")
    qc = json.loads((pred_dir / "qc.json").read_text()) if (pred_dir / "qc.json").exists() else {}

    eval_dir = run_dir / "evaluation"
    results = evaluate(pred_dir, args.data, eval_dir, methods=("rosie", "he_expression", "cell_morphology"),
                       split=args.split, overwrite=True)
    summary, per_marker = results["summary"], results["per_marker"]
    for name in ("summary.csv", "per_marker.csv", "per_sample.csv"):
        if (eval_dir / name).exists():
            shutil.copyfile(eval_dir / name, run_dir / name)
    figures = sorted(eval_dir.glob("*.png"))
    curve = plot_training(metrics, run_dir / "training_curves.png") if metrics is not None else None
    if curve:
        figures.insert(0, curve)

    import torch

    hp = load_torch_file(ckpt, mmap=True).get("hyper_parameters", {})
    tissues_qc = qc.get("tissues", qc) if isinstance(qc, dict) else {}
    info = {
        "data": args.data, "split": args.split, "n_tissues": len(held_out), "n_markers": hp.get("num_markers", "?"),
        "stride": args.stride, "arch": hp.get("arch", "?"), "train_minutes": train_minutes,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "patches_per_s": _patches_per_s(tissues_qc),
        "command": "make exp-rosie  # = python -m experiments.rosie_experiment " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    report = write_report(run_dir, summary, per_marker, _qc_rows(tissues_qc), info, figures)
    log_to_wandb(run_dir, summary, per_marker, figures)
    print(summary.to_string(index=False))
    print(f"report: {report}")
    return 0


def _qc_rows(qc: dict) -> dict:
    """Per-tissue QC summary from rosie_predict's qc.json (tolerant of its exact nesting)."""
    rows = {}
    for tid, q in qc.items():
        if not isinstance(q, dict):
            continue
        dr = q.get("dynamic_range")
        mean_dr = float(np.mean(list(dr.values()) if isinstance(dr, dict) else dr)) if dr is not None else float("nan")
        rows[tid] = {"mean_dynamic_range": mean_dr, "w1_distance": q.get("w1_to_training_he")}
    return rows


def _patches_per_s(qc: dict) -> float:
    """Overall inference throughput over the predicted tissues."""
    patches = sum(q.get("n_patches", 0) for q in qc.values() if isinstance(q, dict))
    seconds = sum(q.get("seconds", 0.0) for q in qc.values() if isinstance(q, dict))
    return patches / seconds if seconds else float("nan")


if __name__ == "__main__":
    sys.exit(main())
