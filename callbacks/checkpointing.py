"""Periodic, atomic, resumable checkpoints: ``last.ckpt`` every N steps, plus what Lightning leaves out.

Why not a plain ``ModelCheckpoint``:

* Atomicity. Lightning 2.6 (``fabric.utilities.cloud_io._atomic_save``) buffers the checkpoint and
  writes it in an fsspec transaction whose temporary file comes from ``tempfile.mkstemp()`` — the
  *system* temp folder — and is then ``shutil.move``d into place. When that folder and the
  checkpoint folder are on different filesystems (node-local ``/tmp``, checkpoints on NFS/Lustre:
  the cluster case) the move is a copy, and a kill during it leaves a truncated ``last.ckpt``. Here
  the checkpoint is written beside its final name, fsynced and renamed (atomic on POSIX), so a reader
  finds the previous checkpoint or the new one, never a part of one.
* State Lightning does not keep. A Lightning checkpoint has the weights, optimizer, LR schedulers
  (the VirTues weight-decay schedule is a function of ``global_step``), loop progress, and the state
  of stateful train loaders (``datamodules.resumable``: the place inside the epoch). This callback
  adds the RNG states of every rank (restored when the resumed training starts) and which logger
  runs were written (class and version), so the CLI reopens the same runs (:func:`resume_info`).
* A fixed place. Checkpoints go to ``<default_root_dir>/checkpoints`` (not the logger's versioned
  folder), so ``--ckpt_path last`` finds them again from a fresh process.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _fsync(path: Path) -> None:
    """Flush a file (or every file of a sharded checkpoint folder) and its folder to disk."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(partial: Path, final: Path) -> None:
    """Move a fully written checkpoint (file, or folder of a sharded strategy) onto its final name."""
    if partial.is_dir() and final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync(final)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and ints only (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _all_ranks(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def logger_identity(logger: Any) -> dict[str, Any]:
    """What reopens a logger run: its class and version (CSV/TensorBoard version, W&B run id)."""
    cls = type(logger)
    version = getattr(logger, "version", None)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "name": getattr(logger, "name", None),
            "version": version if isinstance(version, (int, str)) else None}


class ResumableCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` steps (or ``train_time_interval``)
    and when training ends, atomically; adds RNG states and logger identities to every checkpoint.

    Args:
        dirpath: folder of ``last.ckpt``; default ``<trainer.default_root_dir>/checkpoints``.
        every_n_train_steps: checkpoint period in optimizer steps (0 = only at the end).
        train_time_interval: checkpoint period in wall time instead (e.g. ``"00:00:30:00"``, 30 min);
            overrides ``every_n_train_steps``.

    Resume with ``--ckpt_path last`` (the CLI) or ``trainer.fit(..., ckpt_path="last")``. Keep one
    of these per Trainer: its state is stored under a fixed key so a resumed run may change the period.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 500,
                 train_time_interval: timedelta | None = None):
        if every_n_train_steps < 0:
            raise ValueError(f"ResumableCheckpoint: every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False,
                         every_n_train_steps=None if train_time_interval else every_n_train_steps,
                         every_n_epochs=None if train_time_interval else 0, train_time_interval=train_time_interval)
        self._trainer: L.Trainer | None = None
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._flush_loggers = False

    @property
    def state_key(self) -> str:
        return "ResumableCheckpoint"

    # -- where ------------------------------------------------------------------------------
    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(str(trainer.default_root_dir), "checkpoints")

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)  # `--ckpt_path last` is resolved before `setup`
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if trainer.is_global_zero and self.dirpath and _is_local(self.dirpath) and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(f".*{PARTIAL_SUFFIX}"):  # left by a kill during a save
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    # -- how --------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not _is_local(filepath):  # object stores publish an object only once it is complete
            super()._save_checkpoint(trainer, filepath)
            return
        final = Path(filepath.removeprefix("file://"))
        partial = final.with_name(f".{final.name}{PARTIAL_SUFFIX}")
        trainer.save_checkpoint(partial, self.save_weights_only)  # collective; rank 0 writes
        if trainer.is_global_zero:
            _fsync(partial)
            atomic_replace(partial, final)
        trainer.strategy.barrier("ResumableCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self._flush_loggers = True
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning logs the saved step's own metrics (and runs an epoch-end validation) *after* the
        # save: flush them now, so the files of a run killed later hold everything up to the checkpoint
        if self._flush_loggers:
            self._flush_loggers = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The end of training is always in ``last.ckpt`` (the period rarely divides max_steps)."""
        if trainer.global_step != self._last_global_step_saved and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- what -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rng"] = _all_ranks(_rng_state())  # collective: Lightning dumps checkpoints on every rank
        loggers = self._trainer.loggers if self._trainer is not None else []
        state["loggers"] = [logger_identity(lg) for lg in loggers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rng_to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # as late as possible before the first resumed step: what ran between save and step in the
        # uninterrupted run (loader set-up, validation) draws no global random numbers in our DataModules
        states, self._rng_to_restore = self._rng_to_restore, None
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: rank r takes state r mod %d",
                        len(states), trainer.world_size, len(states))
        _set_rng_state(states[trainer.global_rank % len(states)])


# ---------------------------------------------------------------------------------------------
# used by the CLI before the Trainer exists
def last_checkpoint_path(dirpath: str) -> str | None:
    """``<dirpath>/last.ckpt`` if it exists (what ``--ckpt_path last`` resolves to with one ResumableCheckpoint)."""
    path = os.path.join(dirpath, f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}")
    return path if os.path.exists(path) else None


def resume_info(ckpt_path: str) -> dict[str, Any]:
    """Logger identities and the logging step of a checkpoint, read without unpickling code.

    Returns ``{"loggers": [...], "logged_steps": int}`` (empty when the checkpoint has none).
    ``logged_steps`` is Lightning's ``_batches_that_stepped``: the step value of the next logged row.
    """
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # not fatal: training resumes, the loggers open new runs
        log.warning("%s: could not read logger identities (%s); loggers start new runs", ckpt_path, err)
        return {"loggers": [], "logged_steps": None}
    state = (ckpt.get("callbacks") or {}).get("ResumableCheckpoint") or {}
    loops = ckpt.get("loops") or {}
    epoch_loop = (loops.get("fit_loop") or {}).get("epoch_loop.state_dict") or {}
    return {"loggers": list(state.get("loggers") or []), "logged_steps": epoch_loop.get("_batches_that_stepped")}


def restore_csv_rows(logger: Any, before_step: int | None) -> int:
    """Keep the rows a resumed CSVLogger run had logged before the checkpoint (CSVLogger deletes them).

    Lightning's CSV writer removes an existing ``metrics.csv`` when it opens a non-empty run folder;
    rows at ``step >= before_step`` were logged after the checkpoint and are logged again by the
    resumed run, so they are dropped. Returns the number of rows kept.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if before_step is None or not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        keys = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step", "") != "" and int(float(r["step"])) <= before_step]
    writer = logger.experiment  # opens the run folder: deletes the old metrics.csv
    writer.metrics_keys = keys
    writer.metrics = rows + writer.metrics
    writer.save()
    return len(rows)
