"""ROSIE LightningModule: H&E patch -> mean expression of the centre 8x8 px for every marker.

Paper Methods ("Training details"): ConvNeXt-Small from ImageNet, masked MSE over the markers a
study actually stained, Adam lr 1e-4 halved every 30 k iterations, validation by Pearson R across
patches (early stopping monitors it) and SSIM on stitched samples.  The network lives in
``components.rosie_backbone``, the loss and metrics in :mod:`analysis.rosie_training_metrics`; this
file only wires them to the optimiser and Lightning's loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from analysis.rosie_training_metrics import MaskedPearson, masked_mse, stitched_ssim
from lightning_modules.components.model_files import ModelFileError, load_torch_file, require_kind
from lightning_modules.components.rosie_backbone import (
    RosieInputAdapter,
    build_rosie_regressor,
    load_official_rosie_checkpoint,
)

log = logging.getLogger(__name__)


class RosieModule(L.LightningModule):
    """ConvNeXt regressor of per-marker patch expression.

    Batches (dataloader 0): ``{"image": (B,3,H,W) normalised float, "target": (B,M), "present":
    (B,M) bool}``.  Optional validation dataloader 1 gives whole stitched samples:
    ``{"tissue_id", "patches": (N,3,H,W), "grid_shape": (h,w), "target_image": (M,h,w)}``.

    ``official_checkpoint``: the authors' released weights (needs ``arch='convnext_small'`` and 50
    markers); use ``input_resize=224`` with it, as the official inference does.

    ``he_mpp``: µm/px of the H&E the model is trained on, kept in the checkpoint's hyper-parameters
    so prediction can resample (or refuse) a slide scanned at another resolution.
    """

    def __init__(
        self,
        arch: str = "convnext_small",
        num_markers: int = 50,
        marker_names: Sequence[str] | None = None,
        pretrained_path: str | None = None,
        lr: float = 1e-4,
        lr_halve_every_steps: int = 30_000,
        input_resize: int | None = None,
        backbone: str = "timm",
        official_checkpoint: str | None = None,
        stitch_chunk_size: int = 256,
        target_scales: Sequence[float] | None = None,
        input_center_crop: int | None = None,
        he_mpp: float | None = None,
    ) -> None:
        super().__init__()
        marker_names = list(marker_names) if marker_names is not None else [f"marker_{i}" for i in range(num_markers)]
        if len(marker_names) != num_markers:
            raise ValueError(f"RosieModule: marker_names has {len(marker_names)} names but num_markers={num_markers}")
        self.save_hyperparameters()
        self.marker_names = marker_names
        if official_checkpoint is not None:
            if pretrained_path is not None:
                log.warning("RosieModule: official_checkpoint given, ignoring pretrained_path=%s", pretrained_path)
            self.backbone = load_official_rosie_checkpoint(official_checkpoint, backbone=backbone, arch=arch)
            n_out = _num_outputs(self.backbone)
            if n_out != num_markers:
                raise ValueError(f"official_checkpoint {official_checkpoint} predicts {n_out} markers but num_markers={num_markers}")
        else:
            self.backbone = build_rosie_regressor(arch, num_markers, pretrained_path, backbone)
        self.adapter = (RosieInputAdapter(resize_to=input_resize, center_crop=input_center_crop)
                        if input_resize or input_center_crop else nn.Identity())
        # NHWC convolutions are ~1.5x faster on CPU (and for tensor cores); numerics are unchanged
        self.backbone.to(memory_format=torch.channels_last)
        self.val_pearson = MaskedPearson(num_markers)
        self.val_ssim = MeanMetric()
        self.reference_he_histograms: torch.Tensor | None = None

    # -------------------------------------------------------------- quality control
    def set_reference_histograms(self, histograms: "torch.Tensor | Sequence") -> None:
        """The training tissues' (R, 3, 256) H&E histograms, saved in every checkpoint so the paper's
        W1 quality score of a new slide needs no training data (``datamodules.he_histograms``)."""
        hists = torch.as_tensor(histograms, dtype=torch.float32)
        if hists.ndim != 3 or tuple(hists.shape[1:]) != (3, 256):
            raise ValueError(f"reference H&E histograms must be (R, 3, 256), got {tuple(hists.shape)}")
        self.reference_he_histograms = hists

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.reference_he_histograms is not None:
            checkpoint["reference_he_histograms"] = self.reference_he_histograms.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("reference_he_histograms") is not None:
            self.set_reference_histograms(checkpoint["reference_he_histograms"])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.adapter(image).contiguous(memory_format=torch.channels_last))

    # -------------------------------------------------------------- train
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pred = self(batch["image"])
        loss = masked_mse(pred, batch["target"], batch["present"])
        self.log("train/loss", loss, prog_bar=True, batch_size=pred.shape[0])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.hparams.lr_halve_every_steps, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 1:
            self._stitched_ssim_step(batch)
            return
        pred = self(batch["image"])
        loss = masked_mse(pred, batch["target"], batch["present"])
        self.log("val/loss", loss, batch_size=pred.shape[0], sync_dist=True, add_dataloader_idx=False)
        self.val_pearson.update(pred, batch["target"], batch["present"])

    def on_validation_epoch_end(self) -> None:
        if self.val_pearson.update_called:
            r = self.val_pearson.compute()
            finite = torch.isfinite(r)
            mean_r = r[finite].mean() if finite.any() else torch.zeros((), dtype=r.dtype, device=r.device)
            if not finite.any():
                log.warning("val/pearson_r: no marker had >= 2 present patches with variance; logging 0")
            self.log("val/pearson_r", mean_r.float(), prog_bar=True, add_dataloader_idx=False)
            for name, value in zip(self.marker_names, r.tolist()):
                if math.isfinite(value):
                    self.log(f"val_marker/pearson_r/{name}", value, add_dataloader_idx=False)
            self.val_pearson.reset()
        if self.val_ssim.update_called:
            self.log("val/ssim", self.val_ssim.compute(), prog_bar=True, add_dataloader_idx=False)
            self.val_ssim.reset()

    @staticmethod
    def _unbatch(batch: dict) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """Accept the stitched sample with or without a leading batch dimension of 1."""
        patches, target = batch["patches"], batch["target_image"]
        if patches.ndim == 5:
            if patches.shape[0] != 1:
                raise ValueError("stitched validation loader: use batch_size=1 (one tissue per batch)")
            patches, target = patches[0], target[0]
        gs = batch["grid_shape"]
        if isinstance(gs, torch.Tensor):
            gs = gs.reshape(-1).tolist()
        else:
            gs = [int(g.reshape(-1)[0]) if isinstance(g, torch.Tensor) else int(g) for g in gs]
        h, w = int(gs[0]), int(gs[1])
        if patches.shape[0] != h * w:
            raise ValueError(f"stitched sample {batch.get('tissue_id')}: {patches.shape[0]} patches but grid_shape {h}x{w}")
        return patches, (h, w), target

    def _stitched_ssim_step(self, batch: dict) -> None:
        patches, (h, w), target = self._unbatch(batch)
        chunk = self.hparams.stitch_chunk_size
        pred = torch.cat([self(patches[i : i + chunk]) for i in range(0, patches.shape[0], chunk)])
        pred_image = pred.T.reshape(pred.shape[1], h, w).float()
        ssim = stitched_ssim(pred_image, target.float())
        if ssim is not None:
            self.val_ssim.update(ssim)

    # -------------------------------------------------------------- predict
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        image = batch["image"] if isinstance(batch, dict) else batch
        return self(image)


def _num_outputs(model: nn.Module) -> int:
    """Output width of the final Linear layer (the regression head)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


def load_rosie_checkpoint(path: str, trust_checkpoint: bool = False, map_location: str = "cpu") -> "RosieModule":
    """A RosieModule from a Lightning checkpoint, read with ``weights_only=True`` unless trusted.

    Full unpickling can run code from the file, so it is opt-in (``--trust-checkpoint``). The file
    goes through :func:`~lightning_modules.components.model_files.load_torch_file` first, so a
    damaged, unsafe or VirTues checkpoint is refused by name. Pretrained weight paths stored in the
    hparams are not re-read: the checkpoint holds the weights.
    """
    raw = load_torch_file(path, trust=trust_checkpoint, mmap=True)
    if require_kind(path, raw, ("rosie",), "this command") is None:
        raise ModelFileError(f"{path}: not a Lightning checkpoint of RosieModule (no hyper-parameters or state_dict)")
    del raw
    return RosieModule.load_from_checkpoint(str(path), map_location=map_location, weights_only=not trust_checkpoint,
                                            pretrained_path=None, official_checkpoint=None)
