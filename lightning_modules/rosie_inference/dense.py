"""``--mode dense``: one tile's predictions from one ConvNeXt pass over its region (shift-and-stitch).

Same contract as :func:`~lightning_modules.rosie_inference.tiles.predict_tile` (same region, same
foreground, same outputs), but instead of cutting the region into 128 px patches and running the
network on each, :class:`~lightning_modules.components.rosie_dense.DenseConvNeXt` runs the backbone
over the whole region once (shifted only where the stride needs it) and pools each window's 4×4
feature cells. At stride 8 that is ~50× fewer FLOPs per output pixel; the price is that a window
sees its real neighbours through the 7×7 convolutions where exact mode sees zero padding, so
predictions are close to exact mode, not equal (``python -m benchmarks.rosie_dense`` measures how
close). Exact mode stays the default.

Only native-resolution networks qualify: a checkpoint that resizes 128 -> 224 px (the authors'
inference) cannot be pooled from a shared map on the 8 px grid, and is refused with a message
pointing to exact mode; a checkpoint trained on a centre crop (``input_center_crop``) is pooled
over the crop's cells.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lightning_modules.components.rosie_backbone import RosieInputAdapter
from lightning_modules.components.rosie_dense import DenseConvNeXt, is_dense_compatible
from lightning_modules.rosie_inference.predictor import PatchPredictor


@dataclasses.dataclass
class DenseNetwork:
    """What dense mode runs: the pooled backbone, the input normalisation, and where the window sits.

    ``inset`` px: the network's window is the patch's central ``window`` px (``inset = (P − window)/2``),
    for checkpoints trained with a centre crop; 0 for the full 128 px patch.
    """

    dense: DenseConvNeXt
    mean: torch.Tensor | None  # (1, 3, 1, 1) normalisation done by the adapter, or None
    std: torch.Tensor | None
    inset: int


def dense_network(model: nn.Module, patch_size: int = 128) -> DenseNetwork:
    """The :class:`DenseNetwork` of a predictor's network, or ValueError when dense mode cannot run it.

    Accepts a bare timm ConvNeXt, :class:`RosieRegressor` and the Lightning ``RosieModule`` (both
    ``adapter`` + ``backbone``). A resizing adapter (the authors' 128 -> 224 px inference) is
    refused: its windows do not sit on a shared feature grid at the 8 px output stride.
    """
    adapter: nn.Module = getattr(model, "adapter", nn.Identity())
    backbone = getattr(model, "backbone", model)
    window, mean, std = patch_size, None, None
    if isinstance(adapter, RosieInputAdapter):
        if adapter.resize_to not in (None, patch_size):
            raise ValueError(
                f"--mode dense needs a network that sees the {patch_size} px patch at its native size; this one "
                f"resizes to {adapter.resize_to} px first (e.g. the authors' 224 px inference): use --mode exact")
        if adapter.center_crop is not None and adapter.center_crop < patch_size:
            window = adapter.center_crop
            if (patch_size - window) % 2:
                raise ValueError(f"--mode dense: centre crop {window} px is not centred on whole pixels; use --mode exact")
        if adapter.normalise:
            mean, std = adapter.mean, adapter.std
    elif not isinstance(adapter, nn.Identity):
        raise ValueError(f"--mode dense: unknown input adapter {type(adapter).__name__}; use --mode exact")
    if not is_dense_compatible(backbone):
        raise ValueError(f"--mode dense needs a timm ConvNeXt backbone, got {type(backbone).__name__}; use --mode exact")
    return DenseNetwork(DenseConvNeXt(backbone, window=window), mean, std, (patch_size - window) // 2)


@torch.inference_mode()
def dense_region(region: np.ndarray | torch.Tensor, predictor: PatchPredictor, stride: int) -> torch.Tensor:
    """``(ni, nj, M)`` float32 predictions (in output units) of every patch of a uint8 ``(3, H, W)`` region.

    Patch ``[i, j]`` has its top-left corner at ``(i·stride, j·stride)`` (``ni = (H − P)//stride + 1``).
    """
    net = dense_network(predictor.model, predictor.patch_size)
    reg = torch.as_tensor(np.ascontiguousarray(region)) if isinstance(region, np.ndarray) else region
    H, W = reg.shape[-2:]
    c = net.inset
    x = predictor.prepare(reg[:, c : H - c, c : W - c].to(predictor.device, non_blocking=True)[None])
    if net.mean is not None:
        x = (x - net.mean.to(x)) / net.std.to(x)
    with torch.autocast(predictor.device.type, dtype=torch.bfloat16, enabled=predictor.amp):
        out = net.dense(x, stride).float()
    if out.shape[-1] != predictor.num_markers:
        raise ValueError(f"model returned {out.shape[-1]} outputs, expected {predictor.num_markers}")
    return out * predictor.scales if predictor.scales is not None else out


def predict_tile_dense(region: np.ndarray, tile_fg: np.ndarray, predictor: PatchPredictor, stride: int,
                       batch_size: int, on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dense-mode twin of :func:`~lightning_modules.rosie_inference.tiles.predict_tile`.

    ``region`` is the white-padded ``(3, (th-1)·s + P, (tw-1)·s + P)`` window of the tile; returns
    ``(pred (M, th, tw) float32, values (K, M))`` with 0 at background blocks and ``values`` the
    foreground blocks in row-major order. ``batch_size`` is accepted for the shared signature (the
    whole region is one pass); ``on_batch`` is told the tile's foreground count once.
    """
    M = predictor.num_markers
    th, tw = tile_fg.shape
    P, s = predictor.patch_size, stride
    if region.shape[-2:] != ((th - 1) * s + P, (tw - 1) * s + P):
        raise ValueError(f"region {region.shape[-2:]} does not match a {th}×{tw} tile at stride {s}")
    pred = np.zeros((M, th, tw), dtype=np.float32)
    ii, jj = np.nonzero(tile_fg)
    if len(ii) == 0:
        return pred, np.zeros((0, M), dtype=np.float32)
    out = dense_region(region, predictor, s)  # (th, tw, M)
    values = out[torch.from_numpy(ii).to(out.device), torch.from_numpy(jj).to(out.device)].cpu().numpy()
    pred[:, ii, jj] = values.T
    if on_batch is not None:
        on_batch(len(ii))
    return pred, values
