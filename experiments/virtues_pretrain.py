"""`python -m experiments.virtues_pretrain fit|validate --config experiments/configs/virtues/<name>.yaml`

LightningCLI over :class:`VirTuesModule` and :class:`VirTuesDataModule`. The marker vocabulary
(sorted UniProt ids with an ESM-2 embedding across all datasets) is built by the DataModule and
installed in the model before any step, so datasets with different panels share one table.
DDP/FSDP and multi-node runs are configuration only: `--trainer.devices`, `--trainer.num_nodes`,
`--trainer.strategy`.
"""

from __future__ import annotations

import sys

from experiments.cli import VirtuplexCLI, run_cli

from datamodules.virtues import VirTuesDataModule
from lightning_modules.virtues import VirTuesModule


class VirTuesCLI(VirtuplexCLI):
    checkpoint_kinds = ("virtues",)

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("model.arch.patch_size", "data.patch_size")

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
