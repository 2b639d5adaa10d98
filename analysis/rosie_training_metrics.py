"""The loss and validation metrics of ROSIE training, as tensors (paper Methods, "Training details").

Why here and not in the LightningModule: they are plain torch/torchmetrics functions of predictions
and targets, so the bottom layer keeps them where they can be tested and reused without a trainer
(the cell-morphology baseline trains with the same masked loss). The evaluation metrics on numpy
arrays (Pearson/Spearman per sample, C-index, QC) are in :mod:`analysis.rosie_metrics`.

* :func:`masked_mse` — the training loss: MSE over the markers a study actually stained.
* :class:`MaskedPearson` — per-marker Pearson R across validation patches (early stopping
  monitors its mean), exact over batches and under DDP.
* :func:`stitched_ssim` — SSIM of a whole stitched sample against its measurement.

torch + torchmetrics only; no Lightning.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure


def masked_mse(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean squared error over present (patch, marker) entries only.

    ``torch.where`` (not a multiplication) so NaN/inf targets at absent markers cannot leak into
    the loss or its gradient.
    """
    present = present.bool()
    diff = torch.where(present, pred - target, torch.zeros_like(pred))
    return diff.pow(2).sum() / present.sum().clamp(min=1)


class MaskedPearson(Metric):
    """Per-marker Pearson R across patches, skipping absent entries.

    Keeps float64 running sums as metric states (reduced by summation), so the result is exact
    under DDP and over any number of batches.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_outputs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("n", "sx", "sy", "sxx", "syy", "sxy"):
            self.add_state(name, default=torch.zeros(num_outputs, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> None:
        m = (present.bool() & torch.isfinite(target) & torch.isfinite(pred)).to(torch.float64)
        x = torch.where(m > 0, pred.detach().to(torch.float64), 0.0)
        y = torch.where(m > 0, target.detach().to(torch.float64), 0.0)
        self.n += m.sum(0)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += (x * x).sum(0)
        self.syy += (y * y).sum(0)
        self.sxy += (x * y).sum(0)

    def compute(self) -> torch.Tensor:
        """(M,) Pearson R; NaN where a marker has < 2 entries or no variance."""
        n = self.n
        cov = n * self.sxy - self.sx * self.sy
        vx = n * self.sxx - self.sx**2
        vy = n * self.syy - self.sy**2
        denom = torch.sqrt(vx.clamp(min=0) * vy.clamp(min=0))
        ok = (n >= 2) & (denom > 0)
        return torch.where(ok, cov / torch.where(ok, denom, 1.0), torch.full_like(n, float("nan")))


def stitched_ssim(pred_image: torch.Tensor, target_image: torch.Tensor) -> torch.Tensor | None:
    """Mean SSIM over markers of a stitched (M,h,w) prediction against the measurement.

    Per marker, the data range is the measured image's max - min (the paper does not say; a fixed
    range would let bright markers dominate).  Markers with non-finite or constant measurements are
    skipped; the Gaussian window shrinks for samples smaller than 11 px.  ``None`` if nothing is
    scoreable.
    """
    h, w = target_image.shape[-2:]
    k = min(11, h, w)
    k = k if k % 2 == 1 else k - 1
    if k < 3:
        return None
    values = []
    for c in range(target_image.shape[0]):
        t = target_image[c]
        if not torch.isfinite(t).all():
            continue
        rng = float(t.max() - t.min())
        if rng <= 0:
            continue
        values.append(
            structural_similarity_index_measure(
                pred_image[c][None, None], t[None, None], data_range=rng, kernel_size=k, sigma=1.5 * k / 11
            )
        )
    return torch.stack(values).mean() if values else None
