"""Summarise a dataset folder and list every missing or inconsistent piece.

    python -m experiments.data_info DIR [--json]

Prints the tissues per split, cells, marker embeddings, each modality's channels (with UniProt id
and whether its ESM-2 embedding is present) and image shapes, then every problem
(:mod:`datamodules.store_validation`); exit code 1 when a required piece is missing or broken.
``--json`` prints the problems as JSON lines instead. A folder that is not there is a user error
(one line, exit 2), as in every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import pandas as pd
from rich.console import Console
from rich.table import Table

from datamodules import layout
from datamodules.command_line import run_command
from datamodules.store import DatasetStore, StoreError


def info(root: str) -> int:
    """Print a human summary of a dataset folder; return 1 when something required is missing."""
    console = Console(highlight=False)
    store = DatasetStore(root)  # a missing folder is a user error: one line on stderr, exit 2
    console.print(f"[bold]dataset[/bold] {store.name}  ({store.url})")
    problems = store.validate()
    try:
        tissues = store.tissues()
        split = tissues["split"].value_counts().to_dict() if "split" in tissues.columns else {"(no split column)": len(tissues)}
        console.print(f"tissues: {len(tissues)}  per split: {split}")
    except StoreError:
        tissues = None
    cells = store.cells()
    if cells is not None:
        per = cells.groupby("tissue_id").size() if "tissue_id" in cells.columns else pd.Series(dtype=int)
        console.print(f"cells: {len(cells)}" + (f"  ({per.min()}–{per.max()} per tissue over {len(per)} tissues)" if len(per) > 1 else ""))
    embeddings = set(store.embedding_ids())
    console.print(f"marker embeddings: {len(embeddings)}")
    for modality in store.modalities():
        try:
            channels = store.channels(modality)
        except StoreError:
            continue
        table = Table(title=f"{modality}: {len(channels)} channels", show_lines=False)
        for col in ("#", "channel", "UniProt", "embedding"):
            table.add_column(col)
        for i, row in enumerate(channels.itertuples(index=False)):
            uid = getattr(row, "uniprot_id", None)
            uid = uid if isinstance(uid, str) and uid else None
            table.add_row(str(i), str(row.channel_name), uid or "—", "yes" if uid in embeddings else ("—" if uid is None else "[yellow]missing[/yellow]"))
        console.print(table)
        for mpp in store.resolutions(modality):
            for tid in store.image_ids(modality, mpp):
                try:
                    img = store.image(modality, tid, mpp)
                    console.print(f"  image {modality}/{layout.resolution_folder(mpp)}/{tid}: shape {img.shape} {img.dtype}")
                except StoreError as exc:
                    console.print(f"  image {tid}: [red]{exc}[/red]")
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    for p in warnings:
        console.print(f"[yellow]warning[/yellow] {p.path}: {p.message}")
    for p in errors:
        console.print(f"[red]error[/red] {p.path}: {p.message}")
    console.print(f"{len(errors)} error(s), {len(warnings)} warning(s)")
    return 1 if errors else 0


def json_info(root: str) -> int:
    problems = DatasetStore(root).validate()
    for p in problems:
        print(json.dumps(dataclasses.asdict(p)))
    return 1 if any(p.severity == "error" for p in problems) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.data_info", description=__doc__.split("\n")[0])
    p.add_argument("root", help="dataset folder (local path or fsspec URL)")
    p.add_argument("--json", action="store_true", help="print problems as JSON lines instead")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: (json_info if args.json else info)(args.root))


if __name__ == "__main__":
    sys.exit(main())
