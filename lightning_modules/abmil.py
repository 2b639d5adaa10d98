"""Tissue classification from frozen VirTues patch-summary tokens with a gated ABMIL (paper Fig. 4e–f).

Training as in the Methods: Adam, learning rate 1e-4, batches of 16 tissues, cross-entropy; the
experiment stops early on the validation loss (patience 10, at most 100 epochs) and reports the
macro-F1 on held-out tissues. The encoder is not here: its tokens are inputs, computed once by
``experiments.virtues_tokens``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.components.abmil import GatedAttentionMIL


class AbmilModule(L.LightningModule):
    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, num_heads: int = 8,
                 dropout: float = 0.0, lr: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.model = GatedAttentionMIL(in_dim, num_classes, hidden_dim, num_heads, dropout)

    def forward(self, bags: Tensor, mask: Tensor) -> Tensor:
        return self.model(bags, mask)[0]

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(self(batch["bags"], batch["mask"]), batch["label"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, batch_size=len(batch["label"]), on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch["label"]), on_epoch=True, prog_bar=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return torch.softmax(self(batch["bags"], batch["mask"]), dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
