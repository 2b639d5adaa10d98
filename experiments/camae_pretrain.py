"""`python -m experiments.camae_pretrain fit --config experiments/configs/virtues/camae_<name>.yaml`

The CA-MAE baseline (Kraus et al. 2024, as the VirTues paper compares against it) trained by the
same LightningCLI as VirTues: :class:`VirTuesCLI` (same DataModule, same batches and masks, same
checkpointing, resuming, loggers and marker-table hand-over) with :class:`CAMAEModule` as the model.
The marker table only fixes how many per-channel decoders the CA-MAE gets and which marker each
one decodes; CA-MAE never reads the ESM vectors.
"""

from __future__ import annotations

import sys

from datamodules.virtues import VirTuesDataModule
from experiments.cli import run_cli
from experiments.virtues_pretrain import VirTuesCLI
from lightning_modules.camae import CAMAEModule


class CAMAECLI(VirTuesCLI):
    # "virtues": model_files.checkpoint_kind cannot yet tell a CA-MAE checkpoint from a VirTues one
    # (both store marker_uniprot_ids); "camae" once it can.
    checkpoint_kinds = ("camae", "virtues")


def main(args: list[str] | None = None) -> CAMAECLI:
    return CAMAECLI(CAMAEModule, VirTuesDataModule, args=args, seed_everything_default=0,
                    save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    sys.exit(run_cli(main))
