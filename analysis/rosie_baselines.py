"""The two non-deep baselines of the ROSIE paper (Methods, "Baseline methods").

*H&E expression*: "we apply a simple threshold (>50), averaged across the three color channels, and
then use the intensity to predict each biomarker."  Implemented as: per pixel, intensity = mean of
R, G, B; pixels with intensity <= 50 (black: slide edge, scanner padding, pen) are dropped; the
prediction for a patch is the mean intensity of the remaining pixels of its 8x8 target area, the
same value for every marker (0 when no pixel survives).  The raw intensity is used (not inverted),
as written; ``invert=True`` gives 255 - intensity (stain darkness) for a sanity check.

*Cell morphology*: 19 HistomicsTK morphometry features per cell (computed here with
``skimage.measure.regionprops``, which HistomicsTK wraps: circularity 4*pi*A/P^2, minor/major
axis ratio, Hu moments of the binary mask) + mean R, G, B of the cell = 22 features.  A patch gets
the area-weighted mean of the features of the cells covering its 8x8 target area (each pixel
contributes its cell's features), plus an indicator "any cell present"; patches with no cell get
zeros (after standardisation, i.e. the mean) and indicator 0.  Features are standardised with
training statistics.  A three-hidden-layer MLP (100 units, ReLU each, linear read-out to the
markers), Adam lr 1e-4, MSE over present markers, 50 epochs, keeping the weights with the best
validation loss (the paper says "best validation accuracy"; for regression we use MSE).

Both baselines are scored on exactly the evaluation's patches: :func:`he_expression_predictions`
and :func:`cell_morphology_predictions` take what :mod:`datamodules.rosie_evaluation_data` read
(:class:`~analysis.rosie_evaluation.TissuePatches`, :class:`MorphologyData`) and return per-block
predictions for the metric tables of :mod:`analysis.rosie_evaluation`.

Plain numpy/skimage/torch; no Lightning.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from skimage.measure import regionprops
from torch import nn

from analysis.rosie_evaluation import TissuePatches
from analysis.rosie_metrics import rgb_channels_last

log = logging.getLogger(__name__)

MORPHOLOGY_FEATURES: tuple[str, ...] = (
    "Orientation",
    "Area",
    "ConvexHullArea",
    "MajorAxisLength",
    "MinorAxisLength",
    "Perimeter",
    "Circularity",
    "Eccentricity",
    "EquivalentDiameter",
    "Extent",
    "MinorMajorAxisRatio",
    "Solidity",
    *(f"HuMoment{k}" for k in range(1, 8)),
)
CELL_FEATURES: tuple[str, ...] = (*MORPHOLOGY_FEATURES, "MeanR", "MeanG", "MeanB")
PATCH_FEATURES: tuple[str, ...] = (*CELL_FEATURES, "HasCell")


def _window_index(origins: np.ndarray, patch: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row/col index arrays (N, patch*patch) of the ``patch`` x ``patch`` windows at ``origins``."""
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    H, W = shape
    if origins.size and (origins.min() < 0 or (origins[:, 0] + patch).max() > H or (origins[:, 1] + patch).max() > W):
        raise ValueError(f"patch origins must keep the {patch}x{patch} window inside the image {shape}")
    dy, dx = np.meshgrid(np.arange(patch), np.arange(patch), indexing="ij")
    rows = origins[:, :1] + dy.reshape(1, -1)
    cols = origins[:, 1:] + dx.reshape(1, -1)
    return rows, cols


def grid_origins(shape: tuple[int, int], patch: int = 8) -> np.ndarray:
    """(h*w, 2) top-left corners of the non-overlapping ``patch`` grid, row-major (the stride-8 grid)."""
    h, w = shape[0] // patch, shape[1] // patch
    yy, xx = np.meshgrid(np.arange(h) * patch, np.arange(w) * patch, indexing="ij")
    return np.stack([yy.reshape(-1), xx.reshape(-1)], 1)


# ----------------------------------------------------------------------------- H&E expression


def he_intensity_at(
    he_image: np.ndarray, origins: np.ndarray, patch: int = 8, threshold: float = 50.0, invert: bool = False
) -> np.ndarray:
    """(N,) mean RGB-averaged intensity of pixels > ``threshold`` in each ``patch`` window."""
    hwc = rgb_channels_last(he_image).astype(np.float64)
    inten = hwc.mean(-1)
    rows, cols = _window_index(origins, patch, inten.shape)
    px = inten[rows, cols]
    keep = px > threshold
    n = keep.sum(1)
    out = np.where(n > 0, np.where(keep, px, 0.0).sum(1) / np.maximum(n, 1), 0.0)
    return 255.0 - out if invert else out


def he_expression_baseline(
    he_image: np.ndarray,
    origins: np.ndarray,
    num_markers: int,
    patch: int = 8,
    threshold: float = 50.0,
    invert: bool = False,
) -> np.ndarray:
    """(N, num_markers) H&E expression baseline: the patch intensity for every marker."""
    v = he_intensity_at(he_image, origins, patch, threshold, invert)
    return np.repeat(v[:, None], num_markers, axis=1)


# ----------------------------------------------------------------------------- cell morphology


def cell_features(cell_mask: np.ndarray, he_image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell features from an instance mask: (labels (C,), features (C, 22)).

    Columns follow :data:`CELL_FEATURES`; without ``he_image`` the mean RGB columns are NaN.
    """
    mask = np.asarray(cell_mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"cell_mask: expected a 2-D integer instance mask, got {mask.dtype} {mask.shape}")
    hwc = None
    if he_image is not None:
        hwc = rgb_channels_last(he_image)
        if hwc.shape[:2] != mask.shape:
            raise ValueError(f"he_image {hwc.shape[:2]} and cell_mask {mask.shape} must have the same (H, W)")
    props = regionprops(mask, intensity_image=hwc)
    labels = np.array([p.label for p in props], dtype=np.int64)
    feats = np.zeros((len(props), len(CELL_FEATURES)), dtype=np.float64)
    for i, p in enumerate(props):
        area, perim = float(p.area), float(p.perimeter)
        major, minor = float(p.axis_major_length), float(p.axis_minor_length)
        feats[i, :12] = (
            p.orientation,
            area,
            p.area_convex,
            major,
            minor,
            perim,
            4 * np.pi * area / perim**2 if perim > 0 else 0.0,
            p.eccentricity,
            p.equivalent_diameter_area,
            p.extent,
            minor / major if major > 0 else 0.0,
            p.solidity,
        )
        feats[i, 12:19] = p.moments_hu
        feats[i, 19:22] = p.intensity_mean if hwc is not None else np.nan
    return labels, feats


def patch_morphology_features(
    cell_mask: np.ndarray,
    he_image: np.ndarray | None,
    origins: np.ndarray,
    patch: int = 8,
    chunk: int = 4096,
) -> np.ndarray:
    """(N, 23) raw patch features: area-weighted mean of the cells covering each ``patch`` window
    (each pixel contributes its cell's 22 features) + ``HasCell``; zeros where no cell."""
    mask = np.asarray(cell_mask)
    labels, feats = cell_features(mask, he_image)
    lut = np.zeros((int(mask.max()) + 1 if mask.size else 1, feats.shape[1]), dtype=np.float64)
    lut[labels] = np.nan_to_num(feats)
    rows, cols = _window_index(origins, patch, mask.shape)
    out = np.zeros((rows.shape[0], len(PATCH_FEATURES)), dtype=np.float64)
    for s in range(0, rows.shape[0], chunk):
        lab = mask[rows[s : s + chunk], cols[s : s + chunk]]  # (n, patch*patch)
        cnt = (lab > 0).sum(1)
        summed = lut[lab].sum(1)  # background label 0 has zero features
        has = cnt > 0
        out[s : s + chunk, :-1] = np.where(has[:, None], summed / np.maximum(cnt, 1)[:, None], 0.0)
        out[s : s + chunk, -1] = has
    return out


class MorphologyMLP(nn.Module):
    """Three hidden layers of 100 units, each followed by ReLU, and a linear read-out."""

    def __init__(self, in_features: int, num_markers: int, hidden: int = 100, n_hidden: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(n_hidden):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, num_markers))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _masked_mse(pred: torch.Tensor, y: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    diff = torch.where(present, pred - y, torch.zeros_like(pred))
    return diff.pow(2).sum() / present.sum().clamp(min=1)


@dataclass
class MorphologyBaseline:
    """Standardise patch features, fit the MLP, predict markers.

    ``fit`` keeps the weights of the epoch with the lowest validation MSE (on the training set if
    no validation set is given).
    """

    num_markers: int
    epochs: int = 50
    lr: float = 1e-4
    batch_size: int = 256
    seed: int = 0
    mean_: np.ndarray | None = None
    std_: np.ndarray | None = None
    model: MorphologyMLP | None = None
    history: list[dict] = field(default_factory=list)

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        has = x[:, -1] > 0
        z = (x - self.mean_) / self.std_
        z[:, :-1] = np.where(has[:, None], z[:, :-1], 0.0)  # no cell -> mean features
        z[:, -1] = x[:, -1]  # the indicator stays 0/1
        return z.astype(np.float32)

    def fit(self, *args, **kwargs) -> "MorphologyBaseline":  # type: ignore[no-untyped-def]
        """Train the MLP (see :meth:`_fit`) single-threaded: a 100-unit MLP's ops are so small that
        thread hand-offs dominate; on a 2-core machine one thread is ~10x faster."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._fit(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    def _fit(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        present_train: np.ndarray | None = None,
        x_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        present_val: np.ndarray | None = None,
    ) -> "MorphologyBaseline":
        x_train = np.asarray(x_train, dtype=np.float64)
        if x_train.ndim != 2 or len(x_train) != len(y_train):
            raise ValueError(f"x_train {x_train.shape} and y_train {np.shape(y_train)} must be (N, F) and (N, M)")
        has = x_train[:, -1] > 0
        ref = x_train[has] if has.any() else x_train
        self.mean_ = ref.mean(0)
        self.std_ = ref.std(0)
        self.std_[self.std_ == 0] = 1.0
        self.mean_[-1], self.std_[-1] = 0.0, 1.0
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.model = MorphologyMLP(x_train.shape[1], self.num_markers)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)

        def tensors(x, y, p):
            y = np.asarray(y, dtype=np.float32)
            p = np.isfinite(y) if p is None else (np.asarray(p, bool) & np.isfinite(y))
            return torch.from_numpy(self._standardise(x)), torch.from_numpy(np.nan_to_num(y)), torch.from_numpy(p)

        xt, yt, pt = tensors(x_train, y_train, present_train)
        xv, yv, pv = (xt, yt, pt) if x_val is None else tensors(x_val, y_val, present_val)
        best, best_state = float("inf"), None
        self.history = []
        for epoch in range(self.epochs):
            self.model.train()
            perm = torch.randperm(len(xt), generator=gen)
            for s in range(0, len(xt), self.batch_size):
                idx = perm[s : s + self.batch_size]
                loss = _masked_mse(self.model(xt[idx]), yt[idx], pt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.model.eval()
            with torch.no_grad():
                val = float(_masked_mse(self.model(xv), yv, pv))
            self.history.append({"epoch": epoch, "val_mse": val})
            if val < best:
                best, best_state = val, copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(best_state)
        log.info("morphology baseline: best validation MSE %.4g over %d epochs", best, self.epochs)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("MorphologyBaseline.predict called before fit")
        self.model.eval()
        with torch.no_grad():
            return self.model(torch.from_numpy(self._standardise(x))).numpy().astype(np.float64)


def morphology_baseline_features(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], patch: int = 8
) -> np.ndarray:
    """Stack patch features of several samples given as (cell_mask, he_image, origins)."""
    return np.concatenate([patch_morphology_features(m, he, o, patch) for m, he, o in samples])


# ----------------------------------------------------------------------------- on the evaluation's patches


def he_expression_predictions(he: np.ndarray, tp: TissuePatches) -> np.ndarray:
    """(N, M) H&E expression baseline on ``tp``'s blocks; ``he`` is the truth H&E (3, H, W) at the truth resolution."""
    return he_expression_baseline(he, tp.origins, tp.truth.shape[1], patch=tp.stride).astype(np.float32)


@dataclass
class MorphologyData:
    """Everything the cell-morphology baseline needs, already read from the truth dataset.

    ``train``/``val`` are (features (N, F), targets (N, M), presence (N, M)) of the in-tissue blocks
    of the truth dataset's ``train``/``val`` tissues (``val`` None without usable val tissues);
    ``features`` maps each evaluated tissue id to the (N, F) features of its ``TissuePatches`` rows.
    ``n_train_tissues`` is the number of ``train`` tissues in the tissues table (for the log).
    """

    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    features: dict[str, np.ndarray]
    n_train_tissues: int


def cell_morphology_predictions(data: MorphologyData, epochs: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Train the morphology MLP on ``data.train`` (validated on ``data.val``); predict the evaluated tissues.

    Returns {tissue_id: (N, M) predictions}. Targets are z-scored per marker with the training
    statistics (MSE would otherwise be dominated by bright markers) and mapped back. Whether the
    baseline can run at all (cell masks, H&E, a ``split`` column) is decided where the data is
    read, :func:`datamodules.rosie_evaluation_data.cell_morphology_inputs`.
    """
    val = data.val
    x, y, p = data.train
    y = np.where(p, y, np.nan).astype(np.float64)
    mu = np.nanmean(y, 0)
    sd = np.nanstd(y, 0)
    mu, sd = np.nan_to_num(mu), np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    model = MorphologyBaseline(num_markers=y.shape[1], epochs=epochs, seed=seed)
    kwargs = {}
    if val is not None:
        kwargs = {"x_val": val[0], "y_val": (np.where(val[2], val[1], np.nan) - mu) / sd, "present_val": val[2]}
    log.info("cell_morphology: training on %d patches of %d train tissues (%s validation patches), %d epochs",
             len(x), data.n_train_tissues, len(val[0]) if val is not None else "no val tissue: train", epochs)
    model.fit(x, (y - mu) / sd, p, **kwargs)
    out = {}
    for tissue_id, feats in data.features.items():
        out[tissue_id] = (model.predict(feats) * sd + mu).astype(np.float32)
    return out
