"""Reading a lab's image, mask and table files for ingest, refusing what cannot be used.

Every check here runs before anything is written (see :mod:`datamodules.ingest`): wrong dimension
order, channel counts that disagree with the table, non-RGB or 16-bit H&E, NaN/inf pixels,
duplicate or empty channel names, masks of another shape. Each refusal is an :class:`IngestError`
naming the file, the field, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile

from datamodules import layout
from datamodules.image_files import (
    RECOPY,
    DamagedImageError,
    ImageMetadataError,
    ome_channel_names,
    ome_mpp,
    open_tiff,
    raster_properties,
    read_mask_file,
    read_raster,
)
from datamodules.limits import ImageTooLargeError, check_in_memory
from datamodules.store import StoreError, instance_ids
from datamodules.user_tables import TableError, parse_bool, read_user_table

HE = "he"
SPLITS = layout.SPLITS
TIFF_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
MODALITY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Names of DNA / histone channels, used to mark nuclear markers when the table does not say.
NUCLEAR_PATTERN = re.compile(r"^(dapi|hoechst.*|dna\d*|dsdna|h3|hh3|histone.*|nuc|nuclear|ir\d*19[13]\w*|iridium.*|draq\d)$",
                             re.IGNORECASE)


class IngestError(ValueError):
    """Bad input: names the file, the field, the problem and how to fix it."""

    def __init__(self, file: str | Path, field: str, problem: str, fix: str):
        self.file, self.field, self.problem, self.fix = str(file), field, problem, fix
        super().__init__(f"{self.file}: {field}: {problem}; fix: {fix}")


@dataclasses.dataclass
class LoadedImage:
    array: np.ndarray  # (C,Y,X) after axis normalisation
    channel_names: list[str] | None
    mpp: float | None
    source: str
    axes: str = ""


# ============================================================================================
# Reading images
# ============================================================================================
#: What to do about an image too large to ingest in one piece.
TOO_LARGE_FIX = ("ingest reads an image whole; crop or tile it first (or raise VIRTUPLEX_MAX_IMAGE_GB on a machine "
                 "with that much memory). To predict multiplex from a huge H&E, give the TIFF to rosie_predict, which streams it")


def check_size(path: str | Path, shape: Sequence[int], dtype: Any, what: str = "image") -> None:
    """Refuse, from the header alone, an image that would not fit in memory (see datamodules.limits)."""
    try:
        check_in_memory(shape, dtype, str(path))
    except ImageTooLargeError as exc:
        raise IngestError(path, "size", f"{what} {exc.describe()}", TOO_LARGE_FIX) from None


def read_tiff(path: Path) -> LoadedImage:
    """Full-resolution level of the first series, its axes, OME/ImageJ channel names and pixel size."""
    with open_tiff(path, check_size=lambda shape, dtype: check_size(path, shape, dtype)) as tif:
        series = tif.series[0]
        level = series.levels[0] if getattr(series, "levels", None) else series
        axes = level.axes
        try:
            array = level.asarray()
        except (tifffile.TiffFileError, OSError, ValueError, RuntimeError) as exc:  # codec errors of damaged strips
            raise DamagedImageError(f"{path}: the TIFF's pixel data cannot be decoded ({exc}); {RECOPY}") from None
        names = ome_channel_names(tif.ome_metadata) if tif.is_ome else None
        if names is None and tif.is_imagej:
            labels = (tif.imagej_metadata or {}).get("Labels")
            names = [str(n) for n in labels] if isinstance(labels, list) else None
        mpp = ome_mpp(tif.ome_metadata) if tif.is_ome else None
    if names is not None and axes and "C" in axes and array.shape[axes.index("C")] != len(names):
        raise ImageMetadataError(f"{path}: its OME-XML names {len(names)} channels but the file stores "
                                 f"{array.shape[axes.index('C')]} planes; re-export it so the header matches the pixels")
    return LoadedImage(array, names, mpp, str(path), axes)


def read_folder(path: Path) -> LoadedImage:
    """A folder of single-channel TIFFs, one per marker; file stem = marker name (sorted by name)."""
    files = sorted((f for f in path.iterdir() if f.suffix.lower() in TIFF_SUFFIXES and not f.name.startswith(".")),
                   key=lambda f: f.name.lower())
    if not files:
        raise IngestError(path, "folder", "holds no .tif/.tiff file", "put one single-channel TIFF per marker in the folder")
    names = [re.sub(r"\.ome$", "", f.stem) for f in files]
    with open_tiff(files[0]) as first:  # the stack of all planes must fit, not just one
        check_size(path, (len(files),) + tuple(first.series[0].shape), first.series[0].dtype, f"stack of {len(files)} planes")
    planes, shape, dtype = [], None, None
    for f in files:
        plane = np.squeeze(read_tiff(f).array)
        if plane.ndim != 2:
            raise IngestError(f, "shape", f"expected one 2-D plane per marker file, got shape {plane.shape}",
                              "save each marker as its own single-channel TIFF")
        if shape is not None and plane.shape != shape:
            raise IngestError(f, "shape", f"{plane.shape} differs from {shape} of {files[0].name}",
                              "all marker files of one tissue must have the same size")
        if dtype is not None and plane.dtype != dtype:
            raise IngestError(f, "dtype", f"{plane.dtype} differs from {dtype} of {files[0].name}",
                              "save all marker files with one pixel type")
        shape, dtype = plane.shape, plane.dtype
        planes.append(plane)
    return LoadedImage(np.stack(planes), names, None, str(path), "CYX")


def read_any(path: Path) -> LoadedImage:
    if not path.exists():
        raise IngestError(path, "path", "does not exist", "check the --image path")
    if path.is_dir():
        return read_folder(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return read_tiff(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        shape, dtype = raster_properties(path)
        check_size(path, shape, dtype)
        return LoadedImage(read_raster(path), None, None, str(path), "YXS")
    raise IngestError(path, "file type", f"unsupported extension {path.suffix!r}",
                      "convert to OME-TIFF (multiplex) or TIFF/PNG (H&E), or pass a folder of single-channel TIFFs")


def _squeeze_to_3d(img: LoadedImage) -> tuple[np.ndarray, str]:
    """Drop singleton non-spatial axes (T=1, Z=1, ...); keep at most one non-spatial axis."""
    arr, axes = img.array, img.axes if len(img.axes) == img.array.ndim else ""
    if arr.ndim > 3:
        keep = [i for i, n in enumerate(arr.shape) if n > 1 or i >= arr.ndim - 2]
        axes = "".join(axes[i] for i in keep) if axes else ""
        arr = arr.reshape([arr.shape[i] for i in keep])
    if arr.ndim > 3:
        raise IngestError(img.source, "dimensions", f"{arr.ndim}-D image (axes {axes or '?'}, shape {arr.shape})",
                          "save one 2-D plane per channel as (C,Y,X): project or select Z/T first")
    return arr, axes


def normalise_he(img: LoadedImage) -> np.ndarray:
    """(3,Y,X) uint8 from an RGB image given as YXS/YXC or CYX."""
    arr, _ = _squeeze_to_3d(img)
    if arr.ndim != 3:
        raise IngestError(img.source, "channels", f"H&E must be RGB (3 channels), got a single-channel image {arr.shape}",
                          "export the H&E as an RGB TIFF/PNG")
    if arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
        channels_last = True
    elif arr.shape[0] in (3, 4):
        channels_last = False
    else:
        raise IngestError(img.source, "channels", f"H&E must have 3 colour channels, got shape {arr.shape}",
                          "export the H&E as an 8-bit RGB image")
    n = arr.shape[-1] if channels_last else arr.shape[0]
    if n == 4:
        raise IngestError(img.source, "channels", "H&E has 4 channels (RGBA)",
                          "drop the alpha channel, e.g. rgb = rgba[..., :3], and save as 8-bit RGB")
    if arr.dtype != np.uint8:
        bits = f"{arr.dtype.itemsize * 8}-bit {arr.dtype}"
        raise IngestError(img.source, "dtype", f"H&E must be 8-bit RGB, got {bits}",
                          "convert to uint8 RGB (e.g. rescale a 16-bit scan to 0-255) before ingesting")
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0) if channels_last else arr)


def normalise_multiplex(img: LoadedImage, n_expected: int, names_from: str) -> np.ndarray:
    """(C,Y,X) from a multiplex image; refuses channels-last and count mismatches with a clear error."""
    arr, axes = _squeeze_to_3d(img)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] == n_expected:
        pass
    elif arr.shape[-1] == n_expected and arr.shape[0] != n_expected:
        raise IngestError(img.source, "dimension order",
                          f"shape {arr.shape} looks channels-last (Y,X,C) with {n_expected} channels from the {names_from}",
                          "save the image channels-first as (C,Y,X), e.g. np.moveaxis(image, -1, 0)")
    else:
        raise IngestError(img.source, "channels", f"image has {arr.shape[0]} channels (shape {arr.shape}) but the "
                          f"{names_from} lists {n_expected}",
                          "make the channel table list exactly one row per image channel, in image order")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise IngestError(img.source, "dtype", f"unsupported pixel type {arr.dtype}", "save integer or float pixels")
    return np.ascontiguousarray(arr)


def check_finite(arr: np.ndarray, source: str) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            chans = sorted(set(np.nonzero(bad)[0].tolist()))[:10] if arr.ndim == 3 else []
            raise IngestError(source, "pixels", f"{int(bad.sum())} NaN/inf pixels (channels {chans})",
                              "replace them, e.g. np.nan_to_num(image, nan=0, posinf=0, neginf=0), and re-export")


# ============================================================================================
# Channel tables
# ============================================================================================


def read_channel_table(path: Path) -> pd.DataFrame:
    """``channel_name``, ``uniprot_id`` (+ optional flags), from a CSV in any common dialect."""
    try:
        df = read_user_table(path, dtype={"channel_name": str, "uniprot_id": str}, what="channel table")
    except TableError as exc:
        raise IngestError(path, "file", str(exc).split(": ", 1)[-1], "pass a CSV with columns channel_name,uniprot_id") from None
    if "channel_name" not in df.columns:
        raise IngestError(path, "channel_name", f"column missing (columns: {list(df.columns)})",
                          "add a header row with channel_name,uniprot_id")
    df["channel_name"] = df["channel_name"].fillna("").astype(str).str.strip()
    _check_names(list(df["channel_name"]), path, "channel_name")
    if "uniprot_id" not in df.columns:
        df["uniprot_id"] = None
    df["uniprot_id"] = [u.strip() if isinstance(u, str) and u.strip() else None for u in df["uniprot_id"]]
    return df


def _check_names(names: Sequence[str], source: str | Path, field: str) -> None:
    empty = [i for i, n in enumerate(names) if not str(n).strip()]
    if empty:
        raise IngestError(source, field, f"empty channel name at position(s) {empty}", "give every channel a name")
    seen: set[str] = set()
    dup = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    if dup:
        raise IngestError(source, field, f"duplicate channel names {sorted(set(dup))}", "make channel names unique")


def _bool_column(df: pd.DataFrame, col: str, source: Path) -> list[bool] | None:
    """A true/false column in any spelling (True, TRUE, yes, 1, ...); anything else is refused."""
    if col not in df.columns:
        return None
    out = []
    for i, v in enumerate(df[col]):
        flag = parse_bool(v)
        if flag is None:
            raise IngestError(source, col, f"value {v!r} in row {i + 2} is not a boolean", "use true/false (or yes/no, 1/0)")
        out.append(flag)
    return out


def build_channels(image_names: list[str], table: pd.DataFrame | None, table_path: Path | None,
                   warnings: list[str]) -> pd.DataFrame:
    """channels.parquet rows for the image's channels, looking UniProt ids up in `table` by name."""
    rows = {}
    if table is not None:
        nuclear = _bool_column(table, "is_nuclear_marker", table_path)  # type: ignore[arg-type]
        qc = _bool_column(table, "qc_pass", table_path)  # type: ignore[arg-type]
        for i, r in enumerate(table.itertuples(index=False)):
            rows[r.channel_name] = {"uniprot_id": r.uniprot_id,
                                    "is_nuclear_marker": None if nuclear is None else nuclear[i],
                                    "qc_pass": True if qc is None else qc[i]}
        lower = {k.lower(): k for k in rows}
        unmatched = [n for n in rows if n not in image_names and n.lower() not in {m.lower() for m in image_names}]
        if unmatched:
            warnings.append(f"{table_path}: channel table rows not in the image (ignored): {', '.join(unmatched)}")
    else:
        lower = {}
    records = []
    for name in image_names:
        info = rows.get(name) or rows.get(lower.get(name.lower(), ""), None) or {}
        uid = info.get("uniprot_id")
        if uid is not None and not layout.is_uniprot_id(uid):
            warnings.append(f"{table_path}: uniprot_id {uid!r} of {name} is not a UniProt accession (e.g. P08575); "
                            "the channel will be ignored by VirTues")
        nuclear_flag = info.get("is_nuclear_marker")
        records.append({
            "channel_name": name,
            "uniprot_id": uid,
            "is_nuclear_marker": bool(NUCLEAR_PATTERN.match(name)) if nuclear_flag is None else bool(nuclear_flag),
            "qc_pass": bool(info.get("qc_pass", True)),
        })
    df = pd.DataFrame.from_records(records, columns=["channel_name", "uniprot_id", "is_nuclear_marker", "qc_pass"])
    df["uniprot_id"] = df["uniprot_id"].astype("string")
    return df


def resolve_channel_names(loaded: LoadedImage, table: pd.DataFrame | None, table_path: Path | None) -> tuple[list[str], str]:
    """Image channel names and where they came from (OME-XML / file names / channel table)."""
    if loaded.channel_names is not None:
        _check_names(loaded.channel_names, loaded.source, "Channel Name")
        source = "folder's file names" if Path(loaded.source).is_dir() else "OME-XML Channel Names"
        return list(loaded.channel_names), source
    if table is None:
        raise IngestError(loaded.source, "channel names", "the image carries no channel names",
                          "pass --channels CSV with one row per image channel (columns channel_name,uniprot_id)")
    return list(table["channel_name"]), f"channel table {table_path}"


# ============================================================================================
# Masks and tables
# ============================================================================================


def read_mask(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise IngestError(path, "path", "does not exist", f"check the --{what} path")
    return read_mask_file(path, what)


def check_mask_shape(mask: np.ndarray, image_shape: tuple[int, int], path: Path | str) -> None:
    if tuple(mask.shape) != tuple(image_shape):
        raise IngestError(path, "shape", f"mask shape {tuple(mask.shape)} disagrees with the image's (Y,X) = {tuple(image_shape)}",
                          "export the mask at the image's resolution and crop")


def to_instance_mask(mask: np.ndarray, path: Path | str) -> np.ndarray:
    """uint16/uint32 instance ids; float masks must hold whole numbers; nothing wraps."""
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
            raise IngestError(path, "dtype", "cell mask holds non-integer values", "save integer instance ids (0 = background)")
        mask = mask.astype(np.int64)
    try:
        return instance_ids(mask, "cell mask")
    except StoreError as exc:
        raise IngestError(path, "cell ids", str(exc).removeprefix("cell mask ").split("; ")[0],
                          str(exc).split("; ", 1)[-1]) from None


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise IngestError(path, "path", "does not exist", "check the table path")
    try:
        return read_user_table(path)
    except TableError as exc:
        raise IngestError(path, "file", str(exc).split(": ", 1)[-1], "pass a CSV or parquet table") from None
