"""Tissue classification from frozen VirTues patch-summary tokens with a gated ABMIL (paper Fig. 4e–f).

Training as in the Methods: Adam, learning rate 1e-4, batches of 16 tissues, cross-entropy; the
experiment stops early on the validation loss (patience 10, at most 100 epochs) and reports the
macro-F1 on held-out tissues. The encoder is not here: its tokens are inputs, computed once by
``experiments.virtues_tokens``.

Why the module keeps its best weights: early stopping with patience 10 ends training 10 epochs
*after* the best validation loss, so the weights in memory at the end are the last, not the best.
The module remembers the weights of the epoch with the lowest validation loss (the value
``EarlyStopping`` monitors, computed over the whole validation set) and puts them back when
``fit`` ends, so whatever is predicted next uses the best-validation model.
"""

from __future__ import annotations

import math
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
        self.best_val_loss = math.inf
        self.best_epoch: int | None = None  # epoch whose weights `fit` leaves in the module
        self.val_history: list[float] = []  # validation loss of every epoch (sanity check excluded)
        self._best_state: dict[str, Tensor] | None = None
        self._val_sum, self._val_count = 0.0, 0

    def forward(self, bags: Tensor, mask: Tensor) -> Tensor:
        return self.model(bags, mask)[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["bags"], batch["mask"]), batch["label"])
        self.log("train/loss", loss, batch_size=len(batch["label"]), on_epoch=True, on_step=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = 0.0, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = F.cross_entropy(self(batch["bags"], batch["mask"]), batch["label"], reduction="none")
        self._val_sum += float(losses.sum())
        self._val_count += len(losses)
        self.log("val/loss", losses.mean(), batch_size=len(losses), on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._val_count == 0:
            return
        loss = self._val_sum / self._val_count  # = the batch-size-weighted epoch mean EarlyStopping sees
        self.val_history.append(loss)
        if loss < self.best_val_loss:  # strict, like EarlyStopping with min_delta 0
            self.best_val_loss, self.best_epoch = loss, self.current_epoch
            self._best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def on_fit_end(self) -> None:
        """Leave the best-validation weights in the module (the last epoch's are not the model chosen)."""
        if self._best_state is not None:
            self.load_state_dict(self._best_state)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return torch.softmax(self(batch["bags"], batch["mask"]), dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
