"""Evaluate ROSIE predictions with the paper's metrics and baselines.

    python -m experiments.rosie_evaluate --pred PRED --truth DATASET_DIR --out DIR
        [--methods rosie he_expression cell_morphology] [--split test] [--overwrite]
        [--gradcam-ckpt C --gradcam-markers CD45 PanCK]

    python -m experiments.rosie_evaluate --ckpt C --truth PATCH_FOLDER --out DIR   # patch-level truth

``PRED`` is a dataset folder written by ``experiments.rosie_predict`` (any stride); ``DATASET_DIR``
the dataset with the measured CODEX. A ``--truth`` folder holding ``markers.csv``,
``channel_registered/<slide>.csv`` and ``he_patches/`` (the HEX sample-data layout) is patch-level
ground truth: ``--ckpt`` is run on every patch instead of reading ``--pred``. Writes
``summary.csv``, ``per_marker.csv``, ``per_sample.csv``, ``markers.csv`` (matched and unmatched
markers), ``evaluation.json``, ``evaluate.log`` and the figures (``*.png``: per-marker Pearson
bars, predicted vs measured, Grad-CAM). The policies are documented in :mod:`analysis.rosie_evaluation`;
the evaluation itself is :mod:`experiments.rosie_evaluation_pipeline` (datasets are read by
:mod:`datamodules.rosie_evaluation_data`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from analysis.rosie_evaluation import METHODS
from datamodules import layout
from datamodules.command_line import run_command
from datamodules.rosie import normalize_he
from datamodules.rosie_cell_data import CELL_SOURCES
from datamodules.rosie_evaluation_data import is_patch_level_truth
from experiments import rosie_evaluation_pipeline as pipeline
from lightning_modules.rosie import RosieModule, load_rosie_checkpoint

log = logging.getLogger("rosie_evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.rosie_evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--pred", default=None, help="prediction dataset folder (output of experiments.rosie_predict)")
    p.add_argument("--ckpt", default=None, help="RosieModule checkpoint, for patch-level ground truth (instead of --pred)")
    p.add_argument("--truth", required=True, help="dataset folder with measured CODEX, or a patch-level folder (markers.csv, ...)")
    p.add_argument("--out", required=True, help="output folder for tables and figures (written atomically)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="methods to score on the same patches (default: all; patch-level: rosie he_expression)")
    p.add_argument("--split", default=None, help="evaluate only predicted tissues of this split of the truth dataset")
    p.add_argument("--pred-mpp", type=float, default=None, help="prediction resolution to use when it has several (default: coarsest)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--morphology-epochs", type=int, default=50, help="epochs of the cell-morphology MLP (paper: 50)")
    p.add_argument("--cells", choices=CELL_SOURCES, default="stored",
                   help="cells of the morphology baseline: the stored masks, or segmented here from the measured DAPI "
                        "(the paper) or the H&E")
    p.add_argument("--patch-stride", type=int, default=8, help="patch-level mode: block size of the per-patch prediction grid")
    p.add_argument("--gradcam-ckpt", default=None, help="RosieModule checkpoint for the Grad-CAM figure")
    p.add_argument("--gradcam-markers", nargs="+", default=["CD45", "PanCK"])
    p.add_argument("--gradcam-patches", type=int, default=4, help="random foreground patches in the Grad-CAM figure")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of checkpoints (only files you trust)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_rosie_module(path: str | Path, trust_checkpoint: bool = False) -> RosieModule:
    """The checkpoint's RosieModule in eval mode on CPU.

    Read with ``weights_only=True`` unless ``trust_checkpoint`` (full unpickling runs code from the
    file). Pretrained-weight paths stored in its hparams are not re-read: the checkpoint has the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_rosie_checkpoint(str(path), trust_checkpoint).eval()


def rosie_predict_fn(module: RosieModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B,3,P,P) -> (B,M) with the project's input normalisation."""

    def predict(patches: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(normalize_he(patches))

    return predict


def check_arguments(args: argparse.Namespace) -> None:
    """Numbers outside their range are refused before anything is read."""
    if args.morphology_epochs < 1:
        raise ValueError(f"--morphology-epochs {args.morphology_epochs}: must be >= 1 (the paper trains 50)")
    if args.patch_stride < 1:
        raise ValueError(f"--patch-stride {args.patch_stride}: must be a positive number of px")
    if args.gradcam_patches < 1:
        raise ValueError(f"--gradcam-patches {args.gradcam_patches}: must be >= 1")
    if args.pred_mpp is not None:
        layout.check_mpp(args.pred_mpp, "--pred-mpp")
    if args.split is not None:
        args.split = layout.normalise_split(args.split)


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the arguments say (dataset or patch-level truth); the tables of the evaluation."""
    check_arguments(args)
    gradcam = {}
    if args.gradcam_ckpt:
        cam = load_rosie_module(args.gradcam_ckpt, args.trust_checkpoint)
        gradcam = {"gradcam_model": cam, "gradcam_prepare": normalize_he, "gradcam_markers": args.gradcam_markers,
                   "gradcam_patches": args.gradcam_patches}
    if is_patch_level_truth(args.truth):
        if args.pred:
            raise ValueError(f"--truth {args.truth} is patch-level ground truth: give --ckpt (the model is run on its patches), not --pred")
        if not args.ckpt:
            raise ValueError(f"--truth {args.truth} is patch-level ground truth: --ckpt C is required")
        module = load_rosie_module(args.ckpt, args.trust_checkpoint)
        if args.split:
            log.info("--split is ignored for patch-level ground truth")
        return pipeline.evaluate_patch_level(args.truth, rosie_predict_fn(module), list(module.marker_names), args.out,
                                             methods=args.methods or ("rosie", "he_expression"), overwrite=args.overwrite,
                                             stride=args.patch_stride, figures=not args.no_figures, seed=args.seed,
                                             **{k: v for k, v in gradcam.items() if k != "gradcam_model_markers"})
    if not args.pred:
        raise ValueError("--pred PRED is required (a prediction dataset of experiments.rosie_predict)"
                         + (" ; --ckpt is only for patch-level ground truth" if args.ckpt else ""))
    if gradcam:
        gradcam["gradcam_model_markers"] = list(gradcam["gradcam_model"].marker_names)
    return pipeline.evaluate(args.pred, args.truth, args.out, methods=args.methods or METHODS, split=args.split,
                             overwrite=args.overwrite, pred_mpp=args.pred_mpp, morphology_epochs=args.morphology_epochs,
                             cells=args.cells,
                             figures=not args.no_figures, seed=args.seed, **gradcam)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: report(args, run(args)))


def report(args: argparse.Namespace, result: dict) -> None:
    print(result["summary"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if not result["skipped"].empty:
        for _, r in result["skipped"].iterrows():
            print(f"skipped {r['method']}: {r['reason']}")
    m = result["markers"]
    print(f"markers: {int((m['status'] == 'matched').sum())} matched, "
          f"{int((m['status'] == 'not_measured').sum())} predicted but not measured, "
          f"{int((m['status'] == 'not_predicted').sum())} measured but not predicted (see {args.out}/markers.csv)")


if __name__ == "__main__":
    sys.exit(main())
