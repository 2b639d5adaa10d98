"""The prediction writer of tiled ROSIE prediction: regions into the output image, tissues finished.

Each region a rank predicts goes straight into its own chunks of the tissue's OME-Zarr and leaves
its record (:meth:`~lightning_modules.rosie_inference.tile_plan.PlanFiles.write_region`); ranks
never share a chunk, so no lock is taken. When every rank is done, global rank 0 assembles each
tissue from its records (:func:`~lightning_modules.rosie_inference.tissue_finish.finish_tissue`:
native image, QC, cells, completion record) and folds the records into the dataset tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_modules.rosie_inference.records import merge_records
from lightning_modules.rosie_inference.tissue_finish import finish_tissue

log = logging.getLogger(__name__)


class RosiePredictionWriter(BasePredictionWriter):
    """Writes regions as they come; ``on_tissue(entry)`` is told about each finished tissue (rank 0)."""

    def __init__(self, out: str, on_tissue: Callable[[dict], Any] | None = None, quiet: bool = False):
        super().__init__(write_interval="batch")
        self.out = str(out)
        self.on_tissue = on_tissue
        self.quiet = quiet
        self.regions_written: list[tuple[str, int]] = []
        self.finished: list[dict] = []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if prediction is None:
            return
        files = trainer.datamodule.plans[prediction["plan"]]
        k = int(prediction["region_index"])
        files.write_region(k, prediction["pred"], prediction["values"], prediction["hist"], prediction["seconds"],
                           rank=trainer.global_rank)
        self.regions_written.append((files.plan.tissue_id, k))
        log.debug("rank %d wrote %s region %d", trainer.global_rank, files.plan.tissue_id, k)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("rosie-regions-written")
        if trainer.is_global_zero:
            plans = trainer.datamodule.plans
            for files in plans:
                missing = files.pending()
                if missing:  # a rank failed without stopping the run: leave the tissue resumable
                    log.error("%s: %d region(s) have no record; rerun to finish them", files.plan.tissue_id, len(missing))
                    continue
                entry = finish_tissue(files, update_shared=False, quiet=self.quiet)
                self.finished.append(entry)
                if self.on_tissue is not None:
                    self.on_tissue(entry)
            if plans:
                merge_records(self.out)
        trainer.strategy.barrier("rosie-tissues-finished")
