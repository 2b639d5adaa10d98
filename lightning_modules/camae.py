"""CA-MAE pretraining as a LightningModule: the paper's channel-agnostic baseline on VirTues' batches.

Thin glue around :class:`~lightning_modules.components.camae.CAMAE`. It consumes exactly the batch
:class:`VirTuesModule` does (``datamodules.virtues``: ragged ``images``, ``marker_ids``, ``masks``),
so the two models train on the same crops, channel dropout and masks (the CA-MAE configs set the
data pipeline's ``mask_ratio`` to Kraus et al.'s fixed 0.75).

Training (Kraus et al. 2024, as the VirTues paper says it followed): masked-patch MSE mixed with a
Fourier-magnitude L1 at 0.01 (:func:`camae_loss`); warm-up over 10 % of the steps then cosine
(their OneCycle with ``pct_start`` 0.1, cosine annealing); learning rate 1e-4, weight decay 0.05,
betas (0.9, 0.95). Their optimiser is Lion (timm); AdamW with the same betas is used here so the
baseline does not depend on timm's optimiser and matches VirTues' optimiser family (documented
deviation). Biases and LayerNorm parameters are not decayed.

The per-channel decoders are built when the DataModule installs the marker table (one per row);
``arch.num_channels`` is then stored in the hyper-parameters, so a checkpoint rebuilds the same
decoders before its weights load. The table's UniProt order is stored too (decoder i = marker i).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from lightning_modules.components.camae import CAMAE, CAMAEArch, camae_loss
from lightning_modules.components.model_files import ModelFileError, load_torch_file
from lightning_modules.virtues import lr_factor


class CAMAEModule(L.LightningModule):
    """CA-MAE pretraining on VirTues batches.

    Args:
        arch: the architecture (:class:`CAMAEArch`, or its plain dict as stored in checkpoints).
        lr, warmup_fraction, min_lr_ratio: peak learning rate, linear warm-up share, cosine floor.
        weight_decay, adam_beta1, adam_beta2, adam_eps: AdamW settings (Kraus: wd 0.05, betas 0.9/0.95).
        fourier_weight: mixing factor of the Fourier loss (Kraus: 0.01; 0 = plain masked MSE).
        marker_uniprot_ids: decoder order (set by the DataModule's table; stored in checkpoints).
    """

    def __init__(
        self,
        arch: CAMAEArch = CAMAEArch(),
        lr: float = 1e-4,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        weight_decay: float = 0.05,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.95,
        adam_eps: float = 1e-8,
        fourier_weight: float = 0.01,
        marker_uniprot_ids: list[str] | None = None,
    ) -> None:
        super().__init__()
        config = CAMAEArch.from_dict(arch) if isinstance(arch, Mapping) else arch
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if not 0.0 <= fourier_weight < 1.0:
            raise ValueError(f"fourier_weight must be in [0, 1), got {fourier_weight}")
        arch = config.to_dict()  # plain values: checkpoints are read with weights_only=True
        self.save_hyperparameters()
        self.model = CAMAE(config)
        if marker_uniprot_ids:
            self.model.marker_uniprot_ids = list(marker_uniprot_ids)

    # ---- marker table (one decoder per row) ------------------------------------------------------
    def set_marker_table(self, embeddings: Tensor, uniprot_ids: Sequence[str], source_dir: str | None = None) -> None:
        """Called by the CLI with the DataModule's table: builds the per-channel decoders."""
        self.model.set_marker_table(embeddings, uniprot_ids)
        self.hparams["arch"] = self.model.arch.to_dict()
        self.hparams["marker_uniprot_ids"] = list(self.model.marker_uniprot_ids)

    # ---- forward / loss --------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor], marker_ids: Sequence[Tensor], masks: Sequence[Tensor] | None = None):
        return self.model(images, marker_ids, masks)

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        for key in ("images", "marker_ids", "masks"):
            if batch.get(key) is None:
                raise KeyError(f"CA-MAE batch is missing {key!r}; expected the VirTues DataModule's batch "
                               "(images, marker_ids, masks drawn by VirTuesCropDataset(masking=True))")
        out = self.model(batch["images"], batch["marker_ids"], batch["masks"])
        return camae_loss(out.decoded, batch["images"], batch["masks"], self.model.patch_size, self.hparams.fourier_weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, mse, fourier = self._losses(batch)
        n = len(batch["images"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/masked_mse", mse, batch_size=n)
        self.log("train/fourier", fourier, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, mse, _ = self._losses(batch)
        n = len(batch["images"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/masked_mse", mse, sync_dist=True, batch_size=n)
        return loss

    # ---- optimisation ----------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        ln = {id(p) for m in self.model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or id(p) in ln or p.dim() < 2 else decay).append(p)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if self.model.num_channels == 0:
            raise RuntimeError("CA-MAE decoders are built from the marker table: install it before training "
                               "(experiments.camae_pretrain does) or set model.arch.num_channels")
        opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps)
        total = self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total) or total <= 0:
            raise ValueError("the cosine schedule needs a finite number of steps: set trainer max_steps or max_epochs")
        total = int(total)
        warmup = int(round(hp.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def load_camae_module(path: str | os.PathLike, trust: bool = False) -> CAMAEModule:
    """A :class:`CAMAEModule` from its Lightning checkpoint (safe loader; strict weights), eval mode off."""
    raw = load_torch_file(path, trust=trust, mmap=True)
    hp = raw.get("hyper_parameters") if isinstance(raw, Mapping) else None
    if not isinstance(hp, Mapping) or not isinstance(raw.get("state_dict"), Mapping) or "fourier_weight" not in hp:
        raise ModelFileError(f"{path}: not a Lightning checkpoint of CAMAEModule")
    try:
        module = CAMAEModule(**{k: v for k, v in hp.items() if not k.startswith("_")})
        module.load_state_dict(raw["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: does not match CAMAEModule ({str(e).splitlines()[0]})") from None
    return module


__all__ = ["CAMAEModule", "load_camae_module"]
