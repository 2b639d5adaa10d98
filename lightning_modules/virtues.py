"""VirTues masked-autoencoder pretraining as a LightningModule (thin glue around ``VirTues``).

Batch format (from the DataModule)::

    {"images": list[Tensor(C_b, H, W)], "marker_ids": list[LongTensor(C_b)],
     "masks": list[BoolTensor(C_b, H/8, W/8)]}   # "masks" optional: generated here if absent

Training choices (official code unless noted; ``shared/docs/virtues-official-layout.md`` 3.4):

- Loss: MSE over ALL pixels of all channels (masked and visible), i.e. the mean over
  ``sum_b C_b * H * W`` values, so samples with more channels weigh more (paper and code agree).
- AdamW (0.9, 0.999, eps 1e-8), lr 2e-4, per-step linear warm-up over ``warmup_fraction`` of the
  total steps (``trainer.estimated_stepping_batches``) then cosine to ``min_lr_ratio * lr``.
- Weight decay (documented choice): NOT applied to biases and LayerNorm parameters, but applied to
  the two learned token vectors (patch-summary and mask token), as Hugging Face Trainer does in the
  official run; ``weight_decay_on_tokens=False`` excludes them like other 1-d parameters.
- Weight decay value: official code 0.01 constant (default here); the paper reports a cosine
  schedule starting at 0.04 (end value not stated) -> ``weight_decay: 0.04, wd_schedule: cosine,
  wd_end: ...``. Gradient clipping (1.0) and fp16 AMP are Trainer settings.

The marker (ESM) table is an input, not a weight: it is loaded from ``marker_table_dir`` or set by
the DataModule through :meth:`VirTuesModule.set_marker_table`. The UniProt id order is stored in
the hyper-parameters so a checkpoint reloads with the same marker indices; the table values come
from the files again.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.virtues import VirTues, independent_masks_for_batch


class VirTuesModule(L.LightningModule):
    def __init__(
        self,
        d_model: int = 512,
        encoder_heads: int = 8,
        decoder_heads: int = 8,
        ffn_dim: int = 1024,
        encoder_pattern: str = "hvhvhvhvhvhvhvhv",
        decoder_pattern: str = "ffff",
        patch_size: int = 8,
        esm_dim: int = 640,
        dropout: float = 0.0,
        attention_backend: str = "auto",
        lr: float = 2e-4,
        min_lr_ratio: float = 0.0,
        warmup_fraction: float = 0.1,
        weight_decay: float = 0.01,
        wd_schedule: str = "constant",
        wd_end: float = 0.0,
        weight_decay_on_tokens: bool = True,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_eps: float = 1e-8,
        mask_ratio_min: float = 0.6,
        mask_ratio_max: float = 1.0,
        val_mask_seed: int = 1234,
        marker_table_dir: str | None = None,
        marker_uniprot_ids: list[str] | None = None,
        pretrained_weights: str | None = None,
    ) -> None:
        """Sizes default to the released VirTues; ``pretrained_weights`` = an official-layout
        ``.safetensors`` file to start from (loaded strictly)."""
        super().__init__()
        if wd_schedule not in ("constant", "cosine"):
            raise ValueError(f"wd_schedule must be 'constant' or 'cosine', got {wd_schedule!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.save_hyperparameters()
        arch = dict(
            d_model=d_model, encoder_heads=encoder_heads, decoder_heads=decoder_heads, ffn_dim=ffn_dim,
            encoder_pattern=encoder_pattern, decoder_pattern=decoder_pattern, patch_size=patch_size,
            esm_dim=esm_dim, dropout=dropout, attention_backend=attention_backend,
        )
        if pretrained_weights:
            self.model = VirTues.from_pretrained(pretrained_weights, config={}, **arch)
        else:
            self.model = VirTues(**arch)
        if marker_table_dir is not None:
            self.model.load_marker_table(marker_table_dir, marker_uniprot_ids)
            self.hparams["marker_uniprot_ids"] = list(self.model.marker_uniprot_ids)
        self._last_step_end: float | None = None

    # ---- marker table --------------------------------------------------------------------------
    def set_marker_table(self, embeddings: Tensor, uniprot_ids: Sequence[str], source_dir: str | None = None) -> None:
        """Called by the DataModule: install the ESM table and remember its id order (saved)."""
        self.model.set_marker_table(embeddings.to(self.device), uniprot_ids)
        self.hparams["marker_uniprot_ids"] = list(self.model.marker_uniprot_ids)
        if source_dir is not None:
            self.hparams["marker_table_dir"] = str(source_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the ESM table is not in the official state dict (non-persistent buffer); a framework checkpoint
        # carries it beside the weights (N×640 floats, small) so it reloads without the data folders
        checkpoint["virtues_marker_uniprot_ids"] = list(self.model.marker_uniprot_ids)
        if self.model.marker_uniprot_ids:
            checkpoint["virtues_marker_table"] = self.model.marker_table.detach().cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ids = checkpoint.get("virtues_marker_uniprot_ids")
        table = checkpoint.get("virtues_marker_table")
        if ids and table is not None and not self.model.marker_uniprot_ids:
            self.model.set_marker_table(table, ids)
        if ids and self.model.marker_uniprot_ids and list(ids) != self.model.marker_uniprot_ids:
            raise ValueError(
                "the marker table loaded for this module has a different UniProt id order than the "
                "checkpoint; pass marker_uniprot_ids from the checkpoint (the default) or none at all"
            )

    # ---- forward / loss ------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor], marker_ids: Sequence[Tensor], masks: Sequence[Tensor] | None = None):
        return self.model(images, marker_ids, masks)

    def _masks(self, batch: dict[str, Any], generator: torch.Generator | None) -> list[Tensor]:
        if batch.get("masks") is not None:
            return batch["masks"]
        images = batch["images"]
        H, W = images[0].shape[-2:]
        p = self.hparams.patch_size
        masks = independent_masks_for_batch(
            [int(x.shape[0]) for x in images], H // p, W // p,
            (self.hparams.mask_ratio_min, self.hparams.mask_ratio_max), generator,
        )
        return [m.to(images[0].device) for m in masks]

    def _loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        for key in ("images", "marker_ids"):
            if key not in batch:
                raise KeyError(f"VirTues batch is missing {key!r}; expected keys images, marker_ids[, masks]")
        images = batch["images"]
        out = self.model(images, batch["marker_ids"], self._masks(batch, generator))
        pred = torch.cat([d.reshape(-1) for d in out.decoded]).float()
        target = torch.cat([x.reshape(-1) for x in images]).float()
        return F.mse_loss(pred, target)  # mean over sum_b C_b * H * W pixels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # fixed masks per batch index -> val loss comparable across epochs when masks are generated here
        gen = torch.Generator().manual_seed(self.hparams.val_mask_seed + batch_idx)
        loss = self._loss(batch, gen)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["images"]))
        return loss

    # ---- throughput ----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._last_step_end = None

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None and now > self._last_step_end:
            dt = now - self._last_step_end  # wall time of one step incl. data loading
            images = batch["images"]
            p = self.hparams.patch_size
            tokens = sum(int(x.shape[0]) * (x.shape[-2] // p) * (x.shape[-1] // p) for x in images)
            self.log("train/tokens_per_s", tokens / dt, batch_size=len(images))
            self.log("train/crops_per_s", len(images) / dt, batch_size=len(images))
        self._last_step_end = now

    # ---- optimisation --------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay on weights (+ token vectors by default); none on biases / LayerNorm."""
        ln_params = {id(p) for m in self.model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        tokens = {id(self.model.encoder.patch_summary_token), id(self.model.encoder.masked_token)}
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(".bias") or id(p) in ln_params:
                no_decay.append(p)
            elif id(p) in tokens:
                (decay if self.hparams.weight_decay_on_tokens else no_decay).append(p)
            elif p.dim() < 2:
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]

    def _total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total) or total <= 0:
            raise ValueError(
                "the cosine schedule needs a finite number of steps: set trainer max_steps or max_epochs"
            )
        return int(total)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(
            self.parameter_groups(), lr=hp.lr, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps
        )
        total = self._total_steps()
        warmup = int(round(hp.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, total, warmup, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Set this step's weight decay (cosine schedule) and log the lr / wd the step will use."""
        if not self.trainer.optimizers:
            return
        groups = self.trainer.optimizers[0].param_groups
        if self.hparams.wd_schedule == "cosine":
            wd = cosine_value(self.global_step, self._total_steps(), self.hparams.weight_decay, self.hparams.wd_end)
            for group in groups:
                if group.get("name") == "decay":
                    group["weight_decay"] = wd
        n = len(batch["images"])
        self.log("train/lr", groups[0]["lr"], batch_size=n)
        self.log("train/weight_decay", groups[0]["weight_decay"], batch_size=n)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear 0 -> 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup  # first step already trains (HF Trainer starts at 0 exactly)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_value(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (last step)."""
    progress = min(1.0, step / max(1, total - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
