"""Compute ESM-2 marker embeddings (``<UniProtID>.pt`` files) from local weights; nothing is downloaded.

    python -m experiments.data_embeddings --fasta markers.fasta --weights esm2_t30_150M_UR50D.pt \
        --out marker_embeddings/ [--layer 30] [--device cpu] [--overwrite] [--trust-checkpoint]

The method (mean over residues of ESM-2 layer 30, BOS/EOS excluded) is
:mod:`lightning_modules.components.marker_embeddings`. The weights file is read without running code
from it; ``--trust-checkpoint`` allows full unpickling of a file you downloaded yourself from the
ESM authors, if it needs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from datamodules.command_line import run_command
from lightning_modules.components.marker_embeddings import (ESM_LAYER, compute_esm_embeddings, read_fasta,
                                                            save_marker_embeddings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.data_embeddings", description=__doc__.split("\n")[0])
    p.add_argument("--fasta", required=True, help="FASTA with one record per marker protein")
    p.add_argument("--weights", required=True, help="local ESM-2 weights (fair-esm .pt file or HF folder)")
    p.add_argument("--out", required=True, help="output folder for <UniProtID>.pt files")
    p.add_argument("--layer", type=int, default=ESM_LAYER)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="recompute ids whose file exists")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the weights file (runs code from it: only files from the ESM authors)")
    return p


def compute(args: argparse.Namespace) -> None:
    if not 1 <= args.layer <= 100:
        raise ValueError(f"--layer {args.layer}: must be a transformer layer index (ESM-2 150M has 30)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give the folder for the <UniProtID>.pt files")
    ids, seqs = read_fasta(args.fasta)
    todo = [(u, s) for u, s in zip(ids, seqs) if args.overwrite or not (out / f"{u}.pt").is_file()]
    if not todo:
        print(f"all {len(ids)} embeddings already in {out}")
        return
    emb = compute_esm_embeddings([u for u, _ in todo], [s for _, s in todo], args.weights, args.layer, args.device,
                                 trust=args.trust_checkpoint)
    save_marker_embeddings(emb, out)
    print(f"wrote {len(emb)} embeddings to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: compute(args))


if __name__ == "__main__":
    sys.exit(main())
