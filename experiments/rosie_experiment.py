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
import json
import shutil
import sys
import time

import numpy as np
import pandas as pd

import experiments.cli  # noqa: F401  (W&B offline by default)
from datamodules.command_line import run_command
from datamodules.he_histograms import training_he_histograms
from datamodules.rosie_cell_data import CELL_SOURCES
from experiments.reporting import (
    Curve,
    CurvePanel,
    checkpoint_hparams,
    device_name,
    format_metric,
    held_out_tissues,
    log_to_wandb,
    new_run_dir,
    plot_training_curves,
    ranked_markers,
    reproduce_command,
    train_with_cli,
    write_report,
)
from experiments.rosie_downstream import run as run_downstream
from experiments.rosie_downstream_report import report_section as downstream_section
from experiments.rosie_evaluation_pipeline import evaluate
from experiments.rosie_predict import main as rosie_predict
from experiments.rosie_train import main as rosie_train
from lightning_modules.components.model_files import load_torch_file

NAMES = {"rosie": "ROSIE", "he_expression": "H&E expression", "cell_morphology": "Cell morphology"}
#: Training loss and the patch-level validation Pearson R that early stopping monitors.
TRAINING_CURVES = (
    CurvePanel("training loss (masked MSE)", (Curve("train/loss"),), log_y=True),
    CurvePanel("validation Pearson R (patches)", (Curve("val/pearson_r", marker="o"),)),
)


def report_body(summary: pd.DataFrame, per_marker: pd.DataFrame, qc: dict, info: dict) -> list[str]:
    """The ROSIE part of ``report.md``: the paper's Table 2 layout, best/least markers, per-tissue QC."""
    lines = [
        f"Held-out split `{info['split']}`: {info['n_tissues']} tissues, {info['n_markers']} markers, stride {info['stride']} px. "
        f"Model `{info['arch']}`, trained {info['train_minutes']:.1f} min on {info['device']}; inference {info['patches_per_s']:.0f} patches/s.",
        "",
        "## Expression metrics (layout of the paper's Table 2)",
        "",
        f"| Evaluation dataset ({info['n_markers']} biomarkers) | Pearson R | Spearman R | C-index (sample) | patches |",
        "|---|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        lines.append(f"| {NAMES.get(row.method, row.method)} | {row.pearson_r:.3f} | {row.spearman_r:.3f} | "
                     f"{format_metric(row.c_index)} | {int(row.n_patches)} |")
    lines += ["", "Metrics as in the Methods: Pearson and Spearman R across 8×8-px patches per marker and sample, "
              "averaged; C-index of per-sample 75th percentiles; patches below the 90th percentile of background noise excluded.",
              f"With {info['n_tissues']} held-out tissues the sample-level C-index rests on very few pairs: read it as indicative only.", ""]
    if "rosie" in set(per_marker.get("method", [])):
        pm = per_marker[per_marker["method"] == "rosie"].sort_values("pearson_r", ascending=False)
        lines += [f"Best-predicted markers: {ranked_markers(pm.head(8))}.", "",
                  f"Least-predicted markers: {ranked_markers(pm.tail(5))}.", ""]
    if qc:
        lines += ["## Quality control", "", "| tissue | mean dynamic range (p99−p1) | W1 to training H&E |", "|---|---|---|"]
        for tid, q in qc.items():
            w1 = q.get("w1_distance")
            lines.append(f"| {tid} | {q.get('mean_dynamic_range', float('nan')):.3f} | {'n/a' if w1 is None else f'{w1:.4f}'} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rosie_experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/configs/rosie/synthetic.yaml")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--out", default=None, help="run folder (default runs/rosie/<timestamp>)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--ckpt", default=None, help="skip training and evaluate this checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the downstream analyses (training: the config's)")
    parser.add_argument("--cells", choices=CELL_SOURCES, default="dapi",
                        help="cells of the baselines and downstream analyses: segmented from the measured DAPI as in "
                             "the paper (default), or the dataset's stored masks (for the synthetic data: perfect ones)")
    parser.add_argument("--trainer-arg", action="append", default=[], help="extra LightningCLI args, e.g. --trainer-arg=--trainer.max_steps=200")
    parser.add_argument("--no-downstream", action="store_true",
                        help="skip phenotyping/SCGP/neighbourhoods/QC (comparisons that need only the expression metrics)")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Train (unless ``--ckpt``), predict the held-out tissues, evaluate them, write the report."""
    run_dir = new_run_dir(args.out, "rosie")
    held_out = held_out_tissues(args.data, args.split)

    t0 = time.perf_counter()
    metrics = None
    if args.ckpt:
        ckpt = args.ckpt
    else:
        trained = train_with_cli(rosie_train, args.config, args.data, run_dir, args.trainer_arg, keep="best")
        ckpt, metrics = trained.checkpoint, trained.metrics
    train_minutes = (time.perf_counter() - t0) / 60

    pred_dir = run_dir / "predictions"
    reference = []
    if load_torch_file(ckpt, mmap=True).get("reference_he_histograms") is None:  # a checkpoint from before they travelled in it
        np.save(run_dir / "reference_he_histograms.npy", training_he_histograms([args.data]))
        reference = ["--reference-hist", str(run_dir / "reference_he_histograms.npy")]
    code = rosie_predict(["--ckpt", ckpt, "--he", args.data, "--split", args.split, "--out", str(pred_dir),
                          "--stride", str(args.stride), "--ome-tiff", "--overwrite", "--no-progress", *reference])
    if code:
        raise ValueError(f"prediction of the held-out tissues failed (exit {code}; its error is above)")
    qc = json.loads((pred_dir / "qc.json").read_text()) if (pred_dir / "qc.json").exists() else {}

    eval_dir = run_dir / "evaluation"
    results = evaluate(pred_dir, args.data, eval_dir, methods=("rosie", "he_expression", "cell_morphology"),
                       split=args.split, overwrite=True, cells=args.cells)
    summary, per_marker = results["summary"], results["per_marker"]
    for name in ("summary.csv", "per_marker.csv", "per_sample.csv"):
        if (eval_dir / name).exists():
            shutil.copyfile(eval_dir / name, run_dir / name)
    downstream = None if args.no_downstream else run_downstream(
        pred_dir, args.data, run_dir / "downstream", split=args.split, evaluation=str(eval_dir), cells_from=args.cells,
        seed=args.seed, overwrite=True)
    figures = sorted(eval_dir.glob("*.png"))
    curve = plot_training_curves(metrics, run_dir / "training_curves.png", TRAINING_CURVES)
    if curve:
        figures.insert(0, curve)

    hp = checkpoint_hparams(ckpt)
    tissues_qc = qc.get("tissues", qc) if isinstance(qc, dict) else {}
    info = {
        "data": args.data, "split": args.split, "n_tissues": len(held_out), "n_markers": hp.get("num_markers", "?"),
        "stride": args.stride, "arch": hp.get("arch", "?"), "train_minutes": train_minutes,
        "device": device_name(), "patches_per_s": _patches_per_s(tissues_qc),
    }
    body = report_body(summary, per_marker, _qc_rows(tissues_qc), info)
    if downstream is not None:
        body += downstream_section(downstream["tables"], downstream, figure_dir="downstream") + [""]
    report = write_report(run_dir, f"ROSIE on {args.data}", body,
                          figures, reproduce_command("exp-rosie", "experiments.rosie_experiment", argv))
    log_to_wandb(run_dir, "virtuplex-rosie", f"{run_dir.name}-eval", summary, per_marker, figures,
                 summary_key=lambda row: f"{row.method}/pearson_r")
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
