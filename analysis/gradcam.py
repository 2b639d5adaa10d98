"""Grad-CAM for the ROSIE regressor (paper Methods, "Gradient heatmaps").

For a marker output: gradients of that output w.r.t. the last convolutional stage's feature maps
are averaged over space to weight the channels; the weighted sum of activations, passed through
ReLU, is upsampled to the input size.  For a ConvNeXt the hooked layer is the last stage (timm
``stages[-1]``, torchvision ``features[-1]``); any other model can pass ``target_layer``.

:func:`gradcam_figure` is the evaluation's figure: uint8 H&E patches in, the model's input built by
the caller's ``prepare`` function, markers named by the caller's alias mapping (so this module
needs no marker table).

torch + matplotlib only; no Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def find_last_stage(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM uses: ConvNeXt's last stage, else the last Conv2d."""
    for name, mod in model.named_modules():
        if name.endswith("stages") and isinstance(mod, nn.Sequential) and len(mod):
            return mod[-1]  # timm ConvNeXt (also inside a wrapper)
    for name, mod in model.named_modules():
        if name.endswith("features") and isinstance(mod, nn.Sequential) and len(mod):
            return mod[-1]  # torchvision ConvNeXt
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("gradcam: no ConvNeXt stage or Conv2d found in the model; pass target_layer")
    return convs[-1]


def gradcam(
    model: nn.Module,
    patches: torch.Tensor,
    marker_indices: int | Sequence[int],
    target_layer: nn.Module | None = None,
    normalise: bool = True,
) -> torch.Tensor:
    """Heatmaps (B, K, H, W) for K markers on B patches, each in [0, 1] when ``normalise``.

    The model is run in eval mode with gradients on; parameters are not modified.
    """
    single = isinstance(marker_indices, int)
    idx = [marker_indices] if single else list(marker_indices)
    layer = target_layer if target_layer is not None else find_last_stage(model)
    store: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        store["act"] = out

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(hook)
    try:
        x = patches.detach().clone().requires_grad_(True)
        maps = []
        with torch.enable_grad():
            out = model(x)
            if out.ndim != 2:
                raise ValueError(f"gradcam: model output must be (B, M), got {tuple(out.shape)}")
            act = store["act"]
            for k, m in enumerate(idx):
                grads = torch.autograd.grad(out[:, m].sum(), act, retain_graph=k < len(idx) - 1)[0]
                weights = grads.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients
                cam = F.relu((weights * act).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=patches.shape[-2:], mode="bilinear", align_corners=False)
                maps.append(cam[:, 0].detach())
    finally:
        handle.remove()
        model.train(was_training)
    heat = torch.stack(maps, 1)
    if normalise:
        mx = heat.flatten(2).amax(-1)[..., None, None]
        heat = torch.where(mx > 0, heat / mx.clamp(min=1e-12), torch.zeros_like(heat))
    return heat


def _display_rgb(patch: np.ndarray) -> np.ndarray:
    """(3,H,W) or (H,W,3), uint8 or normalised float -> (H,W,3) float in [0,1] for imshow."""
    a = np.asarray(patch)
    if a.ndim == 3 and a.shape[0] == 3:
        a = np.moveaxis(a, 0, -1)
    a = a.astype(np.float64)
    if np.asarray(patch).dtype == np.uint8:
        return a / 255.0
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def plot_gradcam(
    patches: torch.Tensor | np.ndarray,
    heatmaps: torch.Tensor | np.ndarray,
    marker_names: Sequence[str],
    path: str | Path,
    alpha: float = 0.5,
) -> Path:
    """Rows = patches, columns = H&E then one overlay per marker; saved as PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patches = patches.detach().cpu().numpy() if isinstance(patches, torch.Tensor) else np.asarray(patches)
    heat = heatmaps.detach().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else np.asarray(heatmaps)
    if heat.ndim == 3:
        heat = heat[:, None]
    B, K = heat.shape[:2]
    if len(marker_names) != K:
        raise ValueError(f"plot_gradcam: {K} heatmaps per patch but {len(marker_names)} marker names")
    fig, axes = plt.subplots(B, K + 1, figsize=(2.2 * (K + 1), 2.2 * B), squeeze=False)
    for b in range(B):
        rgb = _display_rgb(patches[b])
        axes[b, 0].imshow(rgb)
        axes[b, 0].set_title("H&E" if b == 0 else "", fontsize=9)
        for k in range(K):
            axes[b, k + 1].imshow(rgb)
            axes[b, k + 1].imshow(heat[b, k], cmap="jet", alpha=alpha, vmin=0, vmax=max(float(heat[b, k].max()), 1e-12))
            if b == 0:
                axes[b, k + 1].set_title(marker_names[k], fontsize=9)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def gradcam_figure(model: nn.Module, prepare: Callable[[Any], Any], model_markers: Sequence[str], markers: Sequence[str],
                   patches_uint8: np.ndarray, path: Path, mapping: Mapping[str, str]) -> Path | None:
    """Grad-CAM of ``model`` (input = ``prepare(uint8 patches)``) for the requested markers.

    ``mapping`` takes each requested marker to its name among ``model_markers`` (aliases resolved by
    the caller with :func:`datamodules.markers.match_markers`; requested markers left out of it are
    reported and skipped). None (logged) when no requested marker is predicted or there is no patch.
    """
    missing = [m for m in markers if m not in mapping]
    if missing:
        log.warning("Grad-CAM: markers %s are not among the model's outputs; skipped", missing)
    if not mapping or len(patches_uint8) == 0:
        log.warning("Grad-CAM figure skipped: %s", "no requested marker is predicted by the model" if not mapping else "no patch")
        return None
    names = list(mapping)
    idx = [list(model_markers).index(mapping[m]) for m in names]
    x = prepare(torch.from_numpy(np.ascontiguousarray(patches_uint8)))
    heat = gradcam(model, x, idx)
    return plot_gradcam(patches_uint8, heat, names, path)
