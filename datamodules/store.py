"""Reader of the harmonized dataset layout (see :mod:`datamodules.layout`): the one place that
knows where every piece lives.

Every image the project reads goes through here, so that a synthetic tissue, an ingested slide and
a model's prediction are read back by the same code. Images are lazy OME-Zarr arrays
(:mod:`datamodules.ome_zarr`), tables parquet, masks ``.npz`` (key ``mask``), embeddings ``.pt``
read without unpickling code. Split labels are normalised on read (``Train`` -> ``train``). The
writer is :mod:`datamodules.store_writer`, the checks :mod:`datamodules.store_validation`; both are
re-exported here, so ``from datamodules.store import DatasetStore, DatasetWriter, StoreError`` is the
one import a caller needs. Paths are fsspec URLs or local paths.

``python -m experiments.data_info DIR`` prints a summary and every problem found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch

from datamodules import layout
from datamodules.ome_zarr import CHUNK_YX, SHARD_YX, ImageArray, join_path, normalise_path, omero_attrs, write_ome_zarr, zarr_store
from datamodules.store_errors import MissingChunkError, StoreError
from datamodules.store_validation import Problem, validate_store
from datamodules.store_writer import MAX_CELL_ID, DatasetWriter, instance_ids
from lightning_modules.components.model_files import load_tensor_file

__all__ = ["CHUNK_YX", "SHARD_YX", "DatasetStore", "DatasetWriter", "ImageArray", "MAX_CELL_ID", "MissingChunkError",
           "Problem", "StandardizationStats", "StoreError", "instance_ids", "normalise_split_column", "omero_attrs",
           "write_ome_zarr", "zarr_store"]


@dataclasses.dataclass
class StandardizationStats:
    """Per-image upper quantiles (index tissue_id) and per-dataset channel means/stds."""

    upper_quantiles: pd.DataFrame
    means: pd.Series
    stds: pd.Series

    def for_tissue(self, tissue_id: str, channel_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(upper quantile, mean, std) arrays in `channel_names` order; one-row tables broadcast."""
        uq = self.upper_quantiles
        if tissue_id in uq.index:
            row = uq.loc[tissue_id]
        elif len(uq) == 1:
            row = uq.iloc[0]
        else:
            raise StoreError(f"no upper-quantile row for tissue {tissue_id!r} in the standardization table")
        missing = [c for c in channel_names if c not in row.index or c not in self.means.index]
        if missing:
            raise StoreError(f"standardization statistics lack channels {missing}; recompute them")
        pick = list(channel_names)
        return (
            row[pick].to_numpy(np.float32),
            self.means[pick].to_numpy(np.float32),
            self.stds[pick].to_numpy(np.float32),
        )


def normalise_split_column(splits: pd.Series, tissue_ids: pd.Series, path: str) -> pd.Series:
    """Split labels as ``train``/``val``/``test``; a missing or unknown label is an error naming the
    tissues, never a row silently left out of every split."""
    out, bad = [], []
    for tid, value in zip(tissue_ids, splits):
        try:
            out.append(layout.normalise_split(None if pd.isna(value) else value))
        except ValueError:
            bad.append((str(tid), value))
    if bad:
        shown = ", ".join(f"{t}={v!r}" for t, v in bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise StoreError(f"{path}: split: {len(bad)} tissue(s) have no valid split label ({shown}); "
                         f"use one of {layout.SPLITS} for every tissue")
    return pd.Series(out, index=splits.index, dtype=object)


class DatasetStore:
    """Read access to one dataset folder of the harmonized layout."""

    def __init__(self, root: str | os.PathLike, storage_options: dict | None = None):
        self.url = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = normalise_path(self.fs, self.root)
        if not self.fs.isdir(self.root):
            raise StoreError(f"{self.url}: dataset folder does not exist")
        self._cache: dict[str, Any] = {}

    # ---- small helpers --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.rstrip("/").split("/")[-1]

    def path(self, rel: str) -> str:
        return join_path(self.root, rel)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def _parquet(self, rel: str, required: bool = True) -> pd.DataFrame | None:
        if rel in self._cache:
            return self._cache[rel]
        if not self.exists(rel):
            if required:
                raise StoreError(f"{self.path(rel)}: required table is missing")
            return None
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                df = pd.read_parquet(io.BytesIO(f.read()))
        except Exception as exc:
            raise StoreError(f"{self.path(rel)}: unreadable parquet table ({exc})") from exc
        self._cache[rel] = df
        return df

    def _npz(self, rel: str) -> np.ndarray | None:
        if not self.exists(rel):
            return None
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
                    if "mask" not in data:
                        raise StoreError(f"{self.path(rel)}: npz has no key 'mask' (keys: {list(data.keys())})")
                    return data["mask"]
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{self.path(rel)}: unreadable mask file ({exc})") from exc

    # ---- tables ---------------------------------------------------------------------------
    def tissues(self) -> pd.DataFrame:
        """The tissue table, its ``split`` labels normalised (``Train``/``validation`` -> ``train``/``val``)."""
        key = "tissues:normalised"
        if key in self._cache:
            return self._cache[key]
        df = self._parquet(layout.TISSUES_TABLE)
        assert df is not None
        path = self.path(layout.TISSUES_TABLE)
        if "tissue_id" not in df.columns:
            raise StoreError(f"{path}: column 'tissue_id' is missing; add one id per row")
        if "split" in df.columns:
            df = df.assign(split=normalise_split_column(df["split"], df["tissue_id"], path))
        self._cache[key] = df
        return df

    def tissue_ids(self, split: str | None = None) -> list[str]:
        df = self.tissues()
        if split is not None:
            if "split" not in df.columns:
                raise StoreError(f"{self.path(layout.TISSUES_TABLE)}: column 'split' is missing (train/val/test per tissue)")
            try:
                split = layout.normalise_split(split)
            except ValueError as exc:
                raise StoreError(f"--split: {exc}") from None
            df = df[df["split"] == split]
        return [str(t) for t in df["tissue_id"]]

    def cells(self) -> pd.DataFrame | None:
        return self._parquet(layout.CELLS_TABLE, required=False)

    def modalities(self) -> list[str]:
        out = []
        for entry in self.fs.ls(self.root, detail=False):
            name = entry.rstrip("/").split("/")[-1]
            if self.fs.exists(join_path(entry, "channels.parquet")) or (name == "he" and self.fs.isdir(entry)):
                out.append(name)
        return sorted(out)

    def channels(self, modality: str) -> pd.DataFrame:
        rel = layout.channels_path(modality)
        if modality == "he" and not self.exists(rel):
            return pd.DataFrame({"channel_name": ["R", "G", "B"], "uniprot_id": [None] * 3})
        df = self._parquet(rel)
        assert df is not None
        if "channel_name" not in df.columns:
            raise StoreError(f"{self.path(rel)}: column 'channel_name' is missing")
        return df

    def channels_per_tissue(self, modality: str) -> pd.DataFrame | None:
        return self._parquet(layout.channels_per_tissue_path(modality), required=False)

    def resolutions(self, modality: str) -> list[float]:
        base = self.path(modality)
        if not self.fs.isdir(base):
            raise StoreError(f"{base}: modality {modality!r} not in dataset (has {self.modalities()})")
        out = []
        for entry in self.fs.ls(base, detail=False):
            with contextlib.suppress(ValueError):
                out.append(layout.parse_resolution_folder(entry.rstrip("/").split("/")[-1]))
        return sorted(out)

    def _resolve_mpp(self, modality: str, mpp: float | None) -> float:
        if mpp is not None:
            return float(mpp)
        res = self.resolutions(modality)
        if not res:
            raise StoreError(f"{self.path(modality)}: no '<res>mpp' folder")
        return res[0]

    def image_ids(self, modality: str, mpp: float | None = None) -> list[str]:
        mpp = self._resolve_mpp(modality, mpp)
        folder = self.path(f"{modality}/{layout.resolution_folder(mpp)}/images")
        if not self.fs.isdir(folder):
            return []
        names = [e.rstrip("/").split("/")[-1] for e in self.fs.ls(folder, detail=False)]
        return sorted(n[: -len(".ome.zarr")] for n in names if n.endswith(".ome.zarr"))

    # ---- arrays ---------------------------------------------------------------------------
    def image(self, modality: str, tissue_id: str, mpp: float | None = None) -> ImageArray:
        mpp = self._resolve_mpp(modality, mpp)
        rel = layout.image_path(modality, mpp, tissue_id)
        if not self.exists(rel):
            raise StoreError(f"{self.path(rel)}: no {modality} image for tissue {tissue_id!r} at {mpp} µm/px")
        img = ImageArray(self.fs, self.path(rel), mpp)
        if not img.channel_names:
            img.channel_names = [str(c) for c in self.channels(modality)["channel_name"]]
        return img

    def tissue_mask(self, tissue_id: str, mpp: float) -> np.ndarray | None:
        mask = self._npz(layout.tissue_mask_path(mpp, tissue_id))
        return None if mask is None else mask.astype(bool)

    def cell_mask(self, tissue_id: str, mpp: float) -> np.ndarray | None:
        mask = self._npz(layout.cell_mask_path(mpp, tissue_id))
        if mask is not None and np.issubdtype(mask.dtype, np.signedinteger) and mask.size and mask.min() < 0:
            raise StoreError(f"{self.path(layout.cell_mask_path(mpp, tissue_id))}: negative cell ids; instance ids must be >= 0")
        return mask

    def embedding_ids(self) -> list[str]:
        folder = self.path("marker_embeddings")
        if not self.fs.isdir(folder):
            return []
        names = [e.rstrip("/").split("/")[-1] for e in self.fs.ls(folder, detail=False)]
        return sorted(n[:-3] for n in names if n.endswith(".pt"))

    def embedding(self, uniprot_id: str) -> torch.Tensor:
        rel = layout.embedding_path(uniprot_id)
        if not self.exists(rel):
            raise StoreError(f"{self.path(rel)}: no marker embedding for {uniprot_id}; compute it with "
                             "`python -m experiments.data_embeddings`")
        with self.fs.open(self.path(rel), "rb") as f:
            data = f.read()
        return load_tensor_file(self.path(rel), data=data)

    def standardization(self, modality: str, mpp: float) -> StandardizationStats | None:
        base = layout.standardization_dir(modality, mpp)
        uq = self._parquet(f"{base}/{layout.UPPER_QUANTILES_FILE}", required=False)
        means = self._parquet(f"{base}/{layout.MEANS_FILE}", required=False)
        stds = self._parquet(f"{base}/{layout.STDS_FILE}", required=False)
        if uq is None or means is None or stds is None:
            return None
        if "tissue_id" in uq.columns:
            uq = uq.set_index("tissue_id")
        return StandardizationStats(uq, means.iloc[0].astype(np.float64), stds.iloc[0].astype(np.float64))

    def tiling(self, mpp: float, tile_size: int = 128) -> pd.DataFrame | None:
        return self._parquet(layout.tiling_path(mpp, tile_size), required=False)

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> list[Problem]:
        """Every missing or inconsistent piece, as a list (empty = valid)."""
        return validate_store(self)
