"""Register an H&E image onto the DAPI channel of its co-stained CODEX image (ROSIE Methods), as a file.

    python -m experiments.data_register --he HE.tif --dapi CODEX.ome.tif [--dapi-channel DAPI] \
        --out HE_registered.ome.tif [--max-side 2048] [--overwrite]

Writes the H&E warped into the DAPI pixel grid (white outside the H&E) and prints the transform
and its quality as JSON. Inside a dataset, ``python -m experiments.data_ingest --register-to-dapi`` does the same
on the way in. The method is :mod:`datamodules.registration`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from analysis.outputs import FILE_SUFFIXES
from datamodules.command_line import run_command
from datamodules.ingest_files import normalise_he, read_any
from datamodules.registration import find_dapi_channel, register_he_to_dapi, warp_to


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.data_register", description=__doc__.split("\n")[0])
    p.add_argument("--he", required=True, help="H&E image (RGB TIFF/PNG)")
    p.add_argument("--dapi", required=True, help="CODEX OME-TIFF (or a single-channel DAPI TIFF)")
    p.add_argument("--dapi-channel", help="channel name in the CODEX OME-TIFF (default: found by name)")
    p.add_argument("--out", required=True, help="registered H&E as (OME-)TIFF in the DAPI pixel grid")
    p.add_argument("--max-side", type=int, default=2048, help="register at this size (px) and scale back")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def register(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name such as HE_registered.ome.tif")
    if out.suffix.lower() not in (".tif", ".tiff") or not FILE_SUFFIXES.search(out.name):
        raise ValueError(f"--out {out}: the registered H&E is written as TIFF; give a name ending in .tif or .ome.tif")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")
    if not 64 <= args.max_side <= 65536:
        raise ValueError(f"--max-side {args.max_side}: must be between 64 and 65536 px")
    he = normalise_he(read_any(Path(args.he)))
    codex = read_any(Path(args.dapi))
    arr = np.squeeze(codex.array)
    if arr.ndim == 2:
        dapi = arr
    else:
        names = codex.channel_names or [str(i) for i in range(arr.shape[0])]
        dapi = arr[find_dapi_channel(names, args.dapi_channel)]
    reg = register_he_to_dapi(np.moveaxis(he, 0, -1), dapi, max_side=args.max_side)
    warped = warp_to(he, reg.transform, dapi.shape, fill=255)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tifffile.imwrite(tmp, np.moveaxis(warped, 0, -1), photometric="rgb", ome=out.name.endswith((".ome.tif", ".ome.tiff")))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(json.dumps(reg.to_dict()))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: register(args))


if __name__ == "__main__":
    sys.exit(main())
