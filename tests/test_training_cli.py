"""The LightningCLI entry points run end to end on tiny configs (real code paths, seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_rosie_train_tiny_fit_writes_checkpoint(synthetic_dataset: Path, tmp_path: Path) -> None:
    from experiments.rosie_train import main

    cli = main(["fit", "--config", str(REPO / "experiments/configs/rosie/tiny.yaml"),
                "--data.data_dirs", f"[{synthetic_dataset}]", "--trainer.default_root_dir", str(tmp_path),
"--trainer.max_steps", "3"])
    assert cli.trainer.global_step == 3
    metrics = pd.read_csv(Path(cli.trainer.logger.log_dir) / "metrics.csv")
    assert metrics["train/loss"].notna().sum() >= 3
    assert "val/pearson_r" in metrics.columns and "val/ssim" in metrics.columns
    ckpt_path = tmp_path / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["num_markers"] == 50 and hp["marker_names"][0] == "DAPI"
    assert len(hp["target_scales"]) == 50 and all(s > 0 for s in hp["target_scales"])


def test_rosie_train_rejects_unknown_config_key(synthetic_dataset: Path) -> None:
    from experiments.rosie_train import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "experiments/configs/rosie/tiny.yaml"),
              "--data.data_dirs", f"[{synthetic_dataset}]", "--model.no_such_key", "1"])


def test_virtues_pretrain_tiny_five_steps(synthetic_dataset: Path, tmp_path: Path) -> None:
    from experiments.virtues_pretrain import main

    cli = main(["fit", "--config", str(REPO / "experiments/configs/virtues/tiny.yaml"),
                "--data.data_dirs", f"[{synthetic_dataset}]", "--trainer.default_root_dir", str(tmp_path),
"--trainer.max_steps", "5"])
    assert cli.trainer.global_step == 5
    metrics = pd.read_csv(Path(cli.trainer.logger.log_dir) / "metrics.csv")
    assert metrics["train/loss"].notna().sum() >= 5
    assert len(cli.model.model.marker_uniprot_ids) == 40
    assert list((tmp_path / "panels").glob("step_*.png")), "reconstruction panels were not written"


def test_virtues_checkpoint_reloads_with_its_marker_table(synthetic_dataset: Path, tmp_path: Path) -> None:
    from experiments.virtues_pretrain import main
    from lightning_modules.virtues import VirTuesModule

    cli = main(["fit", "--config", str(REPO / "experiments/configs/virtues/tiny.yaml"),
                "--data.data_dirs", f"[{synthetic_dataset}]", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    path = tmp_path / "v.ckpt"
    cli.trainer.save_checkpoint(path)
    reloaded = VirTuesModule.load_from_checkpoint(path, map_location="cpu")
    assert reloaded.model.marker_uniprot_ids == cli.model.model.marker_uniprot_ids
    torch.testing.assert_close(reloaded.model.marker_table, cli.model.model.marker_table.cpu())
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.eval(), reloaded.eval()
    with torch.no_grad():
        a = cli.model(batch["images"], batch["marker_ids"], batch["masks"]).decoded[0]
        b = reloaded(batch["images"], batch["marker_ids"], batch["masks"]).decoded[0]
    torch.testing.assert_close(a, b)
