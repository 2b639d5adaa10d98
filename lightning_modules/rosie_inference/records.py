"""Per-tissue completion records of a prediction folder, and their merge into the dataset tables.

A tissue's record ``qc/tissues/<tissue_id>.json`` is the last file its prediction writes, so a
tissue with a record has all its outputs: a rerun skips it (:func:`is_complete`), a crash before
it leaves the tissue to be redone. Records are per tissue so that ranks of a distributed run never
write the same file; one writer folds them into ``qc.json``, ``qc.csv`` and the tissues table
(:func:`merge_records`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import pandas as pd

from analysis.outputs import json_default
from datamodules.provenance import PREDICTION
from datamodules.store import DatasetWriter
from lightning_modules.rosie_inference.geometry import check_stride
from lightning_modules.rosie_inference.options import PredictOptions
from lightning_modules.rosie_inference.outputs import fsspec_root

#: Per-tissue completion records: written last, so a tissue with a record has all its outputs.
RECORDS_DIR = "qc/tissues"


def record_path(tissue_id: str) -> str:
    """Where ``tissue_id``'s record lives, relative to the prediction folder."""
    return f"{RECORDS_DIR}/{tissue_id}.json"


def write_record(writer: DatasetWriter, tissue_id: str, entry: dict, per_marker: pd.DataFrame, tissue_row: dict) -> None:
    """The tissue's completion record (QC entry, per-marker QC rows, tissues-table row), written atomically."""
    record = {"entry": entry, "per_marker": per_marker.to_dict(orient="list"), "tissue_row": tissue_row}
    writer.write_bytes(record_path(tissue_id), json.dumps(record, indent=1, default=json_default).encode())


def read_record(out: str | os.PathLike, tissue_id: str) -> dict | None:
    """The completion record of ``tissue_id`` in prediction folder ``out``, or None if it has none."""
    fs, root = fsspec_root(out)
    path = f"{root}/{record_path(tissue_id)}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def is_complete(out: str | os.PathLike, tissue_id: str, options: PredictOptions) -> bool:
    """Whether ``tissue_id`` was predicted to the end into ``out`` with the same stride, blending, stitching and mode.

    A tissue is complete when its record exists (written after every other output) and the image
    it names exists; a crash before the record leaves the tissue incomplete, and a rerun redoes it.
    """
    record = read_record(out, tissue_id)
    if record is None:
        return False
    entry = record.get("entry", {})
    if entry.get("stride") != check_stride(options.stride) or bool(entry.get("blend")) != bool(options.blend):
        return False
    if entry.get("stitching", "grid") != options.stitching or entry.get("mode", "exact") != options.mode:
        return False
    fs, root = fsspec_root(out)
    return fs.exists(f"{root}/{entry.get('image')}")


def merge_records(out: str | os.PathLike, tissue_ids: Sequence[str] | None = None) -> int:
    """Fold completion records into the dataset-level ``qc.json``, ``qc.csv`` and tissues table.

    One writer at a time: the single-process loop calls it after each tissue, a distributed run
    calls it once on rank 0 after every rank has finished (ranks only write per-tissue files, so
    no two processes ever write the same file). ``tissue_ids=None`` folds every record. Returns
    the number of records folded.
    """
    writer = DatasetWriter.open(out, kind=PREDICTION, written_by="rosie_predict")
    with writer.locked():
        return _merge_records(writer, out, tissue_ids)


def _merge_records(writer: DatasetWriter, out: str | os.PathLike, tissue_ids: Sequence[str] | None) -> int:
    fs = writer.fs
    if tissue_ids is None:
        folder = writer.target(RECORDS_DIR)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)] if fs.exists(folder) else []
        tissue_ids = sorted(n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith("."))
    records = {tid: read_record(out, tid) for tid in tissue_ids}
    records = {tid: r for tid, r in records.items() if r is not None}
    if not records:
        return 0
    path_json, path_csv = writer.target("qc.json"), writer.target("qc.csv")
    qc = {"tissues": {}}
    if fs.exists(path_json):
        with fs.open(path_json, "r") as f:
            qc = json.load(f)
    table = None
    if fs.exists(path_csv):
        with fs.open(path_csv, "rb") as f:
            table = pd.read_csv(io.BytesIO(f.read()))
        table = table[~table["tissue_id"].astype(str).isin(list(records))]
    for tid, record in records.items():
        qc.setdefault("tissues", {})[tid] = record["entry"]
    per_marker = pd.concat([pd.DataFrame(r["per_marker"]) for r in records.values()], ignore_index=True)
    table = per_marker if table is None else pd.concat([table, per_marker], ignore_index=True)
    writer.append_tissues(pd.DataFrame([r["tissue_row"] for r in records.values()]), replace=True)
    writer.write_bytes("qc.json", json.dumps(qc, indent=1, default=json_default).encode())
    writer.write_bytes("qc.csv", table.to_csv(index=False).encode())
    return len(records)
