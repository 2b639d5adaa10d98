"""(Re)compute a dataset's VirTues standardisation statistics: per-image 99th percentiles and
dataset-wide means/stds of the clipped, log1p-transformed intensities.

    python -m experiments.data_stats DIR --modality imc [--mpp 1.0] [--force]

Ingest and the synthetic generator compute them already; run this after editing images or masks
by hand, or for a dataset written by another tool. The method is :mod:`datamodules.statistics`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from datamodules import layout
from datamodules.command_line import run_command
from datamodules.statistics import compute_and_store_statistics
from datamodules.store import DatasetStore, StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.data_stats", description=__doc__.split("\n")[0])
    p.add_argument("root", help="dataset folder")
    p.add_argument("--modality", required=True, help="multiplex modality folder, e.g. imc or codex")
    p.add_argument("--mpp", type=float, default=None, help="resolution in µm/px (default: every resolution present)")
    p.add_argument("--force", action="store_true", help="recompute statistics that exist")
    return p


def compute(args: argparse.Namespace) -> None:
    store = DatasetStore(args.root)
    if args.modality not in store.modalities():
        raise StoreError(f"{store.url}: no modality {args.modality!r} (has {store.modalities()}); pass --modality")
    resolutions = [layout.check_mpp(args.mpp, "--mpp")] if args.mpp is not None else store.resolutions(args.modality)
    for mpp in resolutions:
        stats = compute_and_store_statistics(args.root, args.modality, mpp, force=args.force, progress=True)
        print(f"{args.modality} at {mpp:g} µm/px: statistics of {len(stats.upper_quantiles)} tissue(s), "
              f"{len(stats.means)} channel(s) in {store.path(layout.standardization_dir(args.modality, mpp))}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: compute(args))


if __name__ == "__main__":
    sys.exit(main())
