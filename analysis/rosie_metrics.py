"""ROSIE evaluation metrics and quality control, as in the paper's Methods.

"Expression metrics": Pearson R and Spearman R between measured and predicted patch values
(one value per 8x8 px patch and marker), computed across the patches of a sample and averaged;
C-index (``lifelines.utils.concordance_index``) on the 75th percentile of each sample, across
samples, per marker.  Patches whose measured value is below the 90th percentile of background noise
for that marker are excluded.

"Quality control": dynamic range (p99 - p1 of a predicted channel) and the mean W1 distance between
a test H&E's 256-bin histograms and those of the training H&E images.

Interpretation choices (the paper is terse; each is documented where it is implemented):
- Correlations are computed per sample and marker across that sample's patches, then averaged over
  samples (per marker) and over markers (summary).  Fig. 2 ranks samples by Pearson R, so a
  per-sample correlation must exist.
- Background noise = measured values of patches outside the tissue mask of the same sample
  (CODEX noise differs between acquisitions), with the pooled background of all samples as a
  fallback when a sample has too few background patches; or a user-given array of background
  values.  A patch is kept when ``truth >= threshold``.
- Only in-tissue patches are evaluated (the paper predicts "foreground H&E patches").

Plain numpy/scipy/pandas; no Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["method", "pearson_r", "spearman_r", "c_index", "n_patches"]


# ----------------------------------------------------------------------------- helpers


def _as_2d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected shape (N_patches, M_markers), got {a.shape}")
    return a


def _valid_mask(truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} must have the same shape (N_patches, M_markers)")
    ok = np.isfinite(truth) & np.isfinite(pred)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.ndim == 1 and truth.shape[1] == 1:
            valid = valid[:, None]
        if valid.shape != truth.shape:
            raise ValueError(f"valid must have shape {truth.shape}, got {valid.shape}")
        ok &= valid
    return ok


# ----------------------------------------------------------------------------- correlations


def pearson_per_marker(truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None, min_patches: int = 2) -> np.ndarray:
    """(M,) Pearson R across patches for each marker, over ``valid`` entries only.

    NaN where a marker has fewer than ``min_patches`` valid patches or no variance.  The paper
    names "sklearn.metrics.pearsonr", which does not exist; this equals ``scipy.stats.pearsonr``.
    """
    truth, pred = _as_2d("truth", truth), _as_2d("pred", pred)
    ok = _valid_mask(truth, pred, valid)
    n = ok.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(ok, truth, 0.0)
        y = np.where(ok, pred, 0.0)
        mx = x.sum(0) / n
        my = y.sum(0) / n
        dx = np.where(ok, truth - mx, 0.0)
        dy = np.where(ok, pred - my, 0.0)
        sxy = (dx * dy).sum(0)
        sxx = (dx * dx).sum(0)
        syy = (dy * dy).sum(0)
        r = sxy / np.sqrt(sxx * syy)
    bad = (n < max(min_patches, 2)) | (sxx <= 0) | (syy <= 0)
    r = np.clip(r, -1.0, 1.0)
    r[bad] = np.nan
    return r


def spearman_per_marker(truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None, min_patches: int = 2) -> np.ndarray:
    """(M,) Spearman R (Pearson R of average ranks, as ``scipy.stats.spearmanr``) per marker."""
    truth, pred = _as_2d("truth", truth), _as_2d("pred", pred)
    ok = _valid_mask(truth, pred, valid)
    out = np.full(truth.shape[1], np.nan)
    for m in range(truth.shape[1]):
        sel = ok[:, m]
        if sel.sum() < max(min_patches, 2):
            continue
        rt = rankdata(truth[sel, m])
        rp = rankdata(pred[sel, m])
        out[m] = pearson_per_marker(rt, rp)[0]
    return out


# ----------------------------------------------------------------------------- background


def background_thresholds(background_values: np.ndarray, q: float = 90.0) -> np.ndarray:
    """(M,) per-marker ``q``-th percentile of background noise values (K,M); NaN-aware.

    A marker with no finite background value gets ``-inf`` (nothing excluded for it).
    """
    bg = _as_2d("background_values", background_values)
    out = np.full(bg.shape[1], -np.inf)
    has = np.isfinite(bg).any(0)
    if has.any():
        out[has] = np.nanpercentile(bg[:, has], q, axis=0)
    return out


def exclude_background(truth: np.ndarray, thresholds: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(N,M) bool: keep entries whose measured value is >= the marker's background threshold.

    The paper: "we exclude patches with a lower groundtruth expression value than the 90th
    percentile value of background noise for each biomarker".
    """
    truth = _as_2d("truth", truth)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.shape[0] != truth.shape[1]:
        raise ValueError(f"thresholds has {thresholds.shape[0]} values but truth has {truth.shape[1]} markers")
    keep = np.isfinite(truth) & (truth >= thresholds[None, :])
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool).reshape(truth.shape)
    return keep


# ----------------------------------------------------------------------------- C-index


def sample_percentile(values: np.ndarray, valid: np.ndarray | None = None, q: float = 75.0) -> np.ndarray:
    """(M,) ``q``-th percentile per marker over a sample's valid patches (NaN if none)."""
    v = _as_2d("values", values)
    ok = np.isfinite(v) if valid is None else (np.isfinite(v) & np.asarray(valid, bool).reshape(v.shape))
    out = np.full(v.shape[1], np.nan)
    has = ok.any(0)
    if has.any():
        out[has] = np.nanpercentile(np.where(ok, v, np.nan)[:, has], q, axis=0)
    return out


def c_index_per_marker(truth_q: np.ndarray, pred_q: np.ndarray) -> np.ndarray:
    """(M,) sample-level C-index: ``lifelines.utils.concordance_index(truth, pred)`` across samples.

    ``truth_q``/``pred_q``: (S_samples, M) per-sample summaries (the 75th percentiles).  All
    "events" are observed; pairs with tied truth are not comparable, tied predictions count 1/2
    (lifelines' definition).  NaN where fewer than two samples or no comparable pair.
    """
    from lifelines.utils import concordance_index  # lazy: ~1-2 s to import, needed only for the C-index

    t, p = _as_2d("truth_q", truth_q), _as_2d("pred_q", pred_q)
    if t.shape != p.shape:
        raise ValueError(f"truth_q {t.shape} and pred_q {p.shape} must match (S_samples, M_markers)")
    out = np.full(t.shape[1], np.nan)
    for m in range(t.shape[1]):
        sel = np.isfinite(t[:, m]) & np.isfinite(p[:, m])
        if sel.sum() < 2:
            continue
        try:
            out[m] = concordance_index(t[sel, m], p[sel, m])
        except ZeroDivisionError:  # lifelines: "No admissable pairs in the dataset."
            pass
    return out


# ----------------------------------------------------------------------------- evaluation


@dataclass
class SamplePatches:
    """One sample's patch values, row i of every array being the same 8x8 px patch.

    ``in_tissue``: (N,) bool, patches inside the tissue mask (None = all in tissue; then the
    background must be given explicitly).  ``present``: (M,) bool, markers this sample was stained
    for (None = all).
    """

    sample_id: str
    truth: np.ndarray
    pred: np.ndarray
    in_tissue: np.ndarray | None = None
    present: np.ndarray | None = None


@dataclass
class EvaluationTables:
    per_sample_marker: pd.DataFrame
    per_sample: pd.DataFrame
    per_marker: pd.DataFrame
    summary: pd.DataFrame


def _sample_valid(s: SamplePatches, n_markers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth, pred = _as_2d(f"{s.sample_id}.truth", s.truth), _as_2d(f"{s.sample_id}.pred", s.pred)
    if truth.shape != pred.shape or truth.shape[1] != n_markers:
        raise ValueError(f"sample {s.sample_id}: truth {truth.shape} and pred {pred.shape} must be (N, {n_markers})")
    ok = np.isfinite(truth) & np.isfinite(pred)
    if s.present is not None:
        ok &= np.asarray(s.present, bool).reshape(1, -1)
    return truth, pred, ok


def _in_tissue(s: SamplePatches, n: int) -> np.ndarray:
    if s.in_tissue is None:
        return np.ones(n, bool)
    t = np.asarray(s.in_tissue, bool).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"sample {s.sample_id}: in_tissue has {t.shape[0]} entries, truth has {n} patches")
    return t


def evaluate_samples(
    samples: Iterable[SamplePatches],
    marker_names: Sequence[str],
    method: str = "ROSIE",
    background: str | np.ndarray | None = "tissue_mask",
    background_q: float = 90.0,
    c_index_q: float = 75.0,
    min_background_patches: int = 10,
    min_patches: int = 2,
) -> EvaluationTables:
    """Paper metrics as tidy tables: per (sample, marker), per sample, per marker, summary.

    ``background``: ``"tissue_mask"`` = per-sample background from patches outside the tissue
    (pooled over all samples when a sample has fewer than ``min_background_patches``); an (K,M)
    array = background noise values shared by all samples; ``None`` = no exclusion.
    Per marker: Pearson/Spearman are the mean over samples, C-index is across samples on the
    ``c_index_q`` percentile.  Summary: mean over markers.
    """
    samples = list(samples)
    names = list(marker_names)
    M = len(names)
    if not samples:
        raise ValueError("evaluate_samples: no samples given")

    prepared = []
    for s in samples:
        truth, pred, ok = _sample_valid(s, M)
        prepared.append((s, truth, pred, ok, _in_tissue(s, truth.shape[0])))

    pooled_thr = np.full(M, -np.inf)
    if isinstance(background, str):
        if background != "tissue_mask":
            raise ValueError(f"background must be 'tissue_mask', an (K,M) array or None, got {background!r}")
        bg_all = [np.where(ok[~tis], truth[~tis], np.nan) for (_, truth, _, ok, tis) in prepared if (~tis).any()]
        if bg_all:
            pooled_thr = background_thresholds(np.concatenate(bg_all), background_q)
        else:
            log.warning("evaluate_samples: no patch lies outside the tissue mask in any sample; no background exclusion")
    elif background is not None:
        pooled_thr = background_thresholds(background, background_q)
        if pooled_thr.shape[0] != M:
            raise ValueError(f"background array has {pooled_thr.shape[0]} markers, expected {M}")

    rows, sample_rows = [], []
    tq, pq = np.full((len(prepared), M), np.nan), np.full((len(prepared), M), np.nan)
    for i, (s, truth, pred, ok, tis) in enumerate(prepared):
        thr = pooled_thr
        if isinstance(background, str) and (~tis).sum() >= min_background_patches:
            thr = background_thresholds(np.where(ok[~tis], truth[~tis], np.nan), background_q)
            thr = np.where(np.isfinite(thr), thr, pooled_thr)
        valid = exclude_background(truth, thr, ok & tis[:, None])
        pr = pearson_per_marker(truth, pred, valid, min_patches)
        sr = spearman_per_marker(truth, pred, valid, min_patches)
        n = valid.sum(0)
        tq[i] = sample_percentile(truth, valid, c_index_q)
        pq[i] = sample_percentile(pred, valid, c_index_q)
        for m, name in enumerate(names):
            rows.append((s.sample_id, name, method, pr[m], sr[m], np.nan, int(n[m])))
        sample_rows.append((s.sample_id, method, _nanmean(pr), _nanmean(sr), np.nan, int(valid.any(1).sum())))

    per_sample_marker = pd.DataFrame(rows, columns=["sample_id", "marker", *METRIC_COLUMNS])
    per_sample = pd.DataFrame(sample_rows, columns=["sample_id", *METRIC_COLUMNS])
    ci = c_index_per_marker(tq, pq)
    g = per_sample_marker.groupby("marker", sort=False)
    per_marker = pd.DataFrame(
        {
            "marker": names,
            "method": method,
            "pearson_r": g["pearson_r"].mean().reindex(names).to_numpy(),
            "spearman_r": g["spearman_r"].mean().reindex(names).to_numpy(),
            "c_index": ci,
            "n_patches": g["n_patches"].sum().reindex(names).to_numpy().astype(int),
        }
    )
    summary = pd.DataFrame(
        [
            {
                "method": method,
                "pearson_r": _nanmean(per_marker["pearson_r"].to_numpy()),
                "spearman_r": _nanmean(per_marker["spearman_r"].to_numpy()),
                "c_index": _nanmean(ci),
                "n_patches": int(per_sample["n_patches"].sum()),
                "n_samples": len(prepared),
            }
        ]
    )
    return EvaluationTables(per_sample_marker, per_sample, per_marker, summary)


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


# ----------------------------------------------------------------------------- quality control


def dynamic_range(pred_image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(M,) p99 - p1 of each predicted channel (optionally inside a tissue mask); NaN-aware.

    Paper QC: channels with a low dynamic range are poor generations and can be excluded.
    """
    img = np.asarray(pred_image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"pred_image: expected (M, h, w), got {img.shape}")
    flat = img.reshape(img.shape[0], -1)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != img.shape[1:]:
            raise ValueError(f"mask shape {mask.shape} must equal the image's (h, w) {img.shape[1:]}")
        flat = flat[:, mask.reshape(-1)]
    p1, p99 = np.nanpercentile(flat, [1, 99], axis=1)
    return p99 - p1


def rgb_channels_last(he_image: np.ndarray) -> np.ndarray:
    """An RGB image as (H,W,3), given (3,H,W) (the project's c,y,x convention) or already (H,W,3).

    Public because the H&E histograms here and the baselines (:mod:`analysis.rosie_baselines`)
    accept both layouts and must agree on how they are told apart.
    """
    a = np.asarray(he_image)
    if a.ndim != 3:
        raise ValueError(f"he_image: expected (3,H,W) or (H,W,3), got {a.shape}")
    if a.shape[0] == 3:
        return np.moveaxis(a, 0, -1)
    if a.shape[-1] == 3:
        return a
    raise ValueError(f"he_image: expected 3 colour channels first or last, got {a.shape}")


def he_histograms(he_image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(3, 256) normalised intensity histograms of an 8-bit H&E image (per RGB channel).

    ``mask`` (H,W) restricts to tissue; the paper does not say whether it masked, so it is optional.
    """
    hwc = rgb_channels_last(he_image)
    if hwc.dtype != np.uint8:
        raise ValueError(f"he_image must be uint8 (0-255), got {hwc.dtype}; convert with skimage.util.img_as_ubyte")
    px = hwc.reshape(-1, 3)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != hwc.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} must equal the image's (H, W) {hwc.shape[:2]}")
        px = px[mask.reshape(-1)]
    if px.shape[0] == 0:
        raise ValueError("he_histograms: mask selects no pixel")
    hist = np.stack([np.bincount(px[:, c], minlength=256) for c in range(3)]).astype(np.float64)
    return hist / hist.sum(1, keepdims=True)


def w1_to_reference(hist: np.ndarray, reference_hists: np.ndarray) -> float:
    """Mean 1-D Wasserstein distance (in intensity units) from ``hist`` to every reference.

    ``hist``: (256,) or (C,256); ``reference_hists``: (R,256) or (R,C,256).  Per channel W1 over
    bin centres 0..255 (equal spacing, so W1 = sum |CDF_a - CDF_b|, identical to
    ``scipy.stats.wasserstein_distance(centres, centres, a, b)``), averaged over channels, then over
    references (the paper's "average W1 distance across all training images").
    """
    h = np.asarray(hist, dtype=np.float64)
    ref = np.asarray(reference_hists, dtype=np.float64)
    single = h.ndim == 1
    if single:
        h = h[None]
    if single and ref.ndim == 2:
        ref = ref[:, None]  # (R,256) -> (R,1,256)
    elif ref.ndim == 2 and ref.shape == h.shape:
        ref = ref[None]  # a single reference
    if ref.shape[1:] != h.shape:
        raise ValueError(f"reference_hists {reference_hists.shape} do not match hist {np.shape(hist)} (expected (R,)+hist.shape)")
    h = h / h.sum(-1, keepdims=True)
    ref = ref / ref.sum(-1, keepdims=True)
    cdf_diff = np.abs(np.cumsum(h, -1)[None] - np.cumsum(ref, -1))
    return float(cdf_diff[..., :-1].sum(-1).mean())
