"""Reading VirTues' attention (paper Suppl. Fig. 20; Methods "Model inspection and visualization").

Two readouts, both plain array maths here (the model side is
:mod:`lightning_modules.virtues_attention_probe`):

* **Marker importance scores** from the first marker-attention layer. With ``α[h, m', m, i, j]``
  the post-softmax weight with which marker ``m'`` attends to marker ``m`` in head ``h`` at grid
  position ``(i, j)`` (the patch-summary token left out, as the Methods say, and the remaining
  weights not renormalised), the Methods define

      ρ[m, m', h] = Σ_ij α[h, m', m, i, j]
      I_m        = Σ_{m', h} (ρ[m, m', h] − min_{m'} ρ[m, m', h]) / (max_{m'} ρ[m, m', h] − min_{m'} ρ[m, m', h])

  i.e. for each attended marker ``m`` and head, the attention it receives from every other marker
  is min-max scaled over the attending markers ``m'``, then summed over ``m'`` and heads. Where
  every ``m'`` gives ``m`` the same total (max = min) the term is 0 (the formula is undefined
  there). Because ρ is a sum over positions, a region of several crops is scored by adding the
  crops' ρ before scaling (:func:`importance_from_rho`).
* **Spatial attention maps**: the weight from the channel-summary token of the patch-summary
  channel to each patch-summary token in the penultimate spatial-attention layer of a model
  fine-tuned on a tissue label; per crop a ``(h, w)`` grid, stitched here over the tissue.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def marker_rho(alpha: np.ndarray) -> np.ndarray:
    """``α[h, m', m, ...positions]`` → ``ρ[m, m', h]`` (summed over every trailing position axis)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim < 3 or alpha.shape[1] != alpha.shape[2]:
        raise ValueError(f"expected attention (heads, markers, markers, ...), got shape {alpha.shape}")
    rho = alpha.reshape(alpha.shape[0], alpha.shape[1], alpha.shape[2], -1).sum(-1)  # [h, m', m]
    return rho.transpose(2, 1, 0)  # [m, m', h]


def importance_from_rho(rho: np.ndarray) -> np.ndarray:
    """``ρ[m, m', h]`` → importance ``I_m`` (M,), the Methods' min-max scaling over ``m'``."""
    rho = np.asarray(rho, dtype=np.float64)
    lo, hi = rho.min(axis=1, keepdims=True), rho.max(axis=1, keepdims=True)
    span = hi - lo
    scaled = np.divide(rho - lo, span, out=np.zeros_like(rho), where=span > 0)
    return scaled.sum(axis=(1, 2))


def importance_scores(alpha: np.ndarray) -> np.ndarray:
    """Importance ``I_m`` of each marker from one image's attention ``α[h, m', m, i, j]``."""
    return importance_from_rho(marker_rho(alpha))


def importance_table(rho_by_region: dict[str, np.ndarray], markers: Sequence[str],
                     uniprot_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (region, marker): ``importance``, its rank in the region (1 = highest) and the
    importance divided by its maximum in the region (``relative``, for figures)."""
    rows = []
    for region, rho in rho_by_region.items():
        scores = importance_from_rho(rho)
        if len(scores) != len(markers):
            raise ValueError(f"{region}: {len(scores)} scores for {len(markers)} markers")
        order = np.argsort(-scores, kind="stable")
        rank = np.empty(len(scores), dtype=int)
        rank[order] = np.arange(1, len(scores) + 1)
        top = scores.max() if len(scores) and scores.max() > 0 else 1.0
        for m, name in enumerate(markers):
            rows.append({"region": region, "marker": name,
                         "uniprot_id": None if uniprot_ids is None else uniprot_ids[m],
                         "importance": float(scores[m]), "relative": float(scores[m] / top), "rank": int(rank[m])})
    return pd.DataFrame(rows)


def stitch_maps(maps: Sequence[np.ndarray], corners: Sequence[tuple[int, int]], image_shape: tuple[int, int],
                patch_size: int) -> np.ndarray:
    """Per-crop ``(h, w)`` grids placed at their crops' pixel corners on the tissue's patch grid
    ``(H // patch, W // patch)``; positions no crop covers are NaN (shown blank)."""
    out = np.full((image_shape[0] // patch_size, image_shape[1] // patch_size), np.nan)
    for grid, (y, x) in zip(maps, corners):
        gy, gx = y // patch_size, x // patch_size
        h, w = min(grid.shape[0], out.shape[0] - gy), min(grid.shape[1], out.shape[1] - gx)
        out[gy : gy + h, gx : gx + w] = grid[:h, :w]
    return out


def plot_importance(table: pd.DataFrame, path: str | Path, top: int = 15) -> Path:
    """Heat map of the relative importance of each marker (columns: the ``top`` markers by mean
    relative importance) in each region (rows), as in Suppl. Fig. 20c."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wide = table.pivot(index="region", columns="marker", values="relative")
    wide = wide[wide.mean().sort_values(ascending=False).index[:top]]
    fig, ax = plt.subplots(figsize=(0.45 * wide.shape[1] + 2.5, 0.35 * wide.shape[0] + 1.6))
    im = ax.imshow(wide.to_numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(wide.shape[0]), wide.index, fontsize=7)
    ax.set_title("Marker importance (first marker-attention layer)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="importance / max")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


def plot_attention_map(background: np.ndarray, attention: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The tissue (``background``, (H, W), e.g. the mean of its preprocessed channels; NaN = not
    covered by a crop, left blank) beside the stitched attention grid upsampled onto it (Suppl. Fig. 20a–b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, W = background.shape
    background = np.ma.masked_invalid(background)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4 * H / max(W, 1) + 0.6))
    axes[0].imshow(background, cmap="gray")
    axes[0].set_title("tissue (mean of channels, crops scored)", fontsize=8)
    axes[1].imshow(background, cmap="gray")
    im = axes[1].imshow(np.ma.masked_invalid(attention), cmap="inferno", alpha=0.6, extent=(0, W, H, 0),
                        interpolation="nearest")
    axes[1].set_title("channel-summary → patch-summary attention", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
