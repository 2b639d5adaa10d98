"""Whole-tissue jobs under Lightning ``predict``: many tissues over many devices, resumable.

Used by ``experiments.virtues_tokens`` (cell / niche / tissue tokens); ROSIE prediction spreads one
slide's regions over the ranks instead (``datamodules/rosie_tiles.py``). One ``predict_step`` is one tissue:
the rank that draws it runs the same per-tissue function as the single-process CLI and writes every
per-tissue file, each atomically, ending with a completion record. Lightning's predict sampler
(`UnrepeatedDistributedSampler`) hands every tissue to exactly one rank, so no file has two
writers; dataset-level tables are folded from the completion records by rank 0 once every rank
is done (the ``merge`` callable). Callers filter out tissues whose record already exists before
the run, which makes a rerun after a crash or a pre-empted job resume where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class TissueJob(NamedTuple):
    """One tissue to predict: ``source`` is 'store' (a dataset tissue) or 'file' (an H&E image).

    A NamedTuple, not a dataclass: Lightning's batch-to-device pass rebuilds tuples but refuses
    frozen dataclasses.
    """

    source: str
    tissue_id: str


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


class TissueWorker(Protocol):
    """What a rank needs: the network (placed on the rank's device by Lightning) and a `to`."""

    model: torch.nn.Module

    def to(self, device: torch.device) -> Any: ...


class TissueJobModule(L.LightningModule):
    """Runs ``run_job(job, worker, rank)`` per tissue on the rank's device; rank 0 calls ``merge``.

    Glue only: ``run_job`` is the single-process per-tissue function, writing per-tissue files only
    (never dataset-level tables, which ``merge`` rebuilds from the completion records).
    """

    def __init__(self, worker: TissueWorker, run_job: Callable[[TissueJob, Any, int], Any],
                 merge: Callable[[], Any] | None = None):
        super().__init__()
        self.network = worker.model  # registered, so Lightning places it on the rank's device
        self.worker = worker
        self.run_job = run_job
        self.merge = merge
        self.written: list[str] = []

    def on_predict_start(self) -> None:
        self.worker.to(self.device)

    def predict_step(self, job: TissueJob | None, batch_idx: int) -> Any:
        if job is None:
            return None
        result = self.run_job(job, self.worker, self.global_rank)
        self.written.append(job.tissue_id)
        print(f"rank {self.global_rank} wrote tissue {job.tissue_id}", flush=True)
        return result

    def on_predict_epoch_end(self) -> None:
        self.trainer.strategy.barrier("tissue-jobs-merge")
        if self.trainer.is_global_zero and self.merge is not None:
            self.merge()
        self.trainer.strategy.barrier("tissue-jobs-merged")


def run_tissue_jobs(worker: TissueWorker, jobs: Sequence[TissueJob], run_job: Callable[[TissueJob, Any, int], Any],
                    merge: Callable[[], Any] | None = None, accelerator: str = "auto", devices: int | str = "auto",
                    num_nodes: int = 1, strategy: str | None = None, progress: bool = True) -> list[str]:
    """Run ``jobs`` with a Lightning Trainer over ``devices`` × ``num_nodes``; returns the tissue ids
    this process wrote. ``strategy`` defaults to ddp when more than one device or node is asked for."""
    if strategy is None:
        strategy = "ddp" if devices not in (1, "1") or num_nodes > 1 else "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, inference_mode=True)
    module = TissueJobModule(worker, run_job, merge)
    with torch.no_grad():  # scoped, so a caller in the same process keeps its autograd state
        trainer.predict(module, dataloaders=job_loader(jobs, trainer.world_size), return_predictions=False)
    return module.written


def parse_devices(value: str | int | None) -> int | str:
    """CLI ``--devices``: an int, or a Lightning string such as 'auto' or '0,1'."""
    value = "auto" if value is None else value
    return int(value) if str(value).isdigit() else str(value)
