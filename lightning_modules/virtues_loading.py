"""A VirTues model ready to encode a dataset: the checkpoint (or official weights), the marker table
rebuilt for that dataset's panel, and which of its channels the model can read.

Shared by the reconstruction evaluation, token extraction and retrieval. Why the table is rebuilt:
a checkpoint's marker table holds the markers it was trained on, in its own order; a dataset may
add markers it never saw (zero-shot, by their ESM-2 embeddings) and lack others. Channels without
a UniProt id, with ``qc_pass`` false or without an embedding are left out and reported with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from analysis.virtues_reconstruction import MarkerVocabulary, ReconstructionError, build_marker_vocabulary
from datamodules import layout
from datamodules.store import DatasetStore, StoreError
from lightning_modules.components.marker_embeddings import list_marker_ids, load_marker_embeddings
from lightning_modules.components.model_files import load_torch_file, require_kind
from lightning_modules.components.virtues import VirTues
from lightning_modules.virtues import load_virtues_module

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # VirTues
    trained_ids: list[str] | None  # None: official weights, no stored marker order
    data_hparams: dict
    source: str


def load_model(ckpt: str | Path, config: str | Path | None = None, official_ids_from: Sequence[str] = (),
               trust: bool = False, command: str = "this command") -> LoadedModel:
    """A Lightning checkpoint of :class:`VirTuesModule`, or official ``model.safetensors`` (+ ``config``).

    Lightning checkpoints are read with ``weights_only=True`` (no code from the file runs) unless
    ``trust``; a ROSIE checkpoint is refused by name."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt {ckpt}: no such file")
    if ckpt.is_dir() or ckpt.suffix == ".safetensors":
        if ckpt.suffix == ".safetensors":
            require_kind(ckpt, {"state_dict": load_torch_file(ckpt)}, ("virtues-official", "virtues"), command)
        model = VirTues.from_pretrained(ckpt, config=config)
        ids = None
        if official_ids_from:  # the official table = sorted listing of its embedding folder
            ids = sorted({u for folder in official_ids_from for u in list_marker_ids(folder)})
        return LoadedModel(model, ids, {}, str(ckpt))
    raw = load_torch_file(ckpt, trust=trust, mmap=True)
    kind = require_kind(ckpt, raw, ("virtues",), command)
    if kind is None or "state_dict" not in raw:
        raise ReconstructionError(f"{ckpt}: not a Lightning checkpoint of VirTuesModule (no 'state_dict'); pass official "
                                  "weights as model.safetensors (+ --config)")
    # marker_table_dir / pretrained_weights may point at files of the training machine: the state dict
    # holds every weight, and the table is rebuilt below from the evaluated datasets.
    module = load_virtues_module(ckpt, trust=trust)
    ids = raw.get("virtues_marker_uniprot_ids") or raw.get("hyper_parameters", {}).get("marker_uniprot_ids")
    if not ids:
        raise ReconstructionError(f"{ckpt}: the checkpoint stores no marker table order (virtues_marker_uniprot_ids); "
                                  "it was not written by VirTuesModule after the DataModule set its table")
    return LoadedModel(module.model, list(ids), dict(raw.get("datamodule_hyper_parameters", {}) or {}), str(ckpt))


def available_embeddings(stores: Sequence[DatasetStore], folders: Sequence[str | Path] = ()) -> dict[str, torch.Tensor]:
    """UniProt id -> embedding from the datasets' ``marker_embeddings`` then the extra folders (first wins)."""
    out: dict[str, torch.Tensor] = {}
    for store in stores:
        for uid in store.embedding_ids():
            out.setdefault(uid, store.embedding(uid))
    for folder in folders:
        table, ids = load_marker_embeddings(folder, expected_dim=None)
        for uid, row in zip(ids, table):
            out.setdefault(uid, row)
    return out


def uniprot_id_or_none(value: Any) -> str | None:
    """The value when it is a UniProt accession (channels without one are not usable by VirTues)."""
    return str(value) if isinstance(value, str) and layout.is_uniprot_id(value) else None


def channel_plan(store: DatasetStore, modality: str, vocab: MarkerVocabulary) -> tuple[list[int], list[dict]]:
    """Positions of the evaluated channels, and one skipped-marker row (with its reason) per other channel."""
    channels = store.channels(modality)
    keep, skipped = [], []
    for i, row in channels.reset_index(drop=True).iterrows():
        name, raw_uid = str(row["channel_name"]), row.get("uniprot_id")
        uid = uniprot_id_or_none(raw_uid)
        reason = None
        qc = row.get("qc_pass", True)
        if not pd.isna(qc) and not bool(qc):
            reason = "qc_pass is false"
        elif uid is None:
            reason = "no valid UniProt id in channels.parquet"
        elif uid in vocab.missing_trained:
            reason = "in the checkpoint's table but no embedding file was found (pass --embeddings)"
        elif not vocab.usable(uid):
            reason = "no marker embedding (<UniProtID>.pt) in any marker_embeddings folder"
        if reason:
            skipped.append({"dataset": store.name, "marker": name, "uniprot_id": None if pd.isna(raw_uid) else str(raw_uid),
                            "reason": reason})
        else:
            keep.append(i)
    return keep, skipped


@dataclass
class PreparedModel:
    """A model in eval mode with its table set for one dataset, and the channels it reads."""

    model: torch.nn.Module
    channels: list[int]  # positions in the dataset's channels.parquet
    marker_rows: list[int]  # their rows in the model's marker table
    device: torch.device
    skipped: list[dict] = field(default_factory=list)  # one row per left-out channel, with the reason
    data_hparams: dict = field(default_factory=dict)  # the DataModule settings the checkpoint trained with


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_model(store: DatasetStore, modality: str, ckpt: str | Path, config: str | Path | None = None,
                  embeddings: Sequence[str | Path] = (), trust: bool = False, device: str = "auto",
                  command: str = "this command") -> PreparedModel:
    """Checkpoint -> model with the marker table rebuilt for ``store``'s panel (as the reconstruction
    evaluation matches markers), the usable channel positions and their table rows."""
    loaded = load_model(ckpt, config, official_ids_from=embeddings, trust=trust, command=command)
    available = available_embeddings([store], embeddings)
    needed = [u for u in (uniprot_id_or_none(v) for v in store.channels(modality).get("uniprot_id", [])) if u]
    vocab = build_marker_vocabulary(loaded.trained_ids, available, needed, False)
    model = loaded.model.eval()
    model.set_marker_table(vocab.embeddings, vocab.uniprot_ids)
    channels, skipped = channel_plan(store, modality, vocab)
    for row in skipped:
        log.info("channel %s left out: %s", row["marker"], row["reason"])
    if not channels:
        raise StoreError(f"{store.url}: no {modality} channel has a usable marker embedding")
    row_of = {u: i for i, u in enumerate(vocab.uniprot_ids)}
    uids = [str(u) for u in store.channels(modality)["uniprot_id"].iloc[channels]]
    return PreparedModel(model, channels, [row_of[u] for u in uids], resolve_device(device), skipped, loaded.data_hparams)
