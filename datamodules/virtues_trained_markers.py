"""Which markers a VirTues run actually trained on: the "seen" markers of zero-shot evaluation.

Why not the checkpoint's marker table: that table is the union of every ``<UniProtID>.pt`` in the
pretraining datasets' ``marker_embeddings`` folders, and a folder may hold embeddings of markers
no trained channel carries (a channel that failed QC, a panel row without a valid UniProt id, a
file copied in for later use). Counting those as "seen" inflates the seen group of paper Fig. 2h.
A marker is seen when some pretraining dataset with at least one training tissue has a channel of
it that the training DataModule reads: ``qc_pass`` true, a valid UniProt id, an embedding in the
shared table (the rule of ``VirTuesDataModule``; ``tests/test_virtues_zero_shot.py`` checks the two agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from datamodules import layout
from datamodules.store import DatasetStore
from datamodules.virtues import MarkerTable


def trained_markers(data_dirs: Sequence[str], modality: str = "imc", train_split: str = "train") -> set[str]:
    """UniProt ids of the channels a VirTues pretraining run on ``data_dirs`` trained on."""
    stores = [DatasetStore(str(d)) for d in data_dirs]
    table = MarkerTable.from_stores(stores)
    seen: set[str] = set()
    for store in stores:
        if modality not in store.modalities() or not store.tissue_ids(train_split):
            continue
        for _, row in store.channels(modality).iterrows():
            uid, qc = row.get("uniprot_id"), row.get("qc_pass", True)
            if (pd.isna(qc) or bool(qc)) and layout.is_uniprot_id(uid) and uid in table.index:
                seen.add(str(uid))
    return seen


__all__ = ["trained_markers"]
