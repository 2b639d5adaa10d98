"""Turn a lab's own image files into the harmonized dataset layout, one tissue at a time.

    python -m datamodules.ingest --image FILE_OR_FOLDER --modality imc --dataset NAME \\
        --tissue-id ID --out DIR [--channels CSV] [--mask F] [--cell-mask F] [--tissues-csv F] \\
        [--cells-csv F] [--resolution MPP] [--split train|val|test] [--patient-id P] \\
        [--embeddings DIR] [--extend-panel] [--register-to-dapi CODEX_TISSUE_ID] [--overwrite]

Accepted images: OME-TIFF / TIFF (multi-channel fluorescence or IMC, RGB H&E; pyramidal files are
read at full resolution), a FOLDER of single-channel TIFFs (one per marker, file stem = marker name,
as MIBI exports), or PNG/JPEG for H&E. Channel names come from the OME-XML, the folder's file names
or, for a plain TIFF, the channel table CSV (columns `channel_name`, `uniprot_id`; optional
`is_nuclear_marker`, `qc_pass`).

Why everything is checked before anything is written: a dataset folder is shared by many runs, so a
bad file must fail with one line naming the file, the field and the fix, and must leave the dataset
as it was. A new dataset is assembled in a temporary folder and renamed into place; additions to an
existing one write each piece atomically (image first, tables last).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile

from datamodules import layout
from datamodules.image_files import (RECOPY, DamagedImageError, ImageMetadataError, open_tiff, raster_properties,
                                     read_mask_file, read_raster)
from lightning_modules.components.model_files import load_tensor_file

log = logging.getLogger(__name__)

HE = "he"
SPLITS = ("train", "val", "test")
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


@dataclasses.dataclass
class IngestResult:
    dataset: Path
    modality: str
    tissue_id: str
    mpp: float
    shape: tuple[int, ...]
    channel_names: list[str]
    warnings: list[str]
    created_dataset: bool
    registration: Any = None

    def summary(self) -> str:
        c, h, w = self.shape
        what = "created" if self.created_dataset else "updated"
        text = (f"{what} {self.dataset}: {self.modality} tissue {self.tissue_id!r} {c}×{h}×{w} at {self.mpp} µm/px "
                f"({len(self.warnings)} warning(s))")
        if self.registration is not None:
            r = self.registration
            text += f"; registered to DAPI: {r.n_inliers} inliers, median residual {r.residual_px:.2f} px"
        return text


# ============================================================================================
# Reading images
# ============================================================================================
#: What to do about an image too large to ingest in one piece.
TOO_LARGE_FIX = ("ingest reads an image whole; crop or tile it first (or raise VIRTUPLEX_MAX_IMAGE_GB on a machine "
                 "with that much memory). To predict multiplex from a huge H&E, give the TIFF to rosie_predict, which streams it")


def check_size(path: str | Path, shape: Sequence[int], dtype: Any, what: str = "image") -> None:
    """Refuse, from the header alone, an image that would not fit in memory (see datamodules.limits)."""
    from datamodules.limits import ImageTooLargeError, check_in_memory

    try:
        check_in_memory(shape, dtype, str(path))
    except ImageTooLargeError as exc:
        raise IngestError(path, "size", f"{what} {exc.describe()}", TOO_LARGE_FIX) from None



def _ome_pixels(ome_xml: str | None):  # type: ignore[no-untyped-def]
    """The `Pixels` element of the first OME Image, or None (no/invalid OME-XML)."""
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    return next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)


def _ome_channel_names(ome_xml: str | None) -> list[str] | None:
    """Channel Name attributes of the first OME Image, or None when any is absent."""
    pixels = _ome_pixels(ome_xml)
    if pixels is None:
        return None
    channels = [el for el in pixels if el.tag.endswith("}Channel") or el.tag == "Channel"]
    names = [el.get("Name") for el in channels]
    if not names or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def _ome_mpp(ome_xml: str | None) -> float | None:
    pixels = _ome_pixels(ome_xml)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    size = float(pixels.get("PhysicalSizeX"))
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    factor = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
    return None if factor is None or size <= 0 else size * factor


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
        names = _ome_channel_names(tif.ome_metadata) if tif.is_ome else None
        if names is None and tif.is_imagej:
            labels = (tif.imagej_metadata or {}).get("Labels")
            names = [str(n) for n in labels] if isinstance(labels, list) else None
        mpp = _ome_mpp(tif.ome_metadata) if tif.is_ome else None
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
    try:
        df = pd.read_csv(path, dtype={"channel_name": str, "uniprot_id": str})
    except Exception as exc:  # pandas raises many types
        raise IngestError(path, "file", f"cannot be read as CSV ({exc})", "pass a CSV with columns channel_name,uniprot_id") from exc
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
    if col not in df.columns:
        return None
    out = []
    for v in df[col]:
        if isinstance(v, (bool, np.bool_)):
            out.append(bool(v))
        elif str(v).strip().lower() in ("true", "1", "yes", "y", "t"):
            out.append(True)
        elif str(v).strip().lower() in ("false", "0", "no", "n", "f", "", "nan"):
            out.append(False)
        else:
            raise IngestError(source, col, f"value {v!r} is not a boolean", "use true/false")
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
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
            raise IngestError(path, "dtype", "cell mask holds non-integer values", "save integer instance ids (0 = background)")
        mask = mask.astype(np.int64)
    if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
        raise IngestError(path, "dtype", f"cell mask must hold integer instance ids, got {mask.dtype}",
                          "label connected cells first (e.g. skimage.measure.label) and save the labels")
    if mask.size and mask.min() < 0:
        raise IngestError(path, "values", "cell mask has negative ids", "use 0 for background and positive ids for cells")
    return mask.astype(np.uint16 if mask.size == 0 or mask.max() < 2**16 else np.uint32)


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise IngestError(path, "path", "does not exist", "check the table path")
    try:
        return pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as exc:
        raise IngestError(path, "file", f"cannot be read ({exc})", "pass a CSV or parquet table") from exc


# ============================================================================================
# The ingest itself
# ============================================================================================


def _existing_store(root: Path):  # type: ignore[no-untyped-def]
    from datamodules.store import DatasetStore

    return DatasetStore(root) if root.exists() else None


def _modality_has_image(store: Any, modality: str, tissue_id: str) -> list[float]:
    if store is None or modality not in store.modalities():
        return []
    return [mpp for mpp in store.resolutions(modality) if tissue_id in store.image_ids(modality, mpp)]


def ingest(
    image: str | Path,
    modality: str,
    dataset: str,
    tissue_id: str,
    out: str | Path,
    channels: str | Path | None = None,
    mask: str | Path | None = None,
    cell_mask: str | Path | None = None,
    tissues_csv: str | Path | None = None,
    cells_csv: str | Path | None = None,
    resolution: float | None = None,
    split: str | None = None,
    patient_id: str | None = None,
    overwrite: bool = False,
    embeddings: str | Path | None = None,
    extend_panel: bool = False,
    register_to_dapi: str | None = None,
    dapi_modality: str = "codex",
    dapi_channel: str | None = None,
) -> IngestResult:
    """Add one tissue's image (and masks/tables) to `out/dataset`; see the module docstring."""
    from datamodules.store import DatasetWriter, StoreError

    warnings: list[str] = []
    image = Path(image)
    if not MODALITY_PATTERN.match(modality):
        raise IngestError(image, "modality", f"{modality!r} is not a modality name", "use e.g. he, codex, imc, mibi")
    try:
        layout.check_tissue_id(tissue_id)
    except ValueError as exc:
        raise IngestError(image, "tissue id", str(exc), "pick an id of letters, digits, '_', '-', '.'") from exc
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", dataset):
        raise IngestError(image, "dataset", f"{dataset!r} is not a folder name", "use letters, digits, '_', '-', '.'")
    if split is not None and split not in SPLITS:
        raise IngestError(image, "split", f"{split!r} is not one of {SPLITS}", "pass --split train, val or test")
    root = Path(out) / dataset
    store = _existing_store(root)

    # ---- the image ----------------------------------------------------------------------------
    loaded = read_any(image)
    table_path = Path(channels) if channels is not None else None
    table = read_channel_table(table_path) if table_path is not None else None
    if modality == HE:
        arr = normalise_he(loaded)
        names = ["R", "G", "B"]
        channel_df = pd.DataFrame({"channel_name": names, "uniprot_id": pd.array([None] * 3, dtype="string"),
                                   "is_nuclear_marker": False, "qc_pass": True})
    else:
        names, names_from = resolve_channel_names(loaded, table, table_path)
        arr = normalise_multiplex(loaded, len(names), names_from)
        check_finite(arr, loaded.source)
        channel_df = build_channels(names, table, table_path, warnings)
        if np.issubdtype(arr.dtype, np.number) and arr.size and arr.min() < 0:
            warnings.append(f"{loaded.source}: negative pixel values (min {arr.min()}); they are clipped to 0 by the preprocessing")
    mpp = resolution if resolution is not None else loaded.mpp
    if mpp is None:
        mpp = 1.0
        if register_to_dapi is None:  # a registered H&E takes the CODEX image's resolution
            warnings.append(f"{loaded.source}: no pixel size in the file; assuming 1.0 µm/px (pass --resolution MPP)")
    if not mpp > 0:
        raise IngestError(loaded.source, "resolution", f"{mpp} is not a positive µm/px", "pass --resolution e.g. 1.0")

    # ---- duplicates / existing dataset ----------------------------------------------------------
    existing_tissues = store.tissues() if store is not None and store.exists(layout.TISSUES_TABLE) else None
    tissue_exists = existing_tissues is not None and tissue_id in set(existing_tissues["tissue_id"].astype(str))
    present_at = _modality_has_image(store, modality, tissue_id)
    if present_at and not overwrite:
        raise IngestError(image, "tissue id", f"{tissue_id!r} already has a {modality} image in {root}",
                          "pick another --tissue-id, or pass --overwrite to replace it")

    # ---- optional co-registration of an H&E to a CODEX DAPI channel ---------------------------
    registration = None
    if register_to_dapi is not None:
        if modality != HE:
            raise IngestError(image, "--register-to-dapi", "only an H&E image can be registered to a DAPI channel",
                              "pass --modality he, or drop --register-to-dapi")
        arr, mpp, registration = _register_he(arr, store, root, register_to_dapi, dapi_modality, dapi_channel, image)
        if register_to_dapi != tissue_id:
            warnings.append(f"H&E registered to {dapi_modality} tissue {register_to_dapi!r} but stored as {tissue_id!r}; "
                            "co-stained modalities usually share one tissue id")
    h, w = arr.shape[1:]

    # ---- tissue row ----------------------------------------------------------------------------
    explicit: dict[str, Any] = {}
    if tissues_csv is not None:
        tpath = Path(tissues_csv)
        tdf = read_table(tpath)
        if "tissue_id" not in tdf.columns:
            raise IngestError(tpath, "tissue_id", "column missing", "add a tissue_id column with one row per tissue")
        match = tdf[tdf["tissue_id"].astype(str) == tissue_id]
        if match.empty:
            raise IngestError(tpath, "tissue_id", f"no row for tissue {tissue_id!r}", "add a row for this tissue")
        if len(match) > 1:
            raise IngestError(tpath, "tissue_id", f"{len(match)} rows for tissue {tissue_id!r}", "keep one row per tissue")
        explicit.update({k: v for k, v in match.iloc[0].to_dict().items() if not (isinstance(v, float) and np.isnan(v))})
        if "split" in explicit and str(explicit["split"]) not in SPLITS:
            raise IngestError(tpath, "split", f"{explicit['split']!r} is not one of {SPLITS}", "use train, val or test")
    if patient_id is not None:
        explicit["patient_id"] = patient_id
    if split is not None:
        explicit["split"] = split
    explicit.pop("tissue_id", None)
    tissue_row: dict[str, Any] | None
    if tissue_exists:
        old = existing_tissues[existing_tissues["tissue_id"].astype(str) == tissue_id].iloc[0].to_dict()
        if overwrite:
            tissue_row = {**old, **explicit, "tissue_id": tissue_id}
        else:
            # a new modality of a tissue already in the dataset (co-stained sample): keep its row
            for key in ("patient_id", "split"):
                if key in explicit and str(old.get(key)) != str(explicit[key]):
                    raise IngestError(tissues_csv if key in explicit and tissues_csv else image, key,
                                      f"tissue {tissue_id!r} already has {key}={old.get(key)!r}, not {explicit[key]!r}",
                                      "drop the option or pass --overwrite to replace the tissue row")
            tissue_row = None
    else:
        tissue_row = {"tissue_id": tissue_id, "patient_id": tissue_id, "split": "train", **explicit}
        if "split" not in explicit:
            warnings.append(f"tissue {tissue_id!r}: no split given; using 'train' (pass --split)")

    # ---- masks -----------------------------------------------------------------------------------
    if mask is not None:
        mpath = Path(mask)
        tmask = read_mask(mpath, "mask")
        check_mask_shape(tmask, (h, w), mpath)
        tmask = tmask.astype(bool)
        if not tmask.any():
            raise IngestError(mpath, "values", "tissue mask is empty (no nonzero pixel)", "pass a mask with tissue = nonzero")
    else:
        # masks live per tissue and resolution, shared by the modalities of a co-stained sample:
        # keep one another modality already stored (its statistics were computed with it)
        stored_mask = store.tissue_mask(tissue_id, mpp) if store is not None else None
        if stored_mask is not None and tuple(stored_mask.shape) == (h, w) and not present_at:
            tmask = None
        elif stored_mask is not None and not present_at:
            raise IngestError(image, "shape", f"tissue {tissue_id!r} already has images of (Y,X) = {tuple(stored_mask.shape)} "
                              f"at {mpp} µm/px, this one is {(h, w)}",
                              "co-stained images of one tissue must share a pixel grid: register them "
                              "(--register-to-dapi), or use another --tissue-id or --resolution")
        else:
            from datamodules.preprocess import otsu_tissue_mask

            tmask = otsu_tissue_mask(arr, modality)
            if not tmask.any():
                tmask = np.ones((h, w), bool)
                warnings.append(f"{loaded.source}: Otsu found no tissue; using the whole image as tissue (pass --mask)")
    cmask = None
    if cell_mask is not None:
        cpath = Path(cell_mask)
        cmask_raw = read_mask(cpath, "cell-mask")
        check_mask_shape(cmask_raw, (h, w), cpath)
        cmask = to_instance_mask(cmask_raw, cpath)

    cells_df = None
    if cells_csv is not None:
        cpath2 = Path(cells_csv)
        cells_df = read_table(cpath2)
        if "cell_id" not in cells_df.columns:
            raise IngestError(cpath2, "cell_id", "column missing", "add a cell_id column (= label in the cell mask)")
        if "tissue_id" in cells_df.columns:
            cells_df = cells_df[cells_df["tissue_id"].astype(str) == tissue_id]
            if cells_df.empty:
                raise IngestError(cpath2, "tissue_id", f"no row for tissue {tissue_id!r}", "add this tissue's cells")
        cells_df = cells_df.assign(tissue_id=tissue_id)
        if cells_df["cell_id"].duplicated().any():
            raise IngestError(cpath2, "cell_id", "duplicate cell ids within the tissue", "keep one row per cell")
        if cmask is not None:
            labels = set(np.unique(cmask).tolist()) - {0}
            absent = sorted(set(cells_df["cell_id"].astype(np.int64).tolist()) - labels)
            if absent:
                raise IngestError(cpath2, "cell_id", f"{len(absent)} cell ids not in the cell mask (e.g. {absent[:5]})",
                                  "use the cell mask's instance labels as cell_id")
    elif cmask is not None:
        ids = np.unique(cmask)
        cells_df = pd.DataFrame({"tissue_id": tissue_id, "cell_id": ids[ids > 0].astype(np.int64)})

    # ---- panel merge -------------------------------------------------------------------------------
    panel_df, arr, measured, rewrite = _merge_panel(store, modality, channel_df, arr, image, extend_panel, warnings)

    # ---- embeddings ------------------------------------------------------------------------------------
    embed_tensors = _embeddings_to_copy(Path(embeddings) if embeddings else None, panel_df, store)
    if modality != HE:
        have = set(store.embedding_ids()) if store is not None else set()
        have |= set(embed_tensors)
        no_id = [n for n, u in zip(channel_df["channel_name"], channel_df["uniprot_id"]) if pd.isna(u)]
        no_emb = [f"{n} ({u})" for n, u in zip(channel_df["channel_name"], channel_df["uniprot_id"])
                  if not pd.isna(u) and u not in have]
        if no_id:
            warnings.append(f"markers without a UniProt id (unusable by VirTues): {', '.join(no_id)}")
        if no_emb:
            warnings.append(f"markers without an ESM-2 embedding in {root / 'marker_embeddings'}: {', '.join(no_emb)} "
                            "(pass --embeddings DIR or compute them)")

    # ---- write ---------------------------------------------------------------------------------------------
    created = store is None
    try:
        if created:
            with DatasetWriter.create(root) as writer:
                _write_all(writer, modality, tissue_id, arr, mpp, panel_df, measured, tmask, cmask, cells_df,
                           tissue_row, embed_tensors, rewrite, overwrite, store, present_at)
                if modality != HE:
                    _recompute_stats(writer.root, modality, mpp, tissue_id)
        else:
            writer = DatasetWriter.open(root, create=False)
            _write_all(writer, modality, tissue_id, arr, mpp, panel_df, measured, tmask, cmask, cells_df,
                       tissue_row, embed_tensors, rewrite, overwrite, store, present_at)
            if modality != HE:
                _recompute_stats(str(root), modality, mpp, tissue_id)
    except StoreError as exc:
        raise IngestError(root, "dataset", str(exc), "fix the dataset folder (python -m datamodules.store info DIR)") from exc
    for msg in warnings:
        log.warning(msg)
    return IngestResult(root, modality, tissue_id, float(mpp), tuple(arr.shape), list(panel_df["channel_name"]),
                        warnings, created, registration)


def _merge_panel(store: Any, modality: str, channel_df: pd.DataFrame, arr: np.ndarray, image: Path, extend_panel: bool,
                 warnings: list[str]) -> tuple[pd.DataFrame, np.ndarray, list[bool], list[str]]:
    """Panel table, image in panel order (zero-filled unmeasured channels), measured flags, new channels.

    Every image of a modality holds all channels of `channels.parquet` in table order (what the
    spora reader and `DatasetStore.validate` expect); `channels_per_tissue` says which were measured.
    """
    names = list(channel_df["channel_name"])
    existing = None
    if store is not None and store.exists(layout.channels_path(modality)):
        existing = store.channels(modality)
    if existing is None:
        return channel_df, arr, [True] * len(names), []
    panel = [str(n) for n in existing["channel_name"]]
    new = [n for n in names if n not in panel]
    if new and not extend_panel:
        raise IngestError(image, "channels", f"{len(new)} channels not in the dataset's {modality} panel: {', '.join(new[:10])}",
                          "rename them to the panel's names, ingest into a new --dataset, or pass --extend-panel "
                          "(adds them as unmeasured zero channels to the existing images)")
    if modality != HE:
        ex_uid = dict(zip(existing["channel_name"].astype(str), existing.get("uniprot_id", pd.Series([None] * len(panel)))))
        for n, u in zip(names, channel_df["uniprot_id"]):
            old = ex_uid.get(n)
            if n in ex_uid and not pd.isna(u) and not pd.isna(old) and str(u) != str(old):
                raise IngestError(image, "uniprot_id", f"channel {n} has UniProt {old} in the dataset but {u} in your table",
                                  "use the dataset's id or rename the channel")
    panel_df = existing.copy()
    if modality != HE and "uniprot_id" in panel_df.columns:
        given = dict(zip(channel_df["channel_name"], channel_df["uniprot_id"]))
        fill = [i for i, n in enumerate(panel_df["channel_name"].astype(str)) if pd.isna(panel_df["uniprot_id"].iloc[i])
                and n in given and not pd.isna(given[n])]
        if fill:
            panel_df["uniprot_id"] = panel_df["uniprot_id"].astype("string")
            for i in fill:
                panel_df.loc[i, "uniprot_id"] = given[str(panel_df["channel_name"].iloc[i])]
            warnings.append(f"{modality} panel: UniProt ids added for {', '.join(str(panel_df['channel_name'].iloc[i]) for i in fill)}")
    if new:
        panel_df = pd.concat([panel_df, channel_df[channel_df["channel_name"].isin(new)]], ignore_index=True)
        warnings.append(f"{modality} panel extended by {', '.join(new)}: existing images get zero-filled, unmeasured channels")
    full = [str(n) for n in panel_df["channel_name"]]
    missing = [n for n in full if n not in names]
    if missing:
        warnings.append(f"{image}: {len(missing)} {modality} panel channels not in this image (stored as unmeasured zeros): "
                        f"{', '.join(missing[:10])}")
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(full),) + arr.shape[1:], dtype=arr.dtype)
    for j, n in enumerate(full):
        if n in index:
            out[j] = arr[index[n]]
    return panel_df, out, [n in index for n in full], new


def _embeddings_to_copy(folder: Path | None, panel_df: pd.DataFrame, store: Any) -> dict[str, Any]:
    """The panel's ``<UniProtID>.pt`` files in ``folder``, read safely and checked against the
    dataset's embedding size (the first file fixes it for a new dataset)."""
    if folder is None:
        return {}
    if not folder.is_dir():
        raise IngestError(folder, "--embeddings", "is not a folder", "pass a folder of <UniProtID>.pt files")
    wanted = {str(u) for u in panel_df.get("uniprot_id", []) if not pd.isna(u) and layout.is_uniprot_id(str(u))}
    out = {}
    dim = None
    if store is not None and store.embedding_ids():
        dim = int(store.embedding(store.embedding_ids()[0]).numel())
    for uid in sorted(wanted):
        f = folder / f"{uid}.pt"
        if f.exists():
            out[uid] = load_tensor_file(f, expected_dim=dim)
            dim = out[uid].numel()
    return out


def _write_all(writer: Any, modality: str, tissue_id: str, arr: np.ndarray, mpp: float, panel_df: pd.DataFrame,
               measured: list[bool], tmask: np.ndarray | None, cmask: np.ndarray | None, cells_df: pd.DataFrame | None,
               tissue_row: dict | None, embed_tensors: dict, new_channels: list[str], overwrite: bool, store: Any,
               present_at: list[float]) -> None:
    """Image first, tables last: an interruption leaves at worst an image no table points to."""
    names = [str(n) for n in panel_df["channel_name"]]
    for uid, tensor in embed_tensors.items():
        writer.write_embedding(uid, tensor)
    if new_channels and store is not None:  # --extend-panel: pad the existing images of this modality
        for res in store.resolutions(modality):
            for tid in store.image_ids(modality, res):
                if tid == tissue_id:
                    continue
                old = store.image(modality, tid, res)
                data = old.read_all()
                pad = np.zeros((len(names) - data.shape[0],) + data.shape[1:], dtype=data.dtype)
                writer.write_image(modality, tid, np.concatenate([data, pad]), res, names)
    writer.write_image(modality, tissue_id, arr, mpp, names)
    if overwrite:
        for res in present_at:
            if res != mpp:  # an older copy at another resolution would now be stale
                writer.remove(layout.image_path(modality, res, tissue_id))
    if tmask is not None:  # None: keep the mask another modality of this tissue stored
        writer.write_tissue_mask(tissue_id, mpp, tmask)
    if cmask is not None:
        writer.write_cell_mask(tissue_id, mpp, cmask)
    writer.write_channels(modality, panel_df)
    row = pd.DataFrame([dict(zip(names, measured))], index=pd.Index([tissue_id], name="tissue_id")).astype(bool)
    writer.update_channels_per_tissue(modality, row)
    if cells_df is not None:
        writer.append_cells(cells_df.reset_index(drop=True))
    if tissue_row is not None:
        writer.append_tissues(pd.DataFrame([tissue_row]), replace=overwrite)


def _recompute_stats(root: str | Path, modality: str, mpp: float, tissue_id: str) -> None:
    from datamodules.preprocess import compute_and_store_statistics

    compute_and_store_statistics(str(root), modality, mpp, force=True, reuse_upper_quantiles=True, stale_tissues=[tissue_id])


def _register_he(he: np.ndarray, store: Any, root: Path, codex_tissue: str, dapi_modality: str, dapi_channel: str | None,
                 image: Path) -> tuple[np.ndarray, float, Any]:
    """Warp the H&E (3,Y,X) into the CODEX image's pixel grid using its DAPI channel."""
    from datamodules.registration import RegistrationError, find_dapi_channel, register_he_to_dapi, warp_to

    if store is None or not _modality_has_image(store, dapi_modality, codex_tissue):
        raise IngestError(root, "--register-to-dapi", f"no {dapi_modality} image of tissue {codex_tissue!r} in the dataset",
                          "ingest the CODEX image first, or fix the tissue id / --dapi-modality")
    res = _modality_has_image(store, dapi_modality, codex_tissue)[0]
    img = store.image(dapi_modality, codex_tissue, res)
    try:
        idx = find_dapi_channel(img.channel_names, dapi_channel)
    except RegistrationError as exc:
        raise IngestError(img.path, "channels", str(exc), "pass --dapi-channel NAME") from exc
    c, h, w = img.shape
    dapi = img.read(0, 0, h, w, channels=[idx])[0]
    try:
        reg = register_he_to_dapi(np.moveaxis(he, 0, -1), dapi)
    except RegistrationError as exc:
        raise IngestError(image, "registration", str(exc), "check that the H&E and DAPI show the same tissue") from exc
    warped = warp_to(he, reg.transform, (h, w), fill=255)
    return warped.astype(np.uint8), res, reg


# ============================================================================================
# CLI
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datamodules.ingest", description=__doc__.split("\n")[0],
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
    p.add_argument("--split", choices=SPLITS)
    p.add_argument("--patient-id")
    p.add_argument("--embeddings", help="folder of <UniProtID>.pt ESM-2 embeddings to copy in")
    p.add_argument("--extend-panel", action="store_true", help="allow channels new to the modality's panel")
    p.add_argument("--register-to-dapi", metavar="CODEX_TISSUE_ID",
                   help="(H&E) register to the DAPI channel of this tissue's CODEX image and store it in that pixel grid")
    p.add_argument("--dapi-modality", default="codex")
    p.add_argument("--dapi-channel", help="name of the DAPI channel (default: DAPI/Hoechst/DNA/H3 by name)")
    p.add_argument("--overwrite", action="store_true", help="replace this tissue's image, masks and rows")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from datamodules.store import StoreError

    args = build_parser().parse_args(argv)
    # the CLI prints the collected warnings itself, once, as `warning: ...` lines
    logging.getLogger(__name__).addHandler(logging.NullHandler())
    logging.getLogger(__name__).propagate = False
    try:
        result = ingest(
            image=args.image, modality=args.modality, dataset=args.dataset, tissue_id=args.tissue_id, out=args.out,
            channels=args.channels, mask=args.mask, cell_mask=args.cell_mask, tissues_csv=args.tissues_csv,
            cells_csv=args.cells_csv, resolution=args.resolution, split=args.split, patient_id=args.patient_id,
            overwrite=args.overwrite, embeddings=args.embeddings, extend_panel=args.extend_panel,
            register_to_dapi=args.register_to_dapi, dapi_modality=args.dapi_modality, dapi_channel=args.dapi_channel,
        )
    except (IngestError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for msg in result.warnings:
        print(f"warning: {msg}", file=sys.stderr)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
