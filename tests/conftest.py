"""Shared fixtures: the real data folder (`../shared`) and a small synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("VIRTUPLEX_SHARED", REPO.parent / "shared"))


def shared_data(name: str) -> Path:
    """Path to a real dataset in ../shared/data, or skip the test with the reason."""
    path = shared_dir() / "data" / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (../shared not checked out beside the repo)")
    return path


@pytest.fixture(scope="session")
def imc_example() -> Path:
    return shared_data("imc_example")


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 synthetic tissues of 256×256 px (train 2 / val 1 / test 1), generated once per worker."""
    from datamodules.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "synth", n_tissues=4, size=256, seed=0, progress=False)


def save_untrained(module, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """A LightningModule written as a Lightning checkpoint without training (what a real run writes)."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(str(path))
    return Path(path)


def rosie_checkpoint(path: Path, marker_names: list[str], seed: int = 0, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    """A random convnext_atto RosieModule over ``marker_names``."""
    import torch

    from lightning_modules.rosie import RosieModule

    torch.manual_seed(seed)
    module = RosieModule(arch="convnext_atto", num_markers=len(marker_names), marker_names=list(marker_names), **kwargs)
    return save_untrained(module, path)


@pytest.fixture(scope="session")
def catalogue_shared(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Checkpoints and the dataset the bad-input catalogue's cases share (built once per worker)."""
    from bad_input_catalogue import Shared

    return Shared(tmp_path_factory.mktemp("catalogue"), synthetic_dataset)
