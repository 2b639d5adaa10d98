"""Turn a lab's own image files into the harmonized dataset layout, one tissue at a time.

    python -m experiments.data_ingest --image FILE_OR_FOLDER --modality imc --dataset NAME --tissue-id ID --out DIR ...

Accepted images: OME-TIFF / TIFF (multi-channel fluorescence or IMC, RGB H&E; pyramidal files are
read at full resolution), slide files for H&E (.svs, .ndpi, .mrxs, .scn via OpenSlide), a FOLDER of single-channel TIFFs (one per marker, file stem = marker name,
as MIBI exports), or PNG/JPEG for H&E. Channel names come from the OME-XML, the folder's file names
or, for a plain TIFF, the channel table CSV (columns `channel_name`, `uniprot_id`; optional
`is_nuclear_marker`, `qc_pass`).

Why everything is checked before anything is written: a dataset folder is shared by many runs, so a
bad file must fail with one line naming the file, the field and the fix, and must leave the dataset
as it was. A new dataset is assembled in a temporary folder and renamed into place; additions to an
existing one write each piece atomically (image first, tables last).

Images above 256 MB (and any with ``stream=True``) are not read whole: they are copied shard by
shard and checked on the way (:mod:`datamodules.ingest_streaming`), so a 90 GB whole-slide CODEX
ingests in bounded memory; the result is the same dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules import layout
from datamodules.dataset_lock import dataset_lock
from datamodules.ingest_files import (HE, MODALITY_PATTERN, IngestError, LoadedImage, build_channels, check_finite,
                                     check_mask_shape, normalise_he, normalise_multiplex, read_any, read_channel_table,
                                     read_mask, read_table, resolve_channel_names, to_instance_mask)
from datamodules.ingest_panel import embeddings_to_copy, merge_panel
from datamodules.ingest_streaming import (PanelImage, check_lazy_he, check_lazy_multiplex, open_source, should_stream,
                                          stats_block_rows, thumbnail_tissue_mask, write_image_streaming)
from datamodules.preprocess import otsu_tissue_mask
from datamodules.provenance import MEASURED, check_dataset_target
from datamodules.registration import (RegistrationError, WarpedImage, find_dapi_channel, register_downsampled,
                                      register_he_to_dapi, warp_to)
from datamodules.statistics import compute_and_store_statistics
from datamodules.store import DatasetStore, DatasetWriter, StoreError

log = logging.getLogger(__name__)

__all__ = ["IngestError", "IngestResult", "ingest", "read_source"]


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
# The ingest itself
# ============================================================================================


def _existing_store(root: Path):  # type: ignore[no-untyped-def]
    return DatasetStore(root) if root.exists() and any(root.iterdir()) else None


def _modality_has_image(store: Any, modality: str, tissue_id: str) -> list[float]:
    if store is None or modality not in store.modalities():
        return []
    return [mpp for mpp in store.resolutions(modality) if tissue_id in store.image_ids(modality, mpp)]


@dataclasses.dataclass
class SourceImage:
    """The image as read and checked, before the dataset is looked at."""

    array: Any  # (C, Y, X): an ndarray, or a lazy reader (shape/dtype/read) when streamed
    channels: pd.DataFrame  # channels.parquet rows of this image
    mpp: float | None  # None: the file does not say
    source: str


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
    stream: bool | None = None,
) -> IngestResult:
    """Add one tissue's image (and masks/tables) to `out/dataset`; see the module docstring.

    Steps: check the arguments; read and check the image (no lock); then, holding the dataset's
    write lock (so concurrent ingests into one dataset lose no table row), look at the dataset,
    register, build the tissue row, masks, cells, panel and embeddings, and write.
    ``stream`` (None: by size) copies the image shard by shard instead of reading it whole.
    """
    warnings: list[str] = []
    image = Path(image)
    split = _check_arguments(image, modality, dataset, tissue_id, split, resolution)
    root = Path(out) / dataset
    check_dataset_target(root, MEASURED, "ingest", flag="--out/--dataset",
                         file_hint="--out is the folder that holds datasets")
    src = read_source(image, modality, channels, warnings, stream)
    with dataset_lock(root):
        store = _existing_store(root)
        mpp = _resolution(src, resolution, register_to_dapi, warnings)
        present_at = _previous_images(store, modality, tissue_id, image, overwrite, warnings)
        arr, registration = src.array, None
        if register_to_dapi is not None:
            if modality != HE:
                raise IngestError(image, "--register-to-dapi", "only an H&E image can be registered to a DAPI channel",
                                  "pass --modality he, or drop --register-to-dapi")
            arr, mpp, registration = _register_he(arr, store, root, register_to_dapi, dapi_modality, dapi_channel, image)
            if register_to_dapi != tissue_id:
                warnings.append(f"H&E registered to {dapi_modality} tissue {register_to_dapi!r} but stored as {tissue_id!r}; "
                                "co-stained modalities usually share one tissue id")
        h, w = arr.shape[1:]
        tissue_row = _tissue_row(store, tissue_id, image, tissues_csv, split, patient_id, overwrite, warnings)
        tmask = _tissue_mask(store, tissue_id, image, mask, arr, modality, mpp, present_at, warnings)
        cmask = _cell_mask(cell_mask, (h, w))
        cells_df = _cells_table(cells_csv, tissue_id, cmask)
        if isinstance(arr, np.ndarray):
            panel_df, arr, measured, new_channels = merge_panel(store, modality, src.channels, arr, image, extend_panel, warnings)
        else:  # the panel is decided from the names alone; the lazy image reorders as it is read
            placeholder = np.zeros((arr.shape[0], 1, 1), dtype=arr.dtype)
            panel_df, _, measured, new_channels = merge_panel(store, modality, src.channels, placeholder, image,
                                                              extend_panel, warnings)
            arr = PanelImage(arr, list(src.channels["channel_name"]), list(panel_df["channel_name"]), src.source)
        embed_tensors = embeddings_to_copy(Path(embeddings) if embeddings else None, panel_df, store)
        if modality != HE:
            _warn_unusable_markers(src.channels, store, embed_tensors, root, warnings)
        pieces = dict(modality=modality, tissue_id=tissue_id, arr=arr, mpp=mpp, panel_df=panel_df, measured=measured,
                      tmask=tmask, cmask=cmask, cells_df=cells_df, tissue_row=tissue_row, embed_tensors=embed_tensors,
                      new_channels=new_channels, overwrite=overwrite, store=store, present_at=present_at)
        del tmask, cmask  # _write drops the masks once stored: a slide's mask is GBs the statistics must not double
        created = _write(root, store is None, pieces)
        if getattr(arr, "min_seen", 0) < 0 and modality != HE:
            warnings.append(f"{src.source}: negative pixel values (min {arr.min_seen}); they are clipped to 0 by the preprocessing")
    for msg in warnings:
        log.warning(msg)
    return IngestResult(root, modality, tissue_id, float(mpp), tuple(arr.shape), list(panel_df["channel_name"]),
                        warnings, created, registration)


def _check_arguments(image: Path, modality: str, dataset: str, tissue_id: str, split: str | None,
                     resolution: float | None) -> str | None:
    """Names and numbers, checked before any file is read; returns the normalised split."""
    if not MODALITY_PATTERN.match(modality):
        raise IngestError(image, "modality", f"{modality!r} is not a modality name", "use e.g. he, codex, imc, mibi")
    try:
        layout.check_tissue_id(tissue_id)
    except ValueError as exc:
        raise IngestError(image, "tissue id", str(exc), "pick an id of letters, digits, '_', '-', '.'") from exc
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", dataset):
        raise IngestError(image, "dataset", f"{dataset!r} is not a folder name", "use letters, digits, '_', '-', '.'")
    if resolution is not None:
        try:
            layout.check_mpp(resolution, "--resolution")
        except ValueError as exc:
            raise IngestError(image, "--resolution", str(exc), "pass the pixel size in µm, e.g. 0.5 or 1.0") from None
    if split is None:
        return None
    try:
        return layout.normalise_split(split)
    except ValueError as exc:
        raise IngestError(image, "split", str(exc), "pass --split train, val or test") from None


def read_source(image: Path, modality: str, channels: str | Path | None, warnings: list[str],
                stream: bool | None = None) -> SourceImage:
    """The image as (C,Y,X) with its channel rows; every check that needs only the file."""
    table_path = Path(channels) if channels is not None else None
    if image.exists() and should_stream(image, stream):
        return _lazy_source(image, modality, table_path, warnings)
    loaded = read_any(image)  # the image's own damage is named first, before the channel table's
    table = read_channel_table(table_path) if table_path is not None else None
    if modality == HE:
        arr = normalise_he(loaded)
        channel_df = pd.DataFrame({"channel_name": ["R", "G", "B"], "uniprot_id": pd.array([None] * 3, dtype="string"),
                                   "is_nuclear_marker": False, "qc_pass": True})
    else:
        names, names_from = resolve_channel_names(loaded, table, table_path)
        arr = normalise_multiplex(loaded, len(names), names_from)
        check_finite(arr, loaded.source)
        channel_df = build_channels(names, table, table_path, warnings)
        if np.issubdtype(arr.dtype, np.number) and arr.size and arr.min() < 0:
            warnings.append(f"{loaded.source}: negative pixel values (min {arr.min()}); they are clipped to 0 by the preprocessing")
    if arr.shape[1] < 2 or arr.shape[2] < 2:
        raise IngestError(loaded.source, "size", f"image is {arr.shape[1]}×{arr.shape[2]} px", "ingest a 2-D image, not a line")
    return SourceImage(arr, channel_df, loaded.mpp, loaded.source)


def _lazy_source(image: Path, modality: str, table_path: Path | None, warnings: list[str]) -> SourceImage:
    """The header checks of :func:`read_source` on a lazily opened image; pixels are checked while copied."""
    reader = open_source(image)
    table = read_channel_table(table_path) if table_path is not None else None
    if modality == HE:
        check_lazy_he(reader, str(image))
        channel_df = pd.DataFrame({"channel_name": ["R", "G", "B"], "uniprot_id": pd.array([None] * 3, dtype="string"),
                                   "is_nuclear_marker": False, "qc_pass": True})
    else:
        loaded = LoadedImage(np.empty((0,)), reader.channel_names, reader.mpp, str(image))
        names, names_from = resolve_channel_names(loaded, table, table_path)
        check_lazy_multiplex(reader, len(names), names_from, str(image))
        channel_df = build_channels(names, table, table_path, warnings)
    if min(reader.shape[1:]) < 2:
        raise IngestError(image, "size", f"image is {reader.shape[1]}×{reader.shape[2]} px", "ingest a 2-D image, not a line")
    return SourceImage(reader, channel_df, reader.mpp, str(image))


def _resolution(src: SourceImage, resolution: float | None, register_to_dapi: str | None, warnings: list[str]) -> float:
    mpp = resolution if resolution is not None else src.mpp
    if mpp is None:
        if register_to_dapi is None:  # a registered H&E takes the CODEX image's resolution
            warnings.append(f"{src.source}: no pixel size in the file; assuming 1.0 µm/px (pass --resolution MPP)")
        return 1.0
    try:
        return layout.check_mpp(mpp, "pixel size")
    except ValueError as exc:
        raise IngestError(src.source, "resolution", f"the file says {exc}", "pass --resolution MPP") from None


def _previous_images(store: Any, modality: str, tissue_id: str, image: Path, overwrite: bool,
                     warnings: list[str]) -> list[float]:
    """Resolutions at which the tissue already has an image of this modality.

    An image without its ``channels_per_tissue`` row is the leftover of an interrupted ingest (the
    row is written after the image): it is replaced, so rerunning the same command completes it."""
    present_at = _modality_has_image(store, modality, tissue_id)
    if not present_at or overwrite:
        return present_at
    recorded = store.channels_per_tissue(modality)
    if recorded is not None and tissue_id in set(recorded.index.astype(str)):
        raise IngestError(image, "tissue id", f"{tissue_id!r} already has a {modality} image in {store.url}",
                          "pick another --tissue-id, or pass --overwrite to replace it")
    warnings.append(f"{tissue_id}: a {modality} image left by an interrupted ingest was replaced")
    return present_at


def _tissue_row(store: Any, tissue_id: str, image: Path, tissues_csv: str | Path | None, split: str | None,
                patient_id: str | None, overwrite: bool, warnings: list[str]) -> dict[str, Any] | None:
    """The tissues-table row to write (None: keep the row the tissue already has)."""
    explicit: dict[str, Any] = {}
    if tissues_csv is not None:
        explicit.update(_row_from_table(Path(tissues_csv), tissue_id))
    if patient_id is not None:
        explicit["patient_id"] = patient_id
    if split is not None:
        explicit["split"] = split
    explicit.pop("tissue_id", None)
    existing = store.tissues() if store is not None and store.exists(layout.TISSUES_TABLE) else None
    if existing is None or tissue_id not in set(existing["tissue_id"].astype(str)):
        if "split" not in explicit:
            warnings.append(f"tissue {tissue_id!r}: no split given; using 'train' (pass --split)")
        return {"tissue_id": tissue_id, "patient_id": tissue_id, "split": "train", **explicit}
    old = existing[existing["tissue_id"].astype(str) == tissue_id].iloc[0].to_dict()
    if overwrite:
        return {**old, **explicit, "tissue_id": tissue_id}
    # a new modality of a tissue already in the dataset (co-stained sample): keep its row
    for key in ("patient_id", "split"):
        if key in explicit and str(old.get(key)) != str(explicit[key]):
            raise IngestError(tissues_csv if tissues_csv else image, key,
                              f"tissue {tissue_id!r} already has {key}={old.get(key)!r}, not {explicit[key]!r}",
                              "drop the option or pass --overwrite to replace the tissue row")
    return None


def _row_from_table(path: Path, tissue_id: str) -> dict[str, Any]:
    table = read_table(path)
    if "tissue_id" not in table.columns:
        raise IngestError(path, "tissue_id", f"column missing (columns: {list(table.columns)})",
                          "add a tissue_id column with one row per tissue")
    match = table[table["tissue_id"].astype(str).str.strip() == tissue_id]
    if match.empty:
        raise IngestError(path, "tissue_id", f"no row for tissue {tissue_id!r}", "add a row for this tissue")
    if len(match) > 1:
        raise IngestError(path, "tissue_id", f"{len(match)} rows for tissue {tissue_id!r}", "keep one row per tissue")
    row = {k: v for k, v in match.iloc[0].to_dict().items() if not (isinstance(v, float) and np.isnan(v))}
    if "split" in row:
        try:
            row["split"] = layout.normalise_split(row["split"])
        except ValueError as exc:
            raise IngestError(path, "split", str(exc), "use train, val or test") from None
    return row


def _tissue_mask(store: Any, tissue_id: str, image: Path, mask: str | Path | None, arr: np.ndarray, modality: str,
                 mpp: float, present_at: list[float], warnings: list[str]) -> np.ndarray | None:
    """The given mask, else the one another modality of this tissue stored (None = keep it), else Otsu."""
    h, w = arr.shape[1:]
    if mask is not None:
        mpath = Path(mask)
        tmask = read_mask(mpath, "mask")
        check_mask_shape(tmask, (h, w), mpath)
        if not tmask.any():
            raise IngestError(mpath, "values", "tissue mask is empty (no nonzero pixel)", "pass a mask with tissue = nonzero")
        return tmask.astype(bool)
    # masks live per tissue and resolution, shared by the modalities of a co-stained sample:
    # keep one another modality already stored (its statistics were computed with it)
    stored = store.tissue_mask(tissue_id, mpp) if store is not None else None
    if stored is not None and not present_at:
        if tuple(stored.shape) == (h, w):
            return None
        raise IngestError(image, "shape", f"tissue {tissue_id!r} already has images of (Y,X) = {tuple(stored.shape)} "
                          f"at {mpp} µm/px, this one is {(h, w)}",
                          "co-stained images of one tissue must share a pixel grid: register them "
                          "(--register-to-dapi), or use another --tissue-id or --resolution")
    tmask = otsu_tissue_mask(arr, modality) if isinstance(arr, np.ndarray) else thumbnail_tissue_mask(arr, modality)
    if tmask is None or not tmask.any():
        warnings.append(f"{image}: Otsu found no tissue; using the whole image as tissue (pass --mask)")
        return np.ones((h, w), bool)
    return tmask


def _cell_mask(cell_mask: str | Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    if cell_mask is None:
        return None
    cpath = Path(cell_mask)
    raw = read_mask(cpath, "cell-mask")
    check_mask_shape(raw, shape, cpath)
    return to_instance_mask(raw, cpath)


def _cells_table(cells_csv: str | Path | None, tissue_id: str, cmask: np.ndarray | None) -> pd.DataFrame | None:
    """This tissue's rows of the cell table (ids must be labels of the cell mask), or the mask's ids."""
    if cells_csv is None:
        if cmask is None:
            return None
        ids = np.unique(cmask)
        return pd.DataFrame({"tissue_id": tissue_id, "cell_id": ids[ids > 0].astype(np.int64)})
    path = Path(cells_csv)
    cells = read_table(path)
    if "cell_id" not in cells.columns:
        raise IngestError(path, "cell_id", "column missing", "add a cell_id column (= label in the cell mask)")
    if "tissue_id" in cells.columns:
        cells = cells[cells["tissue_id"].astype(str).str.strip() == tissue_id]
        if cells.empty:
            raise IngestError(path, "tissue_id", f"no row for tissue {tissue_id!r}", "add this tissue's cells")
    cells = cells.assign(tissue_id=tissue_id)
    ids = pd.to_numeric(cells["cell_id"], errors="coerce")
    if ids.isna().any() or (ids != ids.round()).any() or (ids < 1).any():
        bad = cells["cell_id"][ids.isna() | (ids != ids.round()) | (ids < 1)].head(3).tolist()
        raise IngestError(path, "cell_id", f"cell ids must be positive integers (e.g. {bad})",
                          "use the cell mask's instance labels as cell_id")
    cells = cells.assign(cell_id=ids.astype(np.int64))
    if cells["cell_id"].duplicated().any():
        raise IngestError(path, "cell_id", "duplicate cell ids within the tissue", "keep one row per cell")
    if cmask is not None:
        absent = sorted(set(cells["cell_id"].tolist()) - (set(np.unique(cmask).tolist()) - {0}))
        if absent:
            raise IngestError(path, "cell_id", f"{len(absent)} cell ids not in the cell mask (e.g. {absent[:5]})",
                              "use the cell mask's instance labels as cell_id")
    return cells


def _warn_unusable_markers(channel_df: pd.DataFrame, store: Any, embed_tensors: dict, root: Path,
                           warnings: list[str]) -> None:
    have = (set(store.embedding_ids()) if store is not None else set()) | set(embed_tensors)
    no_id = [n for n, u in zip(channel_df["channel_name"], channel_df["uniprot_id"]) if pd.isna(u)]
    no_emb = [f"{n} ({u})" for n, u in zip(channel_df["channel_name"], channel_df["uniprot_id"])
              if not pd.isna(u) and u not in have]
    if no_id:
        warnings.append(f"markers without a UniProt id (unusable by VirTues): {', '.join(no_id)}")
    if no_emb:
        warnings.append(f"markers without an ESM-2 embedding in {root / 'marker_embeddings'}: {', '.join(no_emb)} "
                        "(pass --embeddings DIR or compute them)")


def _write(root: Path, new_dataset: bool, pieces: dict[str, Any]) -> bool:
    """Write everything (a new dataset: assembled aside and renamed in); returns whether it was new."""
    modality, mpp, tissue_id = pieces["modality"], pieces["mpp"], pieces["tissue_id"]
    try:
        if new_dataset:
            with DatasetWriter.create(root, kind=MEASURED, written_by="ingest") as writer:
                _write_all(writer, **pieces)
                pieces.update(tmask=None, cmask=None)  # stored; the statistics read them back
                if modality != HE:
                    _recompute_stats(writer.root, modality, mpp, tissue_id, pieces["arr"])
        else:
            writer = DatasetWriter.open(root, create=False, kind=MEASURED, written_by="ingest")
            _write_all(writer, **pieces)
            pieces.update(tmask=None, cmask=None)
            if modality != HE:
                _recompute_stats(str(root), modality, mpp, tissue_id, pieces["arr"])
    except StoreError as exc:
        raise IngestError(root, "dataset", str(exc), "fix the dataset folder (python -m experiments.data_info DIR)") from exc
    return new_dataset


def _write_all(writer: Any, *, modality: str, tissue_id: str, arr: np.ndarray, mpp: float, panel_df: pd.DataFrame,
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
    if isinstance(arr, np.ndarray):
        writer.write_image(modality, tissue_id, arr, mpp, names)
    else:
        write_image_streaming(writer, modality, tissue_id, arr, mpp, names)
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


def _recompute_stats(root: str | Path, modality: str, mpp: float, tissue_id: str, arr: Any) -> None:
    """Row blocks of ~16 MB: a slide-wide block of 1024 rows would be GBs for a 40-channel slide."""
    compute_and_store_statistics(str(root), modality, mpp, force=True, reuse_upper_quantiles=True, stale_tissues=[tissue_id],
                                 block_rows=stats_block_rows(arr.shape, arr.dtype))


def _register_he(he: np.ndarray, store: Any, root: Path, codex_tissue: str, dapi_modality: str, dapi_channel: str | None,
                 image: Path) -> tuple[np.ndarray, float, Any]:
    """Warp the H&E (3,Y,X) into the CODEX image's pixel grid using its DAPI channel."""
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
    try:
        if not isinstance(he, np.ndarray):  # a slide: register thumbnails, warp tile by tile while writing
            reg = register_downsampled(he, _ChannelOf(img, idx))
            return WarpedImage(he, reg.transform, (h, w), fill=255), res, reg
        reg = register_he_to_dapi(np.moveaxis(he, 0, -1), img.read(0, 0, h, w, channels=[idx])[0])
    except RegistrationError as exc:
        raise IngestError(image, "registration", str(exc), "check that the H&E and DAPI show the same tissue") from exc
    warped = warp_to(he, reg.transform, (h, w), fill=255)
    return warped.astype(np.uint8), res, reg


class _ChannelOf:
    """One channel of a store image as a ``(1, H, W)`` readable image (the DAPI for registration)."""

    def __init__(self, image: Any, channel: int):
        self.image, self.channel = image, channel
        self.shape = (1, *image.shape[1:])
        self.dtype = image.dtype
        self.name = f"{image.path} channel {channel}"

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.image.read(y, x, h, w, channels=[self.channel])
