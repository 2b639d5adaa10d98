"""Bags of patch-summary tokens per tissue, read from an ``experiments.virtues_tokens`` folder.

A bag is every PS token of a tissue's kept 128-px crops (``niches/<tissue>.npz``, key
``patch_tokens``), as float32 (N, d); bags of different sizes are zero-padded in a batch with a
validity mask the ABMIL attention respects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def load_bag(tokens_dir: str | Path, tissue_id: str) -> np.ndarray:
    path = Path(tokens_dir) / "niches" / f"{tissue_id}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokens for tissue {tissue_id!r}; run experiments.virtues_tokens on it")
    with np.load(path) as data:
        if "patch_tokens" not in data:
            raise ValueError(f"{path}: no 'patch_tokens' (written by an older virtues_tokens); rerun it with --overwrite")
        patches = data["patch_tokens"].astype(np.float32)
    return patches.reshape(-1, patches.shape[-1])


class TissueBags(Dataset):
    def __init__(self, bags: Sequence[np.ndarray], labels: Sequence[int]):
        if len(bags) != len(labels):
            raise ValueError(f"{len(bags)} bags but {len(labels)} labels")
        self.bags = [torch.from_numpy(np.asarray(b, dtype=np.float32)) for b in bags]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bags[index], self.labels[index]


def collate_bags(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    n = max(len(b) for b, _ in items)
    d = items[0][0].shape[-1]
    bags = torch.zeros(len(items), n, d)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, (bag, _) in enumerate(items):
        bags[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return {"bags": bags, "mask": mask, "label": torch.stack([y for _, y in items])}
