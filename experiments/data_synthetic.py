"""Generate the synthetic co-registered H&E / CODEX / IMC dataset, or the cohort preset.

    python -m experiments.data_synthetic --out DIR [--tissues N] [--size PX] [--seed S] \
        [--overwrite] [--workers W]
    python -m experiments.data_synthetic --preset cohort --out DIR [--patients N] [--validation N] \
        [--panel-b N] [--size PX] [--seed S] [--overwrite] [--workers W]

The default preset writes one dataset (:func:`datamodules.synthetic.generate_dataset`). The cohort
preset (:func:`datamodules.synthetic.generate_cohort`) writes DIR/discovery (patients before, on
and after treatment, with response), DIR/validation (independent patients with survival),
DIR/panel_b (a second, partly overlapping IMC panel) and DIR/cohort.json (the planted truth).
This entry point only parses the options, refuses bad ones before anything is written, and reports
the result (errors as one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from datamodules.command_line import run_command
from datamodules.synthetic import (HE_MPP, generate_cohort, generate_dataset, validate_cohort_args,
                                   validate_generation_args)

#: --size when not given, per preset (px at 0.5 µm/px).
DEFAULT_SIZE = {"default": 512, "cohort": 256}


def build_parser() -> argparse.ArgumentParser:
    """The command's options (the same as the generators' keyword arguments)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.data_synthetic",
                                     description="Generate a synthetic co-registered H&E / CODEX / IMC dataset (or, "
                                                 "with --preset cohort, discovery / validation / panel-B cohorts).")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--preset", choices=sorted(DEFAULT_SIZE), default="default",
                        help="default: one dataset of --tissues tissues; cohort: the three cohort datasets")
    parser.add_argument("--tissues", type=int, default=8, help="number of tissues (>= 1; default preset)")
    parser.add_argument("--patients", type=int, default=24,
                        help="discovery patients, 3 tissues each (pre/on/post treatment; cohort preset, >= 2)")
    parser.add_argument("--validation", type=int, default=40, help="validation-cohort tissues (cohort preset, >= 2)")
    parser.add_argument("--panel-b", type=int, default=12, help="tissues imaged with panel B (cohort preset, >= 1)")
    parser.add_argument("--size", type=int, default=None,
                        help="tissue size in px at 0.5 µm/px (>= 128; default preset: 512, multiple of 16; "
                             "cohort: 256, multiple of 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering tissues in parallel (output is identical)")
    return parser


def generate(args: argparse.Namespace) -> None:
    """Check the options, generate the dataset(s), and say where they went and how long it took."""
    size = DEFAULT_SIZE[args.preset] if args.size is None else args.size
    if args.preset == "cohort":
        validate_cohort_args(args.patients, args.validation, args.panel_b, size)
    else:
        validate_generation_args(args.tissues, size)
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: already exists; pass --overwrite to replace it")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    start = time.perf_counter()
    if args.preset == "cohort":
        out = generate_cohort(args.out, n_patients=args.patients, n_validation=args.validation, n_panel_b=args.panel_b,
                              size=size, seed=args.seed, overwrite=args.overwrite, workers=args.workers)
        print(f"wrote the synthetic cohort ({args.patients} discovery patients × 3 timepoints, {args.validation} "
              f"validation tissues, {args.panel_b} panel-B tissues; {size}×{size} px at {HE_MPP} µm/px) to {out} "
              f"(discovery/, validation/, panel_b/, cohort.json) in {time.perf_counter() - start:.1f} s")
        return
    out = generate_dataset(args.out, args.tissues, size, args.seed, overwrite=args.overwrite, workers=args.workers)
    print(f"wrote {args.tissues} synthetic tissues ({size}×{size} px at {HE_MPP} µm/px) to {out} "
          f"in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 2 (one line on stderr) for a user's mistake."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
