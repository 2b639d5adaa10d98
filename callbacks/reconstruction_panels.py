"""Masked input / reconstruction / truth panels for a few markers, every validation epoch.

A loss curve says little about *what* a masked autoencoder reconstructs; looking at a few markers
does. The first validation batch is kept, re-run through the model after validation, rendered to a
PNG under `<default_root_dir>/panels/` and, when a W&B logger is attached, logged as an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch


class ReconstructionPanels(L.Callback):
    def __init__(self, num_markers: int = 3, every_n_epochs: int = 1, patch_size: int = 8):
        self.num_markers = num_markers
        self.every_n_epochs = every_n_epochs
        self.patch_size = patch_size
        self._batch: dict | None = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, dict) and "images" in batch:
            self._batch = {k: v[:1] for k, v in batch.items() if k in ("images", "marker_ids", "masks")}  # first sample

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        with torch.no_grad():
            out = pl_module(self._batch["images"], self._batch["marker_ids"], self._batch.get("masks"))
        image = self._batch["images"][0].float().cpu().numpy()
        recon = out.decoded[0].float().cpu().numpy()
        mask = self._batch["masks"][0].cpu().numpy() if self._batch.get("masks") is not None else np.zeros(image.shape[0:1] + (1, 1), bool)
        path = Path(trainer.default_root_dir) / "panels" / f"step_{trainer.global_step:07d}.png"
        render_panels(image, recon, mask, path, self.num_markers, self.patch_size)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/reconstruction", images=[str(path)], step=trainer.global_step)
        self._batch = None


def render_panels(image: np.ndarray, recon: np.ndarray, mask: np.ndarray, path: Path, num_markers: int = 3,
                  patch_size: int = 8) -> Path:
    """Rows = markers; columns = masked input (masked patches grey), reconstruction, truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(num_markers, image.shape[0])
    pixel_mask = np.kron(mask[:n].astype(np.uint8), np.ones((patch_size, patch_size), np.uint8)).astype(bool)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for row in range(n):
        lo, hi = np.percentile(image[row], [1, 99])
        masked = np.ma.array(image[row], mask=pixel_mask[row])
        for col, (data, title) in enumerate(((masked, "masked input"), (recon[row], "reconstruction"), (image[row], "truth"))):
            ax = axes[row, col]
            cmap = matplotlib.colormaps["magma"].copy()
            cmap.set_bad("0.6")
            ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
        axes[row, 0].set_ylabel(f"channel {row} ({mask[row].mean():.0%} masked)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
