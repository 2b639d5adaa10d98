"""Fitting a tissue's channels into its dataset's panel, and the marker embeddings that come with it.

Every image of a modality holds all channels of ``channels.parquet`` in table order (what the spora
reader and ``DatasetStore.validate`` expect); ``channels_per_tissue`` says which were measured. A new
image is reordered to the panel, unmeasured channels are zero-filled, and new channels are refused
unless ``--extend-panel`` asks for them (then existing images are padded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datamodules import layout
from datamodules.ingest_files import HE, IngestError
from lightning_modules.components.model_files import load_tensor_file


def merge_panel(store: Any, modality: str, channel_df: pd.DataFrame, arr: np.ndarray, image: Path, extend_panel: bool,
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


def embeddings_to_copy(folder: Path | None, panel_df: pd.DataFrame, store: Any) -> dict[str, Any]:
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
