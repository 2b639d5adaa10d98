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
    from lightning_modules.virtues import VirTuesModule, load_virtues_module

    cli = main(["fit", "--config", str(REPO / "experiments/configs/virtues/tiny.yaml"),
                "--data.data_dirs", f"[{synthetic_dataset}]", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    path = tmp_path / "v.ckpt"
    cli.trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["arch"]["d_model"] == 32  # model.arch.* keys
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.eval()
    with torch.no_grad():
        a = cli.model(batch["images"], batch["marker_ids"], batch["masks"]).decoded[0]
    for reloaded in (load_virtues_module(path), VirTuesModule.load_from_checkpoint(path, map_location="cpu")):
        assert reloaded.model.arch == cli.model.model.arch
        assert reloaded.model.marker_uniprot_ids == cli.model.model.marker_uniprot_ids
        torch.testing.assert_close(reloaded.model.marker_table, cli.model.model.marker_table.cpu())
        with torch.no_grad():
            b = reloaded.eval()(batch["images"], batch["marker_ids"], batch["masks"]).decoded[0]
        torch.testing.assert_close(a, b)


def test_virtues_resumes_a_checkpoint_written_before_model_arch(synthetic_dataset: Path, tmp_path: Path) -> None:
    """--ckpt_path of a checkpoint with the old flat hyper-parameters (model.d_model, ...): the run
    resumes with the stored architecture, not the YAML's."""
    from experiments.virtues_pretrain import main
    from lightning_modules.virtues import current_hparams

    args = ["fit", "--config", str(REPO / "experiments/configs/virtues/tiny.yaml"), "--data.data_dirs",
            f"[{synthetic_dataset}]", "--trainer.limit_val_batches", "0"]
    cli = main([*args, "--trainer.default_root_dir", str(tmp_path / "a"), "--trainer.max_steps", "1",
                "--model.arch.ffn_dim", "48"])
    path = tmp_path / "legacy.ckpt"
    cli.trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    hp = current_hparams(ckpt["hyper_parameters"])
    ckpt["hyper_parameters"] = {**{k: v for k, v in hp.items() if k != "arch"}, **hp["arch"], "val_mask_seed": 1234}
    torch.save(ckpt, path)
    resumed = main([*args, "--trainer.default_root_dir", str(tmp_path / "b"), "--trainer.max_steps", "2",
                    "--ckpt_path", str(path)])
    assert resumed.trainer.global_step == 2 and resumed.model.model.arch.ffn_dim == 48


def test_virtues_print_config_shows_model_arch(capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.virtues_pretrain import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "experiments/configs/virtues/tiny.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    model = printed[printed.index("\nmodel:\n"):]
    assert "\n  arch:\n    d_model: 32\n" in model and "\n  d_model:" not in model
