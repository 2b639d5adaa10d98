"""Every missing or inconsistent piece of a dataset, as a list (``python -m experiments.data_info``).

Apart from the reader so that ``DatasetStore`` stays about reading; the checks use only its public
methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from datamodules import layout
from datamodules.store_errors import StoreError


@dataclasses.dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.path}: {self.message}"


def validate_store(store: Any) -> list[Problem]:
    """Every missing or inconsistent piece, as a list (empty = valid)."""
    problems: list[Problem] = []

    def add(sev: str, rel: str, msg: str) -> None:
        problems.append(Problem(sev, store.path(rel), msg))

    tissue_ids: list[str] = []
    try:
        tissues = store.tissues()
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
        problems.append(Problem("error", store.path(layout.TISSUES_TABLE), str(exc).split(": ", 1)[-1]))
    embeddings = set(store.embedding_ids())
    modalities = store.modalities()
    if not modalities:
        add("error", "", "no modality folder with a channels.parquet")
    for modality in modalities:
        try:
            channels = store.channels(modality)
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
            resolutions = store.resolutions(modality)
        except StoreError as exc:
            add("error", modality, str(exc))
            continue
        for mpp in resolutions:
            for tid in store.image_ids(modality, mpp):
                rel = layout.image_path(modality, mpp, tid)
                try:
                    img = store.image(modality, tid, mpp)
                except StoreError as exc:
                    add("error", rel, str(exc).split(": ", 1)[-1])
                    continue
                if tissue_ids and tid not in tissue_ids:
                    add("warning", rel, "image of a tissue absent from metadata/tissues.parquet")
                if img.shape[0] != len(names):
                    add("error", rel, f"image has {img.shape[0]} channels but {layout.channels_path(modality)} lists {len(names)}")
                for missing in img.missing_shards():
                    add("error", rel, f"chunk file '{missing[len(img.path) + 1:]}' is missing (pixels unavailable)")
                for kind, mask in (("tissue mask", _safe(store, store.tissue_mask, tid, mpp, problems, layout.tissue_mask_path(mpp, tid))),
                                   ("cell mask", _safe(store, store.cell_mask, tid, mpp, problems, layout.cell_mask_path(mpp, tid)))):
                    if mask is not None and tuple(mask.shape) != tuple(img.shape[1:]):
                        add("error", layout.tissue_mask_path(mpp, tid) if kind == "tissue mask" else layout.cell_mask_path(mpp, tid),
                            f"{kind} shape {tuple(mask.shape)} disagrees with the image's {tuple(img.shape[1:])}")
    return problems

def _safe(store: Any, fn, tid, mpp, problems, rel):  # type: ignore[no-untyped-def]
    try:
        return fn(tid, mpp)
    except StoreError as exc:
        problems.append(Problem("error", store.path(rel), str(exc).split(": ", 1)[-1]))
        return None
