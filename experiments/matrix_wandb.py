"""W&B runs of the matrix: one offline run per cell, lined up for comparison, and a reader for them.

Every cell of a paper's matrix logs into the same W&B project and group (``<paper>-matrix``), with
the cell name as job type and run name, the resolved arguments as config, and its metrics in the
summary under the same keys across cells (``eval/pearson_r``, ``probe/macro_f1``, ...), so the W&B
runs table shows the matrix as rows. Tables and figures the cell lists are logged as W&B Tables
and Images. Runs are offline (``wandb sync <dir>`` uploads them later; nothing leaves the machine).

:func:`read_offline_run` reads a run back from its ``.wandb`` file without W&B's servers: the file is
W&B's record log (a 7-byte ``:W&B`` header, then LevelDB-log framing in 32 KiB blocks, each record
a protobuf ``Record``). The test suite uses it to check what the matrix logged.
"""

from __future__ import annotations

import glob
import json
import logging
import struct
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.outputs import json_default
from experiments.matrix_cells import Cell

log = logging.getLogger(__name__)
PROJECT = "virtuplex-matrix"
_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_dir(out_root: Path, paper: str) -> Path:
    return out_root / paper / "wandb"


def cell_logger(out_root: Path, group: str, enabled: bool = True):  # type: ignore[no-untyped-def]
    """A ``logger(cell, work, record)`` for :func:`experiments.matrix_run.run_cell` (None when disabled)."""
    if not enabled:
        return None

    def log_cell(cell: Cell, work: Path, record: dict) -> None:
        try:
            import wandb  # lazy: the matrix runs without W&B installed or working
        except ImportError as exc:
            log.warning("W&B logging skipped: %s", exc)
            return
        folder = wandb_dir(out_root, cell.paper)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"cell": cell.name, "paper": cell.paper, "reproduces": cell.reproduces, "table": cell.table,
                  "scale": record["scale"], "module": cell.module, "args": record["args"], "source": cell.source}
        run = wandb.init(project=PROJECT, group=group, job_type=cell.name, name=cell.name, dir=str(folder),
                         mode="offline", config=json.loads(json.dumps(config, default=json_default)), reinit=True)
        try:
            run.summary.update({k: v for k, v in record["metrics"].items()})
            run.summary["seconds"] = record["seconds"]
            for pattern in cell.tables:
                for path in sorted(work.glob(pattern)):
                    run.log({f"tables/{path.stem}": wandb.Table(dataframe=pd.read_csv(path))})
            for pattern in cell.figures:
                for path in sorted(work.glob(pattern)):
                    run.log({f"figures/{path.stem}": wandb.Image(str(path))})
        finally:
            run.finish()

    return log_cell


def _records(data: bytes) -> list[bytes]:
    """Payloads of a W&B record log (LevelDB log framing after the 7-byte header)."""
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B run file (bad header)")
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        payload = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            out.append(pending + payload)
            pending = b""
        elif kind == 0 and length == 0:
            pos += left_in_block - _HEADER  # zero padding to the end of the block
    return out


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"group", "job_type", "name", "config", "summary"}`` of one offline run folder."""
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: only readers of W&B files need it

    files = glob.glob(str(Path(run_dir) / "run-*.wandb"))
    if not files:
        raise ValueError(f"{run_dir}: no run-*.wandb file")
    info: dict[str, Any] = {"config": {}, "summary": {}}
    for payload in _records(Path(files[0]).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(group=record.run.run_group, job_type=record.run.job_type, name=record.run.display_name)
            info["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                info["summary"][key] = json.loads(item.value_json)
    return info


def offline_runs(out_root: Path, paper: str) -> list[dict[str, Any]]:
    """Every offline run of a paper's matrix (latest last)."""
    return [read_offline_run(p) for p in sorted(glob.glob(str(wandb_dir(out_root, paper) / "wandb" / "offline-run-*")))]
