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
