"""`make exp-virtues`: pretrain VirTues, evaluate masked reconstruction on the held-out tissues against
the paper's baselines, and write a report.

    python -m experiments.virtues_experiment --config experiments/configs/virtues/synthetic.yaml \
        --data data/synthetic [--out runs/virtues/<run>] [--split test] [--ckpt C] \
        [--max-crops 64] [--marker-max-crops 2] [--trainer-arg=--trainer.max_steps=200]

Outputs in `runs/virtues/<run>/`: `report.md` (Pearson r and F1 per masking strategy for VirTues and
the baselines, as in the paper's Fig. 2d; training curves; figures), `summary.csv`
(`strategy,method,pearson_r,f1`), `per_marker.csv`, `summary_seen_unseen.csv`, the evaluation folder
`reconstruction/` (figures, baseline fits, skipped markers, log), the evaluated checkpoint
`model.ckpt` (the weights at the end of the time-bounded run), the Lightning/CSV/W&B (offline) logs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import pandas as pd

import experiments.cli  # noqa: F401  (W&B offline by default)
from datamodules.command_line import run_command
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
from experiments.virtues_pretrain import main as virtues_pretrain
from experiments.virtues_reconstruct import run as reconstruct
from lightning_modules.virtues import current_hparams

NAMES = {"virtues": "VirTues", "visible_mean": "Visible-pixel mean", "most_correlated": "Most-correlated marker"}
#: Reconstruction loss (train and val) and training throughput.
TRAINING_CURVES = (
    CurvePanel("MSE over all pixels (masked autoencoding)",
               (Curve("train/loss", label="train"), Curve("val/loss", label="val", marker="o")), log_y=True, legend=True),
    CurvePanel("throughput (crops/s)", (Curve("train/crops_per_s"),)),
)


def report_body(summary: pd.DataFrame, per_marker: pd.DataFrame, seen: pd.DataFrame | None, info: dict) -> list[str]:
    """The VirTues part of ``report.md``: the paper's Fig. 2d layout, verdicts per masking strategy,
    seen vs unseen markers, best/least reconstructed markers, skipped channels."""
    lines = [
        f"Held-out split `{info['split']}`: {info['n_tissues']} tissues, {info['n_crops']} crops of 128×128 px "
        f"({info['n_marker_crops']} for marker masking), {info['n_markers']} markers. Model d={info['d_model']}, "
        f"encoder `{info['encoder_pattern']}`, decoder `{info['decoder_pattern']}`; trained {info['steps']} steps in "
        f"{info['train_minutes']:.1f} min on {info['device']}; evaluation {info['eval_minutes']:.1f} min; "
        f"total {info['total_minutes']:.1f} min.",
        "",
        "## Reconstruction (layout of the paper's Fig. 2d; mean over markers)",
        "",
        "| Masking | Method | Pearson r | F1 |",
        "|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        lines.append(f"| {row.strategy} | {NAMES.get(row.method, row.method)} | {format_metric(row.pearson_r)} | "
                     f"{format_metric(row.f1)} |")
    lines.append("")
    verdicts = []
    for strategy, grp in summary.groupby("strategy", sort=False):
        v = grp.loc[grp["method"] == "virtues", "pearson_r"]
        b = grp.loc[grp["method"] != "virtues"]
        if len(v) and len(b):
            bv = b.iloc[0]
            won = v.iloc[0] > bv["pearson_r"]
            verdicts.append(f"- {strategy} masking: VirTues r = {v.iloc[0]:.3f} vs {NAMES.get(bv['method'], bv['method'])} "
                            f"r = {bv['pearson_r']:.3f} — VirTues {'better' if won else 'NOT better'}.")
    lines += verdicts + [""]
    lines += [
        "Metrics as in the Methods: Pearson r between reconstruction and ground truth over the pixels of the "
        "masked tokens only, pooled over the crops of a dataset, per marker and strategy, then averaged over markers; "
        "F1 of pixel positivity with both images thresholded at the mean ground truth of the marker over those "
        "pixels. Baselines: the mean of the visible pixels of the same channel and crop (independent and niche "
        "masking); the most correlated other marker on the training tissues, mapped by a least-squares line (marker "
        "masking). Values are in the model's preprocessed space (clip, log1p, standardise, blur).",
        "",
    ]
    if seen is not None and len(seen) and (~seen["seen"].astype(bool)).any():
        lines += ["## Seen vs unseen markers (zero-shot)", "", "| Masking | Method | seen | Pearson r | F1 | markers |",
                  "|---|---|---|---|---|---|"]
        for row in seen.itertuples(index=False):
            lines.append(f"| {row.strategy} | {NAMES.get(row.method, row.method)} | {row.seen} | {format_metric(row.pearson_r)} | "
                         f"{format_metric(row.f1)} | {row.n_markers} |")
        lines.append("")
    pv = per_marker[(per_marker["method"] == "virtues") & (per_marker["strategy"] == "independent")]
    if len(pv):
        pv = pv.sort_values("pearson_r", ascending=False)
        lines += ["Best reconstructed markers (independent masking): " + ranked_markers(pv.head(6)) + ".", "",
                  "Least reconstructed: " + ranked_markers(pv.tail(4)) + ".", ""]
    if info.get("skipped"):
        lines += [f"Channels not evaluated (no UniProt id / embedding, see `reconstruction/skipped_markers.csv`): "
                  f"{', '.join(info['skipped'])}.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.virtues_experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/configs/virtues/synthetic.yaml")
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--out", default=None, help="run folder (default runs/virtues/<timestamp>)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--ckpt", default=None, help="skip training and evaluate this checkpoint")
    parser.add_argument("--max-crops", type=int, default=64)
    parser.add_argument("--marker-max-crops", type=int, default=2,
                        help="crops per dataset for marker masking (C forward passes each; CPU budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer-arg", action="append", default=[],
                        help="extra LightningCLI args, e.g. --trainer-arg=--trainer.max_steps=200")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Pretrain (unless ``--ckpt``), evaluate masked reconstruction on the held-out tissues, write the report."""
    t_start = time.perf_counter()
    run_dir = new_run_dir(args.out, "virtues")
    held_out = held_out_tissues(args.data, args.split)

    metrics, steps = None, 0
    if args.ckpt:
        ckpt = args.ckpt
    else:
        # The run is bounded by trainer.max_steps and validated rarely (CPU budget): evaluate the final
        # weights rather than the best-val-loss checkpoint, which may be an early one.
        trained = train_with_cli(virtues_pretrain, args.config, args.data, run_dir, args.trainer_arg, keep="final")
        ckpt, metrics, steps = trained.checkpoint, trained.metrics, trained.steps
    train_minutes = (time.perf_counter() - t_start) / 60

    t_eval = time.perf_counter()
    device = device_name()
    eval_dir = run_dir / "reconstruction"
    result = reconstruct(ckpt, [args.data], eval_dir, split=args.split, modality="imc", max_crops=args.max_crops,
                         seed=args.seed, overwrite=True, device=device, marker_max_crops=args.marker_max_crops)
    eval_minutes = (time.perf_counter() - t_eval) / 60
    for name in ("summary.csv", "per_marker.csv", "summary_seen_unseen.csv"):
        shutil.copyfile(eval_dir / name, run_dir / name)
    figures = sorted(eval_dir.glob("*.png"), key=lambda p: (not p.name.startswith("pearson"), p.name))
    curve = plot_training_curves(metrics, run_dir / "training_curves.png", TRAINING_CURVES)
    if curve:
        figures.insert(0, curve)

    arch = current_hparams(checkpoint_hparams(ckpt)).get("arch", {})  # either checkpoint layout (flat or ``arch``)
    skipped = pd.read_csv(eval_dir / "skipped_markers.csv")
    per_marker = result.per_marker
    info = {
        "data": args.data, "split": args.split, "n_tissues": len(held_out),
        "n_crops": sum(result.settings["n_crops"].values()),
        "n_marker_crops": result.settings.get("crops_scored_per_strategy", {}).get("marker", 0),
        "n_markers": per_marker["marker"].nunique(), "d_model": arch.get("d_model", "?"),
        "encoder_pattern": arch.get("encoder_pattern", "?"), "decoder_pattern": arch.get("decoder_pattern", "?"),
        "steps": steps, "train_minutes": train_minutes, "eval_minutes": eval_minutes,
        "total_minutes": (time.perf_counter() - t_start) / 60, "device": device,
        "skipped": [str(m) for m in skipped["marker"]],
    }
    report = write_report(run_dir, f"VirTues masked reconstruction on {args.data}",
                          report_body(result.summary, per_marker, result.summary_seen_unseen, info), figures,
                          reproduce_command("exp-virtues", "experiments.virtues_experiment", argv))
    log_to_wandb(run_dir, "virtuplex-virtues", f"{run_dir.name}-reconstruction", result.summary, per_marker, figures,
                 summary_key=lambda row: f"{row.strategy}/{row.method}/pearson_r")
    print(result.summary.to_string(index=False))
    print(f"trained {steps} steps in {train_minutes:.1f} min, evaluated in {eval_minutes:.1f} min, "
          f"total {info['total_minutes']:.1f} min")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
