"""The atomic writer of the dataset layout: every piece appears complete or not at all.

A new dataset is assembled in a hidden temporary folder beside its final name and renamed into
place when complete; additions to an existing dataset write each file under a temporary name first.
Read-modify-write table updates hold the dataset's inter-process write lock
(:mod:`datamodules.dataset_lock`), and every dataset records its kind (:mod:`datamodules.provenance`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch

from datamodules import layout
from datamodules.dataset_lock import dataset_lock
from datamodules.ome_zarr import join_path, normalise_path, write_ome_zarr
from datamodules.provenance import MANIFEST, MEASURED, manifest
from datamodules.store_errors import StoreError


#: Cell ids are stored as uint32 at most: larger ids would wrap and merge cells.
MAX_CELL_ID = 2**32 - 1


def instance_ids(mask: np.ndarray, what: str) -> np.ndarray:
    """``mask`` as uint16/uint32 instance ids; refuses float, negative and too-large ids (never wraps)."""
    mask = np.asarray(mask)
    if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
        raise StoreError(f"{what} must hold integer instance ids, got {mask.dtype}; label cells first "
                         "(e.g. skimage.measure.label) and save the labels")
    if mask.size == 0:
        return mask.astype(np.uint16)
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0:
        raise StoreError(f"{what} has negative ids; use 0 for background and positive ids")
    if hi > MAX_CELL_ID:
        raise StoreError(f"{what} has cell id {hi} > {MAX_CELL_ID} (2^32 - 1), which would wrap and merge cells; "
                         "relabel to consecutive ids (skimage.segmentation.relabel_sequential) and keep the mapping")
    return mask.astype(np.uint16 if hi < 2**16 else np.uint32)


class DatasetWriter:
    """Writes pieces of a dataset; every piece appears complete or not at all."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, final_root: str | None = None, overwrite: bool = False):
        self.fs = fs
        self.root = root.rstrip("/")
        self._final_root = final_root
        self._overwrite = overwrite

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, overwrite: bool = False, storage_options: dict | None = None,
               kind: str = MEASURED, written_by: str = "virtuplex") -> "DatasetWriter":
        """A new dataset, assembled in a temporary folder beside `root`; use as a context manager."""
        fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        path = normalise_path(fs, path)
        if fs.exists(path) and not overwrite:
            raise StoreError(f"{root}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        fs.makedirs(tmp, exist_ok=False)
        writer = cls(fs, tmp, final_root=path, overwrite=overwrite)
        writer.write_manifest(kind, written_by)
        return writer

    @classmethod
    def open(cls, root: str | os.PathLike, storage_options: dict | None = None, create: bool = True,
             kind: str | None = None, written_by: str = "virtuplex") -> "DatasetWriter":
        """An existing dataset (made if absent when `create`): each write is atomic by itself.

        ``kind`` is recorded in the manifest of a dataset this call creates (and of an existing
        one that has none yet)."""
        fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        if not fs.exists(path):
            if not create:
                raise StoreError(f"{root}: dataset folder does not exist")
            fs.makedirs(path, exist_ok=True)
        writer = cls(fs, path)
        if kind is not None and not fs.exists(writer.target(MANIFEST)):
            writer.write_manifest(kind, written_by)
        return writer

    def write_manifest(self, kind: str, written_by: str) -> None:
        self.write_bytes(MANIFEST, (json.dumps(manifest(kind, written_by), indent=1) + "\n").encode())

    def locked(self) -> contextlib.AbstractContextManager:
        """This dataset's inter-process write lock (re-entrant): hold it around read-modify-write."""
        return dataset_lock(self._final_root or self.root, self.fs)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if self._final_root is None:
            return
        if exc_type is not None:
            self.fs.rm(self.root, recursive=True)
            return
        self.commit()

    def commit(self) -> None:
        """Move the assembled dataset into place (replacing an old one only when overwrite was set)."""
        final = self._final_root
        if final is None:
            return
        old = None
        if self.fs.exists(final):
            if not self._overwrite:
                self.fs.rm(self.root, recursive=True)
                raise StoreError(f"{final}: appeared while writing; not replaced")
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            self.fs.mv(final, old, recursive=True)
        self.fs.mv(self.root, final, recursive=True)
        if old is not None:
            self.fs.rm(old, recursive=True)
        self.root, self._final_root = final, None

    # -- atomic primitives -------------------------------------------------------------------
    def target(self, rel: str) -> str:
        """Where ``rel`` lives in the dataset being written."""
        return join_path(self.root, rel)

    @contextlib.contextmanager
    def atomic_path(self, rel: str) -> Iterator[str]:
        """A temporary path to write ``rel`` to; renamed onto ``rel`` when the block succeeds."""
        target = self.target(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{target.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            yield tmp
            if self.fs.exists(target):
                if self.fs.isdir(target):
                    self.fs.rm(target, recursive=True)
            self.fs.mv(tmp, target, recursive=True)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_path(rel) as tmp:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)

    def write_parquet(self, rel: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame | None:
        """The table at ``rel`` as written so far, or None."""
        target = self.target(rel)
        if not self.fs.exists(target):
            return None
        with self.fs.open(target, "rb") as f:
            return pd.read_parquet(io.BytesIO(f.read()))

    def remove(self, rel: str) -> None:
        target = self.target(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def _write_npz(self, rel: str, mask: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, mask=mask)
        self.write_bytes(rel, buf.getvalue())

    # -- pieces ------------------------------------------------------------------------------
    def write_image(self, modality: str, tissue_id: str, image: np.ndarray, mpp: float, channel_names: Sequence[str]) -> str:
        image = np.asarray(image)
        if modality == "he" and (image.shape[0] != 3 or image.dtype != np.uint8):
            raise StoreError(f"H&E image for {tissue_id!r} must be (3,Y,X) uint8, got {image.shape} {image.dtype}")
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise StoreError(f"{modality} image for {tissue_id!r} holds NaN or inf pixels; replace them before writing")
        rel = layout.image_path(modality, mpp, tissue_id)
        with self.atomic_path(rel) as tmp:
            write_ome_zarr(self.fs, tmp, image, mpp, channel_names, name=tissue_id)
        return self.target(rel)

    def write_channels(self, modality: str, df: pd.DataFrame) -> None:
        if "channel_name" not in df.columns:
            raise StoreError(f"channels table for {modality!r} needs a 'channel_name' column")
        names = [str(n) for n in df["channel_name"]]
        if len(set(names)) != len(names) or any(not n.strip() for n in names):
            raise StoreError(f"channels table for {modality!r}: channel names must be unique and non-empty")
        self.write_parquet(layout.channels_path(modality), df.reset_index(drop=True))

    def write_channels_per_tissue(self, modality: str, df: pd.DataFrame) -> None:
        self.write_parquet(layout.channels_per_tissue_path(modality), df)

    def update_channels_per_tissue(self, modality: str, rows: pd.DataFrame) -> None:
        with self.locked():
            old = self.read_parquet(layout.channels_per_tissue_path(modality))
            new = rows if old is None else pd.concat([old.drop(index=[i for i in rows.index if i in old.index]), rows])
            self.write_channels_per_tissue(modality, new.where(new.notna(), False).astype(bool))

    def write_tissue_mask(self, tissue_id: str, mpp: float, mask: np.ndarray) -> None:
        self._write_npz(layout.tissue_mask_path(mpp, tissue_id), np.asarray(mask).astype(bool))

    def write_cell_mask(self, tissue_id: str, mpp: float, mask: np.ndarray) -> None:
        self._write_npz(layout.cell_mask_path(mpp, tissue_id), instance_ids(mask, f"cell mask of {tissue_id!r}"))

    def write_tissues(self, df: pd.DataFrame) -> None:
        if "tissue_id" not in df.columns:
            raise StoreError("tissues table needs a 'tissue_id' column")
        for tid in df["tissue_id"]:
            layout.check_tissue_id(str(tid))
        if df["tissue_id"].duplicated().any():
            raise StoreError(f"tissues table has duplicate tissue ids: {sorted(set(df['tissue_id'][df['tissue_id'].duplicated()]))}")
        self.write_parquet(layout.TISSUES_TABLE, df.reset_index(drop=True))

    def append_tissues(self, df: pd.DataFrame, replace: bool = False) -> None:
        """Add rows (``replace``: rows of the same tissue ids are replaced, their other columns kept)."""
        with self.locked():
            old = self.read_parquet(layout.TISSUES_TABLE)
            if old is not None:
                clash = sorted(set(old["tissue_id"]) & set(df["tissue_id"]))
                if clash and not replace:
                    raise StoreError(f"{self.target(layout.TISSUES_TABLE)}: tissue ids already present: {clash}; "
                                     "use --overwrite to replace")
                old = old[~old["tissue_id"].isin(df["tissue_id"])]
                df = pd.concat([old, df], ignore_index=True)
            self.write_tissues(df)

    def write_cells(self, df: pd.DataFrame) -> None:
        missing = {"tissue_id", "cell_id"} - set(df.columns)
        if missing:
            raise StoreError(f"cells table lacks columns {sorted(missing)}")
        self.write_parquet(layout.CELLS_TABLE, df.reset_index(drop=True))

    def append_cells(self, df: pd.DataFrame) -> None:
        """Replace the rows of ``df``'s tissues by ``df``."""
        with self.locked():
            old = self.read_parquet(layout.CELLS_TABLE)
            if old is not None:
                old = old[~old["tissue_id"].isin(set(df["tissue_id"]))]
                df = pd.concat([old, df], ignore_index=True)
            self.write_cells(df)

    def write_embedding(self, uniprot_id: str, tensor: Any) -> None:
        tensor = torch.as_tensor(tensor, dtype=torch.float32).reshape(-1).clone()
        buf = io.BytesIO()
        torch.save(tensor, buf)
        self.write_bytes(layout.embedding_path(uniprot_id), buf.getvalue())

    def write_standardization(self, modality: str, mpp: float, upper_quantiles: pd.DataFrame, means: pd.Series, stds: pd.Series) -> None:
        base = layout.standardization_dir(modality, mpp)
        uq = upper_quantiles.astype(np.float32)
        uq.index = uq.index.astype(str)
        uq.index.name = "tissue_id"
        self.write_parquet(f"{base}/{layout.UPPER_QUANTILES_FILE}", uq)
        self.write_parquet(f"{base}/{layout.MEANS_FILE}", pd.DataFrame([means.astype(np.float32)]).reset_index(drop=True))
        self.write_parquet(f"{base}/{layout.STDS_FILE}", pd.DataFrame([stds.astype(np.float32)]).reset_index(drop=True))

    def write_tiling(self, mpp: float, df: pd.DataFrame, tile_size: int = 128) -> None:
        missing = {"tissue_id", "row", "col"} - set(df.columns)
        if missing:
            raise StoreError(f"tiling table lacks columns {sorted(missing)}")
        self.write_parquet(layout.tiling_path(mpp, tile_size), df.reset_index(drop=True))
