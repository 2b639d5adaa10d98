"""`python -m experiments.virtues_pretrain fit|validate --config experiments/configs/virtues/<name>.yaml`

LightningCLI over :class:`VirTuesModule` and :class:`VirTuesDataModule`. The marker vocabulary
(sorted UniProt ids with an ESM-2 embedding across all datasets) is built by the DataModule and
installed in the model before any step, so datasets with different panels share one table.
DDP/FSDP and multi-node runs are configuration only: `--trainer.devices`, `--trainer.num_nodes`,
`--trainer.strategy`.
"""

from __future__ import annotations

import os
import sys

from datamodules.virtues import VirTuesDataModule
from experiments.cli import VirtuplexCLI, run_cli
from lightning_modules.components.model_files import load_torch_file
from lightning_modules.virtues import VirTuesModule, current_hparams


class VirTuesCLI(VirtuplexCLI):
    checkpoint_kinds = ("virtues",)

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("model.arch.patch_size", "data.patch_size")

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path`` of a checkpoint written before ``model.arch`` existed (sizes at the top
        level of its hyper-parameters, ``model.d_model``): Lightning gets them in the current layout,
        so such a run resumes. Other checkpoints take the shared path unchanged."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        path = config.get("ckpt_path") if config is not None else None
        if path and os.path.isfile(str(path)) and config.get("weights_only") is not False:
            self._check_checkpoint(config)
            raw = load_torch_file(path, mmap=True)
            hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
            if hparams and "arch" not in hparams:
                self.config = self.parser.parse_object({subcommand: {"model": current_hparams(hparams)}}, self.config)
                return
        super()._parse_ckpt_path()

    def _attach_marker_table(self) -> None:
        table = self.datamodule.prepare_marker_table()
        self.model.set_marker_table(table.embeddings, table.uniprot_ids)

    def before_fit(self) -> None:
        self._attach_marker_table()

    def before_validate(self) -> None:
        self._attach_marker_table()


def main(args: list[str] | None = None) -> VirTuesCLI:
    return VirTuesCLI(VirTuesModule, VirTuesDataModule, args=args, seed_everything_default=0,
                      save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    sys.exit(run_cli(main))
