"""What kind of dataset a folder is, so that no command mixes predicted data into measured data.

Why: a prediction written into a measured dataset blanks its clinical fields, drops columns of its
channel table and puts predicted images beside measured ones, where training would read them as
truth. Every dataset this project writes records its kind in ``metadata/dataset.json``:
``measured`` (ingested and synthetic data) or ``prediction`` (``rosie_predict`` output). A command
that writes into a dataset calls :func:`check_dataset_target` first.

Datasets from other tools carry no manifest: a folder with ``metadata/tissues.parquet`` or a
modality's ``channels.parquet`` is taken as measured, unless it holds ``qc/tissues`` completion
records (a prediction written before manifests existed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from analysis.outputs import OutputPathError, looks_like_dataset, refuse_file_path

MANIFEST = "metadata/dataset.json"
MEASURED, PREDICTION = "measured", "prediction"


def manifest(kind: str, written_by: str) -> dict[str, Any]:
    if kind not in (MEASURED, PREDICTION):
        raise ValueError(f"dataset kind must be {MEASURED!r} or {PREDICTION!r}, got {kind!r}")
    return {"format": "virtuplex-dataset", "version": 1, "kind": kind, "written_by": written_by}


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dataset_kind(root: str | os.PathLike) -> str | None:
    """``measured``, ``prediction``, or None when ``root`` is not a dataset."""
    root = Path(root)
    if not looks_like_dataset(root):
        return None
    data = read_manifest(root)
    if data is not None and data.get("kind") in (MEASURED, PREDICTION):
        return str(data["kind"])
    return PREDICTION if (root / "qc" / "tissues").is_dir() else MEASURED


def check_dataset_target(out: str | os.PathLike, kind: str, command: str, flag: str = "--out",
                         file_hint: str = "give a folder") -> None:
    """Refuse to write ``kind`` data into ``out`` unless it is absent, empty, or a dataset of that kind."""
    out = Path(out)
    refuse_file_path(out, flag, file_hint)
    if not out.exists() or not any(out.iterdir()):
        return
    found = dataset_kind(out)
    if found == kind:
        return
    if found is None:
        raise OutputPathError(f"{flag} {out} is a non-empty folder that is not a dataset; {command} writes a {kind} "
                              "dataset: choose a new or empty folder")
    raise OutputPathError(f"{flag} {out} is a {found} dataset; {command} writes {kind} data and never mixes it into "
                          f"a {found} one (that would change its tables and images): choose a new or empty folder")
