"""Add one tissue's image (and masks, tables, embeddings) to a dataset of the harmonized layout.

    python -m experiments.data_ingest --image FILE_OR_FOLDER --modality imc --dataset NAME \\
        --tissue-id ID --out DIR [--channels CSV] [--mask F] [--cell-mask F] [--tissues-csv F] \\
        [--cells-csv F] [--resolution MPP] [--split train|val|test] [--patient-id P] \\
        [--embeddings DIR] [--extend-panel] [--register-to-dapi CODEX_TISSUE_ID] [--stream|--no-stream] [--overwrite]

The method, and what is accepted and refused, is :mod:`datamodules.ingest`. Warnings (markers
without a UniProt id or embedding, assumed pixel size, ...) are printed once as ``warning:`` lines;
a refused input is one ``error:`` line naming the file, the field and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from datamodules.command_line import run_command
from datamodules.ingest import ingest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.data_ingest", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="OME-TIFF/TIFF/PNG file, or a folder of single-channel TIFFs")
    p.add_argument("--modality", required=True, help="he, codex, imc, mibi, ...")
    p.add_argument("--dataset", required=True, help="dataset folder name (created under --out when absent)")
    p.add_argument("--tissue-id", required=True)
    p.add_argument("--out", required=True, help="folder holding datasets")
    p.add_argument("--channels", help="CSV: channel_name,uniprot_id[,is_nuclear_marker,qc_pass]")
    p.add_argument("--mask", help="tissue mask (nonzero = tissue); default: Otsu")
    p.add_argument("--cell-mask", help="cell instance mask (integer ids, 0 = background)")
    p.add_argument("--tissues-csv", help="clinical table with a tissue_id column (row of this tissue is used)")
    p.add_argument("--cells-csv", help="cell table with cell_id (= cell mask label) and labels")
    p.add_argument("--resolution", type=float, help="µm per pixel (default: from OME metadata, else 1.0)")
    p.add_argument("--split", help="train, val or test (also: Train, validation, testing, ...)")
    p.add_argument("--patient-id")
    p.add_argument("--embeddings", help="folder of <UniProtID>.pt ESM-2 embeddings to copy in")
    p.add_argument("--extend-panel", action="store_true", help="allow channels new to the modality's panel")
    p.add_argument("--register-to-dapi", metavar="CODEX_TISSUE_ID",
                   help="(H&E) register to the DAPI channel of this tissue's CODEX image and store it in that pixel grid")
    p.add_argument("--dapi-modality", default="codex")
    p.add_argument("--dapi-channel", help="name of the DAPI channel (default: DAPI/Hoechst/DNA/H3 by name)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="copy the image tile by tile (--stream) or read it whole (--no-stream); default: by size")
    p.add_argument("--overwrite", action="store_true", help="replace this tissue's image, masks and rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the command prints the collected warnings itself, once, as `warning: ...` lines
    logging.getLogger("datamodules.ingest").addHandler(logging.NullHandler())
    logging.getLogger("datamodules.ingest").propagate = False

    def body() -> None:
        result = ingest(
            image=args.image, modality=args.modality, dataset=args.dataset, tissue_id=args.tissue_id, out=args.out,
            channels=args.channels, mask=args.mask, cell_mask=args.cell_mask, tissues_csv=args.tissues_csv,
            cells_csv=args.cells_csv, resolution=args.resolution, split=args.split, patient_id=args.patient_id,
            overwrite=args.overwrite, embeddings=args.embeddings, extend_panel=args.extend_panel,
            register_to_dapi=args.register_to_dapi, dapi_modality=args.dapi_modality, dapi_channel=args.dapi_channel,
            stream=args.stream,
        )
        for msg in result.warnings:
            print(f"warning: {msg}", file=sys.stderr)
        print(result.summary())

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
