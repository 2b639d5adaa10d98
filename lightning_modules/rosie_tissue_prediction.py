"""Whole-tissue ROSIE prediction under Lightning ``predict``: many tissues over many devices.

One ``predict_step`` is one tissue: the rank that draws it streams the tissue's patches through
:func:`lightning_modules.rosie_inference.predict_to_dataset` and writes every per-tissue file
(images, masks, OME-TIFF, cells, completion record), each atomically. Lightning's predict sampler
(`UnrepeatedDistributedSampler`) hands every tissue to exactly one rank, so no file has two
writers. The dataset-level tables (`metadata/tissues.parquet`, `qc.json`, `qc.csv`) are folded
from the completion records by rank 0 once every rank is done
(:func:`lightning_modules.rosie_inference.merge_records`).

Tissues whose completion record already exists are filtered out before the run by the caller
(:func:`pending_jobs`), which makes a rerun after a crash or a pre-empted job resume where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.rosie_inference import PatchPredictor, PredictOptions, is_complete, merge_records

log = logging.getLogger(__name__)


class TissueJob(NamedTuple):
    """One tissue to predict: ``source`` is 'store' (a dataset tissue) or 'file' (an H&E image).

    A NamedTuple, not a dataclass: Lightning's batch-to-device pass rebuilds tuples but refuses
    frozen dataclasses.
    """

    source: str
    tissue_id: str


def pending_jobs(jobs: Sequence[TissueJob], out: str, options: PredictOptions) -> tuple[list[TissueJob], list[TissueJob]]:
    """Split ``jobs`` into (to run, already complete); with ``options.overwrite`` everything runs."""
    if options.overwrite:
        return list(jobs), []
    todo, done = [], []
    for job in jobs:
        (done if is_complete(out, job.tissue_id, options) else todo).append(job)
    return todo, done


class TissueJobDataset(Dataset):
    """The jobs, padded with ``None`` up to ``min_length`` (the world size).

    Lightning's predict sampler asserts that every rank gets at least one item; ranks that draw
    a padding item do nothing.
    """

    def __init__(self, jobs: Sequence[TissueJob], min_length: int = 1):
        self.items: list[TissueJob | None] = list(jobs) + [None] * max(0, min_length - len(jobs))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TissueJob | None:
        return self.items[index]


def _first(items: list) -> object:
    return items[0]


def job_loader(jobs: Sequence[TissueJob], world_size: int) -> DataLoader:
    return DataLoader(TissueJobDataset(jobs, world_size), batch_size=1, shuffle=False, collate_fn=_first)


class WholeTissuePrediction(L.LightningModule):
    """Runs ``run_job(job, predictor, rank)`` per tissue on the rank's device; rank 0 merges at the end.

    ``run_job`` returns the tissue's QC entry (or None) and must write with
    ``update_shared=False``; the module is glue only, the prediction itself is the same code path
    as the single-process CLI.
    """

    def __init__(self, predictor: PatchPredictor, out: str,
                 run_job: Callable[[TissueJob, PatchPredictor, int], dict | None]):
        super().__init__()
        self.network = predictor.model  # registered, so Lightning places it on the rank's device
        self.predictor = predictor
        self.out = out
        self.run_job = run_job
        self.written: list[str] = []

    def on_predict_start(self) -> None:
        self.predictor.to(self.device)

    def predict_step(self, job: TissueJob | None, batch_idx: int) -> dict | None:
        if job is None:
            return None
        entry = self.run_job(job, self.predictor, self.global_rank)
        self.written.append(job.tissue_id)
        print(f"rank {self.global_rank} wrote tissue {job.tissue_id}", flush=True)
        return entry

    def on_predict_epoch_end(self) -> None:
        self.trainer.strategy.barrier("rosie-predict-merge")
        if self.trainer.is_global_zero:
            merged = merge_records(self.out)
            log.info("merged %d tissue records into %s/qc.json, qc.csv and the tissues table", merged, self.out)
        self.trainer.strategy.barrier("rosie-predict-merged")


def predict_tissues_distributed(predictor: PatchPredictor, jobs: Sequence[TissueJob], out: str,
                                run_job: Callable[[TissueJob, PatchPredictor, int], dict | None],
                                accelerator: str = "auto", devices: int | str = "auto", num_nodes: int = 1,
                                strategy: str | None = None, progress: bool = True) -> list[str]:
    """Predict ``jobs`` with a Lightning Trainer over ``devices`` × ``num_nodes``; returns the tissue
    ids this process wrote."""
    torch.set_grad_enabled(False)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        strategy=strategy or "auto", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, inference_mode=True)
    module = WholeTissuePrediction(predictor, out, run_job)
    trainer.predict(module, dataloaders=job_loader(jobs, trainer.world_size), return_predictions=False)
    return module.written
