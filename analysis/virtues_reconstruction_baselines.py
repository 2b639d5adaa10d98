"""Scoring and the paper's baselines of the masked-reconstruction evaluation: Pearson r and F1 of
positivity over the masked pixels, the visible-pixel mean and the most-correlated marker (see
:mod:`analysis.virtues_reconstruction` for the protocol)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from analysis.virtues_reconstruction_data import EvalCrop, pixel_mask

log = logging.getLogger("analysis.virtues_reconstruction")

# ============================================================================================
# Metrics from streamed sums
# ============================================================================================


class PixelStats:
    """Per-row (dataset, marker) sufficient statistics of Pearson r and F1, accumulated in float64.

    Values are centred on the row's threshold before summing (Pearson is shift-invariant), which
    keeps the one-pass variance well conditioned.
    """

    FIELDS = ("n", "sx", "sy", "sxx", "syy", "sxy", "tp", "fp", "fn")

    def __init__(self, rows: int):
        self.v = torch.zeros(len(self.FIELDS), rows, dtype=torch.float64)

    def add(self, rows: Tensor, truth: Tensor, pred: Tensor, sel: Tensor, thr: Tensor) -> None:
        """rows (K,), truth/pred/sel (K, H, W), thr (K,): add the selected pixels of each channel."""
        t = truth.double() - thr[:, None, None]
        p = pred.double() - thr[:, None, None]
        s = sel.to(torch.float64)
        ts, ps = t * s, p * s
        pos_t, pos_p = (t > 0) & sel, (p > 0) & sel
        stacked = torch.stack([
            s.sum((1, 2)), ts.sum((1, 2)), ps.sum((1, 2)), (ts * t).sum((1, 2)), (ps * p).sum((1, 2)), (ts * p).sum((1, 2)),
            (pos_t & pos_p).sum((1, 2)).double(), (~pos_t & pos_p).sum((1, 2)).double(), (pos_t & ~pos_p).sum((1, 2)).double(),
        ])
        self.v.index_add_(1, rows, stacked)

    def pearson(self) -> np.ndarray:
        n, sx, sy, sxx, syy, sxy = (self.v[i] for i in range(6))
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = (sxy - sx * sy / n).numpy()
            vx = (sxx - sx * sx / n).numpy()
            vy = (syy - sy * sy / n).numpy()
            tiny = 1e-12 * np.maximum(sxx.numpy(), 1.0)
            r = cov / np.sqrt(vx * vy)
            r[(vx <= tiny) | (vy <= 1e-12 * np.maximum(syy.numpy(), 1.0)) | (n.numpy() < 2)] = np.nan
        return np.clip(r, -1.0, 1.0)

    def f1(self) -> np.ndarray:
        tp, fp, fn = (self.v[i].numpy() for i in (6, 7, 8))
        den = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)

    def n(self) -> np.ndarray:
        return self.v[0].numpy().astype(np.int64)


def pearson_f1(truth: np.ndarray, pred: np.ndarray, threshold: float | None = None) -> tuple[float, float]:
    """Direct Pearson r and F1 of two pixel vectors (the reference the streamed sums must match)."""
    truth, pred = np.asarray(truth, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    thr = truth.mean() if threshold is None else threshold
    r = float(np.corrcoef(truth, pred)[0, 1]) if truth.std() > 0 and pred.std() > 0 else float("nan")
    pt, pp = truth > thr, pred > thr
    tp, fp, fn = np.sum(pt & pp), np.sum(~pt & pp), np.sum(pt & ~pp)
    den = 2 * tp + fp + fn
    return r, (float(2 * tp / den) if den else float("nan"))


# ============================================================================================
# Baselines
# ============================================================================================


def visible_mean_prediction(image: Tensor, token_mask: Tensor, patch_size: int) -> Tensor:
    """Each channel filled with the mean of its visible pixels (0 when none is visible)."""
    vis = (~pixel_mask(token_mask, patch_size)).to(image.dtype)
    n = vis.sum((1, 2))
    mean = torch.where(n > 0, (image * vis).sum((1, 2)) / n.clamp_min(1), torch.zeros_like(n))
    return mean[:, None, None].expand_as(image)


@dataclass
class PartnerFit:
    partner: str
    intercept: float
    slope: float
    r: float


def fit_most_correlated(crops: Sequence[EvalCrop]) -> dict[tuple[str, str], list[PartnerFit]]:
    """Per (dataset, marker): every other marker ranked by ``|r|`` over pooled pixels, with the
    least-squares line predicting the marker from it. Pairwise-complete: a pair is fitted on the
    crops that hold both markers."""
    by_dataset: dict[str, list[EvalCrop]] = {}
    for c in crops:
        by_dataset.setdefault(c.dataset, []).append(c)
    out: dict[tuple[str, str], list[PartnerFit]] = {}
    for dataset, dcrops in by_dataset.items():
        names = sorted({m for c in dcrops for m in c.markers})
        pos = {m: i for i, m in enumerate(names)}
        K = len(names)
        N = np.zeros((K, K))
        A = np.zeros((K, K))  # A[i, j] = sum of marker i over pixels of crops holding j
        Q = np.zeros((K, K))
        P = np.zeros((K, K))
        for c in dcrops:
            idx = np.array([pos[m] for m in c.markers])
            X = c.image.reshape(len(idx), -1).double().numpy()
            s, q = X.sum(1), (X * X).sum(1)
            ix = np.ix_(idx, idx)
            N[ix] += X.shape[1]
            A[ix] += s[:, None]
            Q[ix] += q[:, None]
            P[ix] += X @ X.T
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = P - A * A.T / N  # cov[i, j] (pairwise complete), times N
            var = Q - A * A / N  # var[i | pairs with j], times N
            r = cov / np.sqrt(var * var.T)
        for i, m in enumerate(names):
            fits = []
            for j, k in enumerate(names):
                if j == i or not N[i, j] or not np.isfinite(r[i, j]) or var[j, i] <= 0:
                    continue
                slope = cov[i, j] / var[j, i]  # regress i on j
                intercept = (A[i, j] - slope * A[j, i]) / N[i, j]
                fits.append(PartnerFit(k, float(intercept), float(slope), float(r[i, j])))
            fits.sort(key=lambda f: -abs(f.r))
            out[(dataset, m)] = fits
    return out


def partner_prediction(crop: EvalCrop, fits: Mapping[tuple[str, str], list[PartnerFit]], sl: slice) -> Tensor:
    """Prediction of the selected channels by their best partner measured in this crop."""
    present = {m: j for j, m in enumerate(crop.markers)}
    chans = range(len(crop.markers))[sl]
    out = torch.zeros((len(chans),) + tuple(crop.image.shape[1:]), dtype=crop.image.dtype)
    for o, ch in enumerate(chans):
        for f in fits.get((crop.dataset, crop.markers[ch]), []):
            j = present.get(f.partner)
            if j is not None and j != ch:
                out[o] = f.intercept + f.slope * crop.image[j]
                break
    return out
