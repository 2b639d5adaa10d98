"""The LightningModule of tiled ROSIE prediction: one output region per ``predict_step``.

Thin glue around :class:`~lightning_modules.rosie_inference.predictor.PatchPredictor`, which
already settles each network's input convention (the project's :class:`~lightning_modules.rosie.RosieModule`
checkpoints and the authors' released weights, which are not a RosieModule) and its output scales;
the region is cut into patches on the device by the tile function (``exact``: every patch through
the network, :func:`~lightning_modules.rosie_inference.tiles.predict_tile`; ``dense``: the
dense approximation, :func:`~lightning_modules.rosie_inference.dense.predict_tile_dense`, imported
only when chosen). What happens to a region's predictions is the prediction writer's job
(:mod:`callbacks.rosie_prediction_writer`).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np

from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.tiles import predict_tile

MODES = ("exact", "dense")


def tile_function(mode: str) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The region predictor of ``mode``; ``dense`` is imported here so ``exact`` never depends on it."""
    if mode == "exact":
        return predict_tile
    if mode == "dense":
        return importlib.import_module("lightning_modules.rosie_inference.dense").predict_tile_dense
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")


class RosieTilePredictor(L.LightningModule):
    """``predict_step(region item) -> {plan, region_index, pred (M, th, tw), values (K, M), hist, seconds}``."""

    def __init__(self, predictor: PatchPredictor, batch_size: int = 64, mode: str = "exact"):
        super().__init__()
        self.network = predictor.model  # registered, so Lightning places it on the rank's device
        self.predictor = predictor
        self.batch_size = batch_size
        self.tile_fn = tile_function(mode)

    def on_predict_start(self) -> None:
        self.predictor.to(self.device)

    def predict_step(self, batch: dict | None, batch_idx: int) -> Any:
        if batch is None:
            return None
        start = time.perf_counter()
        fg = batch["fg"]
        M = self.predictor.num_markers
        pred = np.zeros((M,) + fg.shape, dtype=np.float32)
        values = np.zeros((0, M), dtype=np.float32)
        if batch["region"] is not None:
            pred, values = self.tile_fn(batch["region"], fg, self.predictor, batch["stride"], self.batch_size)
        return {"plan": batch["plan"], "region_index": batch["region_index"], "pred": pred, "values": values,
                "hist": batch["hist"], "seconds": time.perf_counter() - start}
