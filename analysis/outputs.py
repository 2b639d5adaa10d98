"""Atomic, owned output folders for evaluation and analysis results.

Two failures this prevents. A report whose CSVs are half written reads as a finished result; so
every command writes into a hidden temporary folder beside its target and renames it into place
only when complete. And ``--overwrite`` must never delete something the command did not make (a
dataset, another command's results, a user's folder given by a typo): every output folder carries
``.virtuplex-output.json`` naming the command that made it, and a command replaces only an empty
folder or one of its own.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

OUTPUT_MARKER = ".virtuplex-output.json"
#: Suffixes that say "a file", never an output folder.
FILE_SUFFIXES = re.compile(
    r"\.(ome\.tiff?|tiff?|png|jpe?g|csv|tsv|h5ad|parquet|json|npz|npy|ckpt|pt|pth|safetensors|svs|ndpi|zip|txt|md)$",
    re.IGNORECASE)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths; non-finite floats become null."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class OutputPathError(ValueError):
    """An output path that would overwrite, or mix with, something the command does not own."""


def looks_like_dataset(root: str | Path) -> bool:
    """A dataset of the harmonized layout (made by this project or by another tool)."""
    root = Path(root)
    if not root.is_dir():
        return False
    if (root / "metadata" / "dataset.json").is_file() or (root / "metadata" / "tissues.parquet").is_file():
        return True
    return any((child / "channels.parquet").is_file() for child in root.iterdir() if child.is_dir())


def output_owner(out: str | Path) -> str | None:
    """The command recorded in ``out``'s marker, or None."""
    path = Path(out) / OUTPUT_MARKER
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return str(data.get("command")) if isinstance(data, dict) and data.get("command") else None


def refuse_file_path(out: str | Path, flag: str = "--out", hint: str = "give a folder name") -> None:
    """``out`` must be a folder: not an existing file, nor a new name with a file extension."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{flag} {out} is an existing file; {hint}")
    if not out.exists() and FILE_SUFFIXES.search(out.name):
        raise OutputPathError(f"{flag} {out} looks like a file name, but {flag} is a folder; {hint}")


def check_output_folder(out: str | Path, command: str, overwrite: bool, flag: str = "--out") -> None:
    """Refuse unless ``out`` is absent, empty, or (with ``overwrite``) an earlier output of ``command``."""
    out = Path(out)
    refuse_file_path(out, flag)
    if not out.exists() or not any(out.iterdir()):
        return
    owner = output_owner(out)
    if owner == command:
        if overwrite:
            return
        raise OutputPathError(f"{flag} {out} already exists; pass --overwrite to replace it")
    if looks_like_dataset(out):
        raise OutputPathError(f"{flag} {out} is a dataset, not an output of {command}; it is never replaced: "
                              "choose another folder")
    what = f"an output of {owner}" if owner else "a non-empty folder that no virtuplex command made"
    raise OutputPathError(f"{flag} {out} is {what}; {command} replaces only its own outputs (even with --overwrite): "
                          "choose another folder")


def write_output_marker(folder: str | Path, command: str, extra: dict[str, Any] | None = None) -> None:
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"command": command, **(extra or {})}) + "\n")


def claim_output_folder(out: str | Path, command: str, flag: str = "--out") -> Path:
    """A resumable output folder (written piece by piece): absent, empty, or ``command``'s own.

    Creates it and records the owner, so a later run resumes in it and no other command writes there.
    """
    out = Path(out)
    refuse_file_path(out, flag)
    if out.exists() and any(out.iterdir()) and output_owner(out) != command:
        check_output_folder(out, command, overwrite=True, flag=flag)  # raises, naming what the folder is
    out.mkdir(parents=True, exist_ok=True)
    if output_owner(out) != command:
        write_output_marker(out, command)
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, command: str = "virtuplex") -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; renamed to ``out_dir`` when the block succeeds.

    ``command`` names the owner recorded in the folder; an existing ``out_dir`` is replaced only
    when ``overwrite`` is set and it is empty or an earlier output of the same command.
    """
    out = Path(out_dir)
    check_output_folder(out, command, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        write_output_marker(tmp, command)
        check_output_folder(out, command, overwrite)  # something may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{tag}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
