"""`python -m experiments.rosie_train fit|validate|test|predict --config experiments/configs/rosie/<name>.yaml`

LightningCLI over :class:`RosieModule` and :class:`RosieDataModule`. The output panel is declared
once, in the data section (`data.marker_names`, default ROSIE's 50 markers), and linked into the model
together with the per-marker target scales, so a checkpoint always knows its markers and units.
"""

from __future__ import annotations

import sys

from experiments.cli import VirtuplexCLI, run_cli

from datamodules.he_histograms import training_he_histograms
from datamodules.markers import ROSIE_PANEL
from datamodules.rosie import RosieDataModule
from datamodules.store import DatasetStore
from lightning_modules.rosie import RosieModule


def panel(names: list[str] | None) -> list[str]:
    return list(names or ROSIE_PANEL)


def panel_size(names: list[str] | None) -> int:
    return len(panel(names))


class RosieCLI(VirtuplexCLI):
    checkpoint_kinds = ("rosie",)

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data.marker_names", "model.marker_names", compute_fn=panel)
        parser.link_arguments("data.marker_names", "model.num_markers", compute_fn=panel_size)
        parser.link_arguments("data.target_scales", "model.target_scales", apply_on="instantiate")
        # a model that keeps only the patch centre: the data reads (and augments) only those pixels
        parser.link_arguments("model.input_center_crop", "data.center_crop")

    def before_fit(self) -> None:
        # the training slides' H&E histograms travel in the checkpoint (the W1 quality score)
        if self.model.reference_he_histograms is None:
            self.model.set_reference_histograms(training_he_histograms(self.datamodule.data_dirs))
        # the H&E resolution the model learns at travels too: prediction refuses (or resamples) other µm/px
        if self.model.hparams.get("he_mpp") is None:
            self.model.hparams.he_mpp = float(DatasetStore(str(self.datamodule.data_dirs[0])).resolutions("he")[0])


def main(args: list[str] | None = None) -> RosieCLI:
    return RosieCLI(RosieModule, RosieDataModule, args=args, seed_everything_default=0,
                    save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    sys.exit(run_cli(main))
