"""Generate the synthetic co-registered H&E / CODEX / IMC dataset.

    python -m experiments.data_synthetic --out DIR [--tissues N] [--size PX] [--seed S] \
        [--overwrite] [--workers W]

The generator itself is :mod:`datamodules.synthetic`; this entry point only parses the options,
refuses bad ones before anything is written, and reports the result (errors as one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from datamodules.command_line import run_command
from datamodules.synthetic import HE_MPP, generate_dataset, validate_generation_args


def build_parser() -> argparse.ArgumentParser:
    """The command's options (the same as the generator's keyword arguments)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.data_synthetic",
                                     description="Generate a synthetic co-registered H&E / CODEX / IMC dataset.")
    parser.add_argument("--out", required=True, help="output dataset folder (must not exist unless --overwrite)")
    parser.add_argument("--tissues", type=int, default=8, help="number of tissues (>= 1)")
    parser.add_argument("--size", type=int, default=512, help="tissue size in px at 0.5 µm/px (>= 128, multiple of 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering tissues in parallel (output is identical)")
    return parser


def generate(args: argparse.Namespace) -> None:
    """Check the options, generate the dataset, and say where it went and how long it took."""
    validate_generation_args(args.tissues, args.size)
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: already exists; pass --overwrite to replace it")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    start = time.perf_counter()
    out = generate_dataset(args.out, args.tissues, args.size, args.seed, overwrite=args.overwrite, workers=args.workers)
    print(f"wrote {args.tissues} synthetic tissues ({args.size}×{args.size} px at {HE_MPP} µm/px) to {out} "
          f"in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 2 (one line on stderr) for a user's mistake."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
