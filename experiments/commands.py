"""What the downstream analysis commands share: the error contract, the output-folder check and the
cell-token reader.

Bad input ends a command with one line naming the problem and exit code 2, never a traceback
from deep inside a library (:func:`datamodules.command_line.run_command`); an output folder that
exists is refused before the expensive part starts (the atomic writer would refuse it too, but
only at the end), and only a command's own earlier output is ever replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from analysis.outputs import check_output_folder
from datamodules.command_line import run_command
from datamodules.store import DatasetStore, StoreError

__all__ = ["run_command", "refuse_existing_output", "load_cell_tokens", "open_modality"]


def refuse_existing_output(out: str | Path, overwrite: bool, command: str) -> None:
    """Before the expensive part: ``out`` must be absent, empty, or (``overwrite``) ``command``'s own."""
    check_output_folder(out, command, overwrite)


def load_cell_tokens(tokens_dir: str | Path, required_columns: Sequence[str] = ()):  # type: ignore[no-untyped-def]
    """All ``cells/*.h5ad`` of an ``experiments.virtues_tokens`` folder as one AnnData."""
    import anndata as ad

    files = sorted((Path(tokens_dir) / "cells").glob("*.h5ad"))
    if not files:
        raise FileNotFoundError(f"{tokens_dir}/cells holds no .h5ad: run experiments.virtues_tokens first")
    cells = ad.concat([ad.read_h5ad(f) for f in files], merge="first")
    missing = [c for c in required_columns if c not in cells.obs]
    if missing:
        raise ValueError(f"{tokens_dir}: cells have no column(s) {missing} (columns: {list(cells.obs.columns)}); "
                         "pass another --label")
    return cells


def open_modality(data: str | Path, modality: str, mpp: float | None = None):  # type: ignore[no-untyped-def]
    """The dataset store and the resolution to read ``modality`` at (default: its first one)."""
    store = DatasetStore(data)
    if modality not in store.modalities():
        raise StoreError(f"{store.url}: no modality {modality!r} (has {store.modalities()}); pass --modality")
    return store, (mpp if mpp is not None else store.resolutions(modality)[0])
