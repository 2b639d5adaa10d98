"""Patch-level ground truth (the HEX sample-data layout): its container and the per-patch prediction.

Why a module of its own: in this mode the truth is one mean CODEX intensity per H&E patch (e.g.
HEX's 224 px), not a measured image, so the model must be run on each patch and its block
predictions averaged — a prediction policy, not a metric. The metric tables it feeds are those of
:mod:`analysis.rosie_evaluation`; the folders are read by
:func:`datamodules.rosie_evaluation_data.load_patch_level_truth`; the orchestration is
:func:`experiments.rosie_evaluation_pipeline.evaluate_patch_level`.

numpy + torch; no Lightning. A model enters only as a callable (``predict_fn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.rosie_evaluation import MODEL_PATCH, EvaluationError

PredictFn = Callable[[Any], Any]  # uint8 torch (B,3,P,P) -> (B,M) tensor/array


@dataclass
class PatchLevelTruth:
    """A patch-level truth folder in memory: its markers and, per slide, the patches and their means."""

    markers: list[str]
    slides: dict[str, tuple[list[Path], np.ndarray]]  # slide -> (patch PNG paths, (n_patches, K) mean intensities)


def predict_patch_mean(predict_fn: PredictFn, patch: np.ndarray, stride: int = 8, window: int = MODEL_PATCH,
                       pad_mode: str = "reflect", batch_size: int = 256) -> np.ndarray:
    """(M,) predicted mean expression over a whole H&E patch (e.g. HEX's 224 px).

    Policy ("predict each block and average"): the patch is cut into ``stride`` x ``stride``
    blocks; each block is predicted from the ``window`` px input centred on it, exactly as in
    whole-slide inference, and the block predictions are averaged, which estimates the mean
    intensity over the whole patch (what the CSV holds). Window pixels beyond the patch are filled
    by mirror reflection of the patch (``pad_mode``; the real neighbouring tissue is not available,
    and reflected tissue is closer to it than white glass). ``stride=8`` is ROSIE's block size.
    """
    _, H, W = patch.shape
    half = window // 2
    padded = np.pad(patch, ((0, 0), (half, half), (half, half)), mode=pad_mode)
    cy = np.arange(H // stride) * stride + stride // 2
    cx = np.arange(W // stride) * stride + stride // 2
    if len(cy) == 0 or len(cx) == 0:
        raise EvaluationError(f"patch of {H}x{W} px is smaller than one {stride} px block")
    t = torch.from_numpy(np.ascontiguousarray(padded))
    wins = [t[:, y : y + window, x : x + window] for y in cy for x in cx]  # centre (y,x) -> padded top-left (y,x)
    outs = []
    for s in range(0, len(wins), batch_size):
        with torch.no_grad():
            o = predict_fn(torch.stack(wins[s : s + batch_size]))
        outs.append(o.detach().float().cpu().numpy() if hasattr(o, "detach") else np.asarray(o, dtype=np.float32))
    return np.concatenate(outs).astype(np.float64).mean(0)
