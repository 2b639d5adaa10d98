"""Reader and atomic writer for the harmonized dataset layout (see `datamodules.layout`).

Every image the project reads or writes goes through here, so that a synthetic tissue, an ingested
slide and a model's prediction are read back by the same code. Design choices:

* Images are OME-Zarr v3 (`c,y,x`), sharded (shard `C×1024×1024`, inner chunk `C×256×256`) with
  blosc-lz4-bitshuffle, like the VirTues example dataset; a crop is a partial read of the inner
  chunks it touches, never of the whole image.
* Zarr silently returns the fill value for a chunk whose file is absent. For a measured image that
  is data loss, so reads check that every shard file they touch exists and raise
  :class:`MissingChunkError` naming the file otherwise.
* Writes are atomic: a new dataset is assembled in a hidden temporary folder and renamed into place
  when complete; additions to an existing dataset write each file under a temporary name first.
* Paths are fsspec URLs or local paths, so datasets can live on object storage.

`python -m datamodules.store info DIR` prints a summary and every problem found.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from datamodules import layout
from datamodules.dataset_lock import dataset_lock
from datamodules.limits import ImageTooLargeError, check_in_memory
from datamodules.provenance import MANIFEST, MEASURED, manifest
from lightning_modules.components.model_files import load_tensor_file

SHARD_YX = 1024
CHUNK_YX = 256


class StoreError(RuntimeError):
    """A dataset folder is missing a piece or holds an inconsistent one."""


class MissingChunkError(StoreError):
    """An image's chunk file is absent: reading it would silently return zeros."""


@dataclasses.dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.path}: {self.message}"


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


def _normalise(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Collapse `a/../b` for local paths so messages show the real location."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return os.path.normpath(path) if protocol in ("file", "local") else path.rstrip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


class ImageArray:
    """A lazily opened OME-Zarr image: metadata at open, pixels only on `read`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, mpp: float, opened_store: Any | None = None):
        import zarr

        self.fs = fs
        self.path = path
        self.mpp = mpp
        if not fs.exists(_join(path, "zarr.json")):
            raise StoreError(f"{path}: not an OME-Zarr v3 image (no zarr.json)")
        store = opened_store if opened_store is not None else zarr_store(fs, path, read_only=True)
        try:
            group = zarr.open_group(store=store, mode="r")
            self._array = group["0"]
        except Exception as exc:  # zarr raises many types for broken metadata
            raise StoreError(f"{path}: cannot open the image metadata ({type(exc).__name__}: {exc})") from exc
        attrs = dict(group.attrs)
        omero = attrs.get("ome", attrs).get("omero", {}) if isinstance(attrs.get("ome", attrs), dict) else {}
        self.channel_names: list[str] = [c.get("label", str(i)) for i, c in enumerate(omero.get("channels", []))]
        self._shard_shape = tuple(self._array.shards or self._array.chunks)
        self._present_shards: set[tuple[int, ...]] = set()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    @property
    def inner_chunk_shape(self) -> tuple[int, int, int]:
        """The unit zarr decodes: (C, 256, 256) inner chunks of the sharded layout."""
        return tuple(self._array.chunks)  # type: ignore[return-value]

    def shard_files(self, y0: int = 0, x0: int = 0, y1: int | None = None, x1: int | None = None) -> list[tuple[tuple[int, ...], str]]:
        """Shard index tuples and file paths that the region [y0:y1, x0:x1] (all channels) touches."""
        c, h, w = self.shape
        y1 = h if y1 is None else y1
        x1 = w if x1 is None else x1
        sc, sy, sx = self._shard_shape
        out = []
        for ci, yi, xi in itertools.product(
            range(0, (c + sc - 1) // sc), range(y0 // sy, (max(y1, y0 + 1) - 1) // sy + 1), range(x0 // sx, (max(x1, x0 + 1) - 1) // sx + 1)
        ):
            out.append(((ci, yi, xi), _join(self.path, "0", "c", str(ci), str(yi), str(xi))))
        return out

    def missing_shards(self) -> list[str]:
        return [p for _, p in self.shard_files() if not self.fs.exists(p)]

    def _check_shards(self, y0: int, x0: int, y1: int, x1: int) -> None:
        for key, path in self.shard_files(y0, x0, y1, x1):
            if key in self._present_shards:
                continue
            if not self.fs.exists(path):
                raise MissingChunkError(
                    f"{self.path}: chunk file '0/c/{'/'.join(map(str, key))}' is missing, so its pixels are unavailable "
                    f"(zarr would silently return zeros). Re-copy or re-ingest this image."
                )
            self._present_shards.add(key)

    def read(self, y: int, x: int, h: int, w: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """Partial read of `[channels, y:y+h, x:x+w]`; only the inner chunks it touches are decoded."""
        c, height, width = self.shape
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"{self.path}: crop y={y} x={x} h={h} w={w} is outside the image of size {height}×{width}")
        channels = None if channels is None else list(channels)
        n_channels = c if channels is None else len(channels)
        try:
            check_in_memory((n_channels, h, w), self.dtype, self.path, "Read it in crops (ImageArray.read) or tiles.")
        except ImageTooLargeError as exc:
            raise StoreError(str(exc)) from None
        self._check_shards(y, x, y + h, x + w)
        try:
            if channels is None:
                return np.asarray(self._array[:, y : y + h, x : x + w])
            idx = channels
            if idx and idx == list(range(idx[0], idx[-1] + 1)):
                return np.asarray(self._array[idx[0] : idx[-1] + 1, y : y + h, x : x + w])
            return np.asarray(self._array.get_orthogonal_selection((idx, slice(y, y + h), slice(x, x + w))))
        except (IndexError, TypeError):
            raise
        except Exception as exc:  # codec / checksum / short-read errors surface deep inside zarr
            files = ", ".join(f"'0/c/{'/'.join(map(str, k))}'" for k, _ in self.shard_files(y, x, y + h, x + w))
            raise StoreError(
                f"{self.path}: chunk file(s) {files} are corrupt or truncated ({type(exc).__name__}: {exc}). "
                "Re-copy or re-ingest this image."
            ) from exc

    def read_all(self) -> np.ndarray:
        c, h, w = self.shape
        return self.read(0, 0, h, w)


def zarr_store(fs: fsspec.AbstractFileSystem, path: str, read_only: bool) -> Any:
    import zarr

    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore(fs=_async_wrap(fs), path=path, read_only=read_only)


def _async_wrap(fs: fsspec.AbstractFileSystem) -> Any:
    """zarr's FsspecStore wants an async filesystem; wrap a sync one when needed."""
    if getattr(fs, "async_impl", False):
        return fs
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return AsyncFileSystemWrapper(fs)


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
        self.root = _normalise(self.fs, self.root)
        if not self.fs.isdir(self.root):
            raise StoreError(f"{self.url}: dataset folder does not exist")
        self._cache: dict[str, Any] = {}

    # ---- small helpers --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.rstrip("/").split("/")[-1]

    def path(self, rel: str) -> str:
        return _join(self.root, rel)

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
            if self.fs.exists(_join(entry, "channels.parquet")) or (name == "he" and self.fs.isdir(entry)):
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

    def embedding(self, uniprot_id: str) -> "torch.Tensor":  # noqa: F821
        import torch

        rel = layout.embedding_path(uniprot_id)
        if not self.exists(rel):
            raise StoreError(f"{self.path(rel)}: no marker embedding for {uniprot_id}; compute it with "
                             "`python -m experiments.marker_embeddings`")
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
        problems: list[Problem] = []

        def add(sev: str, rel: str, msg: str) -> None:
            problems.append(Problem(sev, self.path(rel), msg))

        tissue_ids: list[str] = []
        try:
            tissues = self.tissues()
            tissue_ids = [str(t) for t in tissues["tissue_id"]]
            if tissues["tissue_id"].duplicated().any():
                add("error", layout.TISSUES_TABLE, f"duplicate tissue ids {sorted(set(tissues['tissue_id'][tissues['tissue_id'].duplicated()]))}")
            if "split" not in tissues.columns:
                add("warning", layout.TISSUES_TABLE, "no 'split' column: train/val/test cannot be chosen")
            for tid in tissue_ids:
                try:
                    layout.check_tissue_id(tid)
                except ValueError as exc:
                    add("error", layout.TISSUES_TABLE, str(exc))
        except StoreError as exc:
            problems.append(Problem("error", self.path(layout.TISSUES_TABLE), str(exc).split(": ", 1)[-1]))
        embeddings = set(self.embedding_ids())
        modalities = self.modalities()
        if not modalities:
            add("error", "", "no modality folder with a channels.parquet")
        for modality in modalities:
            try:
                channels = self.channels(modality)
            except StoreError as exc:
                add("error", layout.channels_path(modality), str(exc).split(": ", 1)[-1])
                continue
            names = [str(n) for n in channels["channel_name"]]
            if len(set(names)) != len(names) or any(not n.strip() for n in names):
                add("error", layout.channels_path(modality), "channel names must be unique and non-empty")
            if modality != "he" and "uniprot_id" in channels.columns:
                ids = [u for u in channels["uniprot_id"] if isinstance(u, str) and u]
                lacking = [u for u in ids if u not in embeddings]
                no_id = [n for n, u in zip(names, channels["uniprot_id"]) if not (isinstance(u, str) and u)]
                if lacking:
                    add("warning", "marker_embeddings", f"{modality}: no embedding for {len(lacking)} UniProt ids: {', '.join(lacking)}")
                if no_id:
                    add("warning", layout.channels_path(modality), f"channels without a UniProt id (unusable by VirTues): {', '.join(no_id)}")
            try:
                resolutions = self.resolutions(modality)
            except StoreError as exc:
                add("error", modality, str(exc))
                continue
            for mpp in resolutions:
                for tid in self.image_ids(modality, mpp):
                    rel = layout.image_path(modality, mpp, tid)
                    try:
                        img = self.image(modality, tid, mpp)
                    except StoreError as exc:
                        add("error", rel, str(exc).split(": ", 1)[-1])
                        continue
                    if tissue_ids and tid not in tissue_ids:
                        add("warning", rel, "image of a tissue absent from metadata/tissues.parquet")
                    if img.shape[0] != len(names):
                        add("error", rel, f"image has {img.shape[0]} channels but {layout.channels_path(modality)} lists {len(names)}")
                    for missing in img.missing_shards():
                        add("error", rel, f"chunk file '{missing[len(img.path) + 1:]}' is missing (pixels unavailable)")
                    for kind, mask in (("tissue mask", self._safe(self.tissue_mask, tid, mpp, problems, layout.tissue_mask_path(mpp, tid))),
                                       ("cell mask", self._safe(self.cell_mask, tid, mpp, problems, layout.cell_mask_path(mpp, tid)))):
                        if mask is not None and tuple(mask.shape) != tuple(img.shape[1:]):
                            add("error", layout.tissue_mask_path(mpp, tid) if kind == "tissue mask" else layout.cell_mask_path(mpp, tid),
                                f"{kind} shape {tuple(mask.shape)} disagrees with the image's {tuple(img.shape[1:])}")
        return problems

    def _safe(self, fn, tid, mpp, problems, rel):  # type: ignore[no-untyped-def]
        try:
            return fn(tid, mpp)
        except StoreError as exc:
            problems.append(Problem("error", self.path(rel), str(exc).split(": ", 1)[-1]))
            return None


# ============================================================================================
# Writing
# ============================================================================================


def omero_attrs(name: str, channel_names: Sequence[str], mpp: float) -> dict:
    palette = ["FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FFFFFF"]
    return {
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "name": name,
                    "axes": [
                        {"name": "c", "type": "channel"},
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp, mpp]}]}],
                }
            ],
            "omero": {
                "id": 1,
                "name": name,
                "version": "0.5",
                "channels": [
                    {"active": True, "coefficient": 1.0, "color": palette[i % len(palette)], "family": "linear",
                     "inverted": False, "label": str(c)}
                    for i, c in enumerate(channel_names)
                ],
            },
        }
    }


def write_ome_zarr(fs: fsspec.AbstractFileSystem, path: str, image: np.ndarray, mpp: float, channel_names: Sequence[str],
                   name: str | None = None) -> None:
    """Write `image` (C,Y,X) as an OME-Zarr v3 image at `path` (not atomic by itself)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    if image.ndim != 3:
        raise ValueError(f"{path}: image must be (C,Y,X), got shape {image.shape}")
    if len(channel_names) != image.shape[0]:
        raise ValueError(f"{path}: {image.shape[0]} channels but {len(channel_names)} channel names")
    c, h, w = image.shape
    store = zarr_store(fs, path, read_only=False)
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    group.attrs.update(omero_attrs(name or path.rstrip("/").split("/")[-1].replace(".ome.zarr", ""), channel_names, mpp))
    shard = (c, min(SHARD_YX, _round_up(h, CHUNK_YX)), min(SHARD_YX, _round_up(w, CHUNK_YX)))
    chunk = (c, min(CHUNK_YX, shard[1]), min(CHUNK_YX, shard[2]))
    arr = group.create_array(
        "0", shape=image.shape, dtype=image.dtype, chunks=chunk, shards=shard,
        # blosc as in the VirTues example; a crc32c per inner chunk makes silent corruption a read error
        compressors=[BloscCodec(typesize=image.dtype.itemsize, cname="lz4", clevel=3, shuffle="bitshuffle"), Crc32cCodec()],
        dimension_names=("c", "y", "x"), fill_value=0, config={"write_empty_chunks": True},
    )
    arr[...] = image


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


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
        path = _normalise(fs, path)
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
        return _join(self.root, rel)

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
        import torch

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


# ============================================================================================
# `python -m datamodules.store info DIR`
# ============================================================================================


def info(root: str) -> int:
    """Print a human summary of a dataset folder; return 1 when something required is missing."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    store = DatasetStore(root)  # a missing folder is a user error: one line on stderr, exit 2
    console.print(f"[bold]dataset[/bold] {store.name}  ({store.url})")
    problems = store.validate()
    try:
        tissues = store.tissues()
        split = tissues["split"].value_counts().to_dict() if "split" in tissues.columns else {"(no split column)": len(tissues)}
        console.print(f"tissues: {len(tissues)}  per split: {split}")
    except StoreError:
        tissues = None
    cells = store.cells()
    if cells is not None:
        per = cells.groupby("tissue_id").size() if "tissue_id" in cells.columns else pd.Series(dtype=int)
        console.print(f"cells: {len(cells)}" + (f"  ({per.min()}–{per.max()} per tissue over {len(per)} tissues)" if len(per) > 1 else ""))
    embeddings = set(store.embedding_ids())
    console.print(f"marker embeddings: {len(embeddings)}")
    for modality in store.modalities():
        try:
            channels = store.channels(modality)
        except StoreError:
            continue
        table = Table(title=f"{modality}: {len(channels)} channels", show_lines=False)
        for col in ("#", "channel", "UniProt", "embedding"):
            table.add_column(col)
        for i, row in enumerate(channels.itertuples(index=False)):
            uid = getattr(row, "uniprot_id", None)
            uid = uid if isinstance(uid, str) and uid else None
            table.add_row(str(i), str(row.channel_name), uid or "—", "yes" if uid in embeddings else ("—" if uid is None else "[yellow]missing[/yellow]"))
        console.print(table)
        for mpp in store.resolutions(modality):
            for tid in store.image_ids(modality, mpp):
                try:
                    img = store.image(modality, tid, mpp)
                    console.print(f"  image {modality}/{layout.resolution_folder(mpp)}/{tid}: shape {img.shape} {img.dtype}")
                except StoreError as exc:
                    console.print(f"  image {tid}: [red]{exc}[/red]")
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    for p in warnings:
        console.print(f"[yellow]warning[/yellow] {p.path}: {p.message}")
    for p in errors:
        console.print(f"[red]error[/red] {p.path}: {p.message}")
    console.print(f"{len(errors)} error(s), {len(warnings)} warning(s)")
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    from datamodules.command_errors import run_command

    parser = argparse.ArgumentParser(prog="python -m datamodules.store", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="summarise a dataset folder and list every problem")
    p_info.add_argument("root", help="dataset folder (local path or fsspec URL)")
    p_info.add_argument("--json", action="store_true", help="print problems as JSON lines instead")
    args = parser.parse_args(argv)

    def json_info() -> int:
        problems = DatasetStore(args.root).validate()
        for p in problems:
            print(json.dumps(dataclasses.asdict(p)))
        return 1 if any(p.severity == "error" for p in problems) else 0

    return run_command(json_info if args.json else lambda: info(args.root))


if __name__ == "__main__":
    sys.exit(main())
