"""Reading tables that other tools wrote: CSV dialects, encodings and boolean spellings.

Why: a lab's channel or clinical table comes from Excel, R, QuPath or a LIMS. German Excel writes
``;`` separators, Excel's "Unicode text" is UTF-16 with tabs, R writes ``TRUE``/``FALSE``, and a
UTF-8 BOM glues itself to the first column name, so ``channel_name`` is "missing" although it is
right there. These are read as the user meant them; what cannot be read is refused with the file
named, never half-parsed.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SEPARATORS = ",;\t|"
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "1.0"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "0.0", ""})


class TableError(ValueError):
    """A table that cannot be read as the user meant it."""


def _decode(path: Path, raw: bytes) -> str:
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            return raw.decode(encoding)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s: not UTF-8; read as Windows-1252 (Latin-1) text", path)
        return raw.decode("cp1252", errors="replace")


def _separator(text: str) -> str:
    sample = "\n".join(text.splitlines()[:50])
    try:
        return csv.Sniffer().sniff(sample, delimiters=SEPARATORS).delimiter
    except csv.Error:
        return ","


def read_user_table(path: str | Path, dtype: dict | None = None, what: str = "table") -> pd.DataFrame:
    """A CSV/TSV (any of ``, ; tab |``; UTF-8, UTF-8 with BOM, UTF-16 or Windows-1252) or parquet table."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {what} file")
    if path.is_dir():
        raise TableError(f"{path}: is a folder, not a {what} file")
    if path.suffix.lower() == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types
            raise TableError(f"{path}: not a readable parquet {what} ({exc})") from None
    raw = path.read_bytes()
    if not raw.strip():
        raise TableError(f"{path}: the {what} file is empty; it needs a header row and one row per entry")
    text = _decode(path, raw)
    sep = _separator(text)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=dtype, skipinitialspace=True)
    except (pd.errors.ParserError, ValueError) as exc:
        raise TableError(f"{path}: not a readable CSV {what} ({str(exc).splitlines()[0]}); save it as a comma- or "
                         "tab-separated text file with one header row") from None
    df.columns = [str(c).strip().strip("\ufeff") for c in df.columns]
    return df


def parse_bool(value: object) -> bool | None:
    """True/False for the spellings of Python, R, Excel and 0/1; None for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS or word == "nan":
        return False
    return None
