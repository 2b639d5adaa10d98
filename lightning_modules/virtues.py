"""VirTues masked-autoencoder pretraining as a LightningModule (thin glue around ``VirTues``).

Batch format (from the DataModule)::

    {"images": list[Tensor(C_b, H, W)], "marker_ids": list[LongTensor(C_b)],
     "masks": list[BoolTensor(C_b, H/8, W/8)]}

MAE masks are drawn by the data pipeline (``datamodules.virtues.VirTuesCropDataset``, from
``(seed, epoch, item)``), never here: one owner means one mask-ratio setting and masks that do not
depend on the number of workers or ranks. A batch without masks is refused by name.

Training choices (official code unless noted; ``docs/virtues-official-layout.md`` 3.4):

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

The architecture is one :class:`VirTuesArch` (config keys ``model.arch.*``), stored in the
hyper-parameters as a plain dict. The marker (ESM) table is an input, not a weight: it is loaded
from ``marker_table_dir`` or set by the DataModule through :meth:`VirTuesModule.set_marker_table`,
and a checkpoint carries it beside the weights. :func:`load_virtues_module` reads checkpoints of
this layout and of the flat one written before ``arch`` existed.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import fields
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.model_files import ModelFileError, load_torch_file, require_kind
from lightning_modules.components.virtues import VirTues, VirTuesArch


class VirTuesModule(L.LightningModule):
    """VirTues pretraining: the model, its loss, optimiser, schedules and marker-table bookkeeping.

    Args:
        arch: the architecture (defaults = the released VirTues). A plain dict (as stored in the
            hyper-parameters) is accepted too, so Lightning's own ``load_from_checkpoint`` works.
        lr, min_lr_ratio, warmup_fraction: peak learning rate, cosine floor as a fraction of it,
            linear warm-up as a fraction of all steps.
        weight_decay, wd_schedule, wd_end: AdamW decay, ``constant`` or ``cosine`` to ``wd_end``.
        weight_decay_on_tokens: decay the patch-summary and mask tokens (official run: yes).
        adam_beta1, adam_beta2, adam_eps: AdamW settings.
        marker_table_dir: folder of ``<UniProtID>.pt`` ESM embeddings to load now (else the
            DataModule installs the table before training).
        marker_uniprot_ids: row order of that table (default: sorted file names).
        pretrained_weights: an official-layout ``.safetensors`` file to start from (strict).
    """

    def __init__(
        self,
        arch: VirTuesArch = VirTuesArch(),
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
        marker_table_dir: str | None = None,
        marker_uniprot_ids: list[str] | None = None,
        pretrained_weights: str | None = None,
    ) -> None:
        super().__init__()
        config = VirTuesArch.from_dict(arch) if isinstance(arch, Mapping) else arch
        if wd_schedule not in ("constant", "cosine"):
            raise ValueError(f"wd_schedule must be 'constant' or 'cosine', got {wd_schedule!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        # save_hyperparameters records the arguments by name: `arch` as plain values, because
        # checkpoints are read with torch.load(weights_only=True), which cannot rebuild a dataclass
        arch = config.to_dict()
        self.save_hyperparameters()
        if pretrained_weights:
            self.model = VirTues.from_pretrained(pretrained_weights, config=config)
        else:
            self.model = VirTues(config)
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

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        for key in ("images", "marker_ids", "masks"):
            if batch.get(key) is None:
                raise KeyError(
                    f"VirTues batch is missing {key!r}; expected keys images, marker_ids, masks (the MAE masks "
                    "are drawn by the data pipeline: VirTuesCropDataset(masking=True), as VirTuesDataModule does)"
                )
        images = batch["images"]
        out = self.model(images, batch["marker_ids"], batch["masks"])
        pred = torch.cat([d.reshape(-1) for d in out.decoded]).float()
        target = torch.cat([x.reshape(-1) for x in images]).float()
        return F.mse_loss(pred, target)  # mean over sum_b C_b * H * W pixels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # validation masks are fixed by the data pipeline (epoch 0 seeds) -> comparable across epochs
        loss = self._loss(batch)
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
            p = self.model.patch_size
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


# ---- checkpoints -------------------------------------------------------------------------------
#: Hyper-parameters that no longer exist: the module's own mask drawing (now the data pipeline's
#: job) and Lightning's bookkeeping for its own loader. Dropped when an old checkpoint is read.
RETIRED_HPARAMS = frozenset({"mask_ratio_min", "mask_ratio_max", "val_mask_seed", "_instantiator", "_class_path"})


def current_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters in the current layout (plain values, ``arch`` a dict).

    Why: checkpoints written before :class:`VirTuesArch` keep the sizes at the top level
    (``d_model=..., encoder_pattern=...``); both layouts must keep loading.
    """
    hp = {k: v for k, v in hparams.items() if k not in RETIRED_HPARAMS}
    arch_names = {f.name for f in fields(VirTuesArch)}
    flat = {k: hp.pop(k) for k in sorted(arch_names & set(hp))}
    if flat:
        if "arch" in hp:
            raise ModelFileError(f"hyper-parameters hold both 'arch' and the old flat sizes {sorted(flat)}")
        hp["arch"] = flat
    return hp


def load_virtues_module(path: str | os.PathLike, trust: bool = False) -> VirTuesModule:
    """A :class:`VirTuesModule` from a Lightning checkpoint of either hyper-parameter layout.

    The file is read by the project's safe loader (no code from the file runs unless ``trust``).
    ``marker_table_dir`` and ``pretrained_weights`` are not followed: they name files of the
    training machine, and the state dict (loaded strictly) holds every weight. The marker table
    stored beside the weights is installed. The module is returned in training mode, as
    Lightning's ``load_from_checkpoint`` does; call ``.eval()`` for inference.

    Raises:
        ModelFileError: not a VirTues Lightning checkpoint, unknown hyper-parameters, or weights
            that do not match the stored architecture.
    """
    raw = load_torch_file(path, trust=trust, mmap=True)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("state_dict"), Mapping):
        raise ModelFileError(f"{path}: not a Lightning checkpoint of VirTuesModule (no 'state_dict'); official "
                             "weights load with VirTues.from_pretrained")
    require_kind(path, raw, ("virtues",), "load_virtues_module")
    hparams = current_hparams(raw.get("hyper_parameters") or {})
    unknown = sorted(set(hparams) - set(inspect.signature(VirTuesModule).parameters))
    if unknown:
        raise ModelFileError(f"{path}: unknown VirTuesModule hyper-parameters {unknown}")
    hparams.update(marker_table_dir=None, pretrained_weights=None)
    try:
        module = VirTuesModule(**hparams)
        module.load_state_dict(dict(raw["state_dict"]), strict=True)
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: the checkpoint does not build a VirTuesModule: {e}") from None
    module.on_load_checkpoint(raw)
    return module
