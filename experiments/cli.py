"""Shared LightningCLI behaviour for the experiment entry points.

* W&B runs offline unless the user sets `WANDB_MODE=online` (nothing needs an account or the
  network); `wandb sync <run_dir>/wandb/...` uploads later.
* Every logger writes under `trainer.default_root_dir`, so one flag (`--trainer.default_root_dir`)
  moves a whole run (checkpoints, CSV metrics, W&B files) instead of one flag per logger.
* Every `fit` writes a resumable `<default_root_dir>/checkpoints/last.ckpt` every
  `--checkpoint.every_n_train_steps` steps (default 500; `--checkpoint.train_time_interval` for wall
  time) and at the end; `--ckpt_path last` resumes from it — weights, optimizer, LR/WD schedules,
  place in the epoch, RNG states — and reopens the same logger runs (CSV version, W&B run id) with
  the rows logged before the checkpoint kept. See `callbacks.checkpointing`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.checkpointing import ResumableCheckpoint, last_checkpoint_path, restore_csv_rows, resume_info
from datamodules.command_line import run_command
from lightning_modules.components.model_files import load_torch_file, numpy_safe_globals, require_kind

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

log = logging.getLogger(__name__)


def _logger_configs(trainer: Any) -> list[Any]:
    loggers = trainer.get("logger")
    if isinstance(loggers, (list, tuple)):
        return [lg for lg in loggers if hasattr(lg, "get")]
    return [loggers] if hasattr(loggers, "get") else []


def _class_name(class_path: Any) -> str:
    return str(class_path or "").rsplit(".", 1)[-1]


class VirtuplexCLI(LightningCLI):
    _resume: dict[str, Any] | None = None

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_default_arguments_to_parser(parser)
        # a forced callback: `--checkpoint.every_n_train_steps N`, `checkpoint:` in a YAML config
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        root = trainer.get("default_root_dir") or "runs"
        for logger in _logger_configs(trainer):
            init_args = logger.get("init_args")
            if init_args is not None:
                init_args["save_dir"] = root
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self._reopen_logger_runs(config, trainer, root)
        if self.subcommand == "fit":
            log_effective_batch(config.get("data"), trainer)

    def _check_checkpoint(self, config: Any) -> None:
        """``--ckpt_path FILE`` goes through the project's safe loader first: a file whose pickle
        would run code, a damaged file or the other model's checkpoint is refused by name
        (``--weights_only false`` is the explicit opt-in to full unpickling)."""
        path = config.get("ckpt_path")
        if not path or not os.path.isfile(str(path)):
            return
        trust = config.get("weights_only") is False
        raw = load_torch_file(path, trust=trust, mmap=True)
        require_kind(path, raw, self.checkpoint_kinds, f"{type(self).__name__.removesuffix('CLI').lower()} training")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s hyper-parameters right after parsing, with its own
        ``torch.load``: the file passes the project's checks first (LightningCLI hook, 2.x)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        self._check_checkpoint(config)
        if config.get("weights_only") is False:
            log.info("--weights_only false: hyper-parameters come from the config, not from the trusted checkpoint")
            return
        with torch.serialization.safe_globals(numpy_safe_globals()):
            super()._parse_ckpt_path()

    #: Kinds of checkpoint (see model_files.checkpoint_kind) this CLI resumes from.
    checkpoint_kinds: tuple[str, ...] = ("rosie", "virtues")

    def _reopen_logger_runs(self, config: Any, trainer: Any, root: str) -> None:
        """Point each logger at the run the checkpoint was logging to (same class, same position)."""
        ckpt_path = str(config.get("ckpt_path"))
        if ckpt_path == "last":
            checkpoint = config.get("checkpoint")
            dirpath = (checkpoint.get("dirpath") if checkpoint is not None else None) or os.path.join(root, "checkpoints")
            found = last_checkpoint_path(dirpath)
            if found is None:
                return  # Lightning warns and starts from scratch
            ckpt_path = found
        elif not os.path.isfile(ckpt_path):
            return  # "hpc", "best", remote paths: loggers start new runs
        info = resume_info(ckpt_path)
        saved = info["loggers"]
        for i, logger in enumerate(_logger_configs(trainer)):
            init_args = logger.get("init_args")
            if init_args is None or i >= len(saved):
                continue
            if _class_name(logger.get("class_path")) != _class_name(saved[i].get("class_path")):
                continue
            if init_args.get("version") is None and saved[i].get("version") is not None:
                init_args["version"] = saved[i]["version"]
        self._resume = info

    def instantiate_trainer(self, **kwargs: Any):  # type: ignore[no-untyped-def]
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_config.get("enable_checkpointing") is False:  # Lightning refuses checkpoint callbacks then
            extra = [cb for cb in extra if not isinstance(cb, ResumableCheckpoint)]
        return self._instantiate_trainer(trainer_config, extra)

    def after_instantiate_classes(self) -> None:
        if self._resume is None or not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import CSVLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                kept = restore_csv_rows(logger, self._resume.get("logged_steps"))
                if kept:
                    log.info("%s: resumed run keeps %d rows logged before the checkpoint", logger.log_dir, kept)


def run_cli(main: Callable[[list[str] | None], Any], args: list[str] | None = None) -> int:
    """A LightningCLI entry point under the error contract: a user error (bad config value, missing
    dataset piece, unsafe checkpoint) is one line and exit code 2; argument errors stay jsonargparse's."""
    return run_command(lambda: main(args) and None)


def log_effective_batch(data: Any, trainer: Any) -> int | None:
    """Log the batch one optimizer step sees: recipes give ``data.batch_size`` per device (the ROSIE
    paper's 256 is 64 per GPU on 4 GPUs), so the total is only known once devices are."""
    batch = data.get("batch_size") if data is not None else None
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    accumulate = trainer.get("accumulate_grad_batches") or 1
    if not (isinstance(batch, int) and isinstance(devices, int)):
        return None
    total = batch * devices * nodes * accumulate
    log.info("effective batch = data.batch_size %d per device x %d device(s) x %d node(s) x %d accumulation = %d",
             batch, devices, nodes, accumulate, total)
    return total

