"""Shared LightningCLI behaviour for the experiment entry points.

* W&B runs offline unless the user sets `WANDB_MODE=online` (nothing needs an account or the
  network); `wandb sync <run_dir>/wandb/...` uploads later.
* Every logger writes under `trainer.default_root_dir`, so one flag (`--trainer.default_root_dir`)
  moves a whole run (checkpoints, CSV metrics, W&B files) instead of one flag per logger.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


class VirtuplexCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        root = trainer.get("default_root_dir") or "runs"
        loggers = trainer.get("logger")
        if isinstance(loggers, (list, tuple)):
            for logger in loggers:
                init_args = logger.get("init_args") if hasattr(logger, "get") else None
                if init_args is not None:
                    init_args["save_dir"] = root
