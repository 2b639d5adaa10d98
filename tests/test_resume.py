"""Crash and resume: a training killed with SIGKILL mid-epoch and resumed with `--ckpt_path last`
ends bit-identical (weights, optimizer, logged losses and validation metrics) to an uninterrupted
run with the same seed, for ROSIE and VirTues; checkpoints are written atomically.

Each run is a real `python -m experiments.<entry> fit` subprocess with a tiny config. The crashing run
blocks after a known step (after a checkpoint, inside an epoch) and the test kills it with SIGKILL
from outside, so no Python clean-up runs — what is on disk is what a crash leaves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# 3 batches per epoch, a checkpoint every 2 steps, 6 steps: the step-4 checkpoint is after the first
# batch of epoch 1, the kill comes after step 5 (its work is lost), the run ends with epoch 1 and its
# validation. Epoch 1 (not 0) also checks that the resumed loader uses the resumed epoch's order.
STEPS, BATCHES_PER_EPOCH, EVERY, STALL_AT = 6, 3, 2, 5


class StallAfterStep(L.Callback):
    """Test hook: after optimizer step `step`, write `marker` and block until killed.

    Runs before the checkpoint callback of the same step (Lightning runs ModelCheckpoint last),
    so the newest checkpoint on disk is the one before `step`.
    """

    def __init__(self, step: int, marker: str):
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)


def _command(entry: str, config: str, data: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"experiments.{entry}", "fit", "--config", str(REPO / config),
            "--data.data_dirs", f"[{data}]", "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(STEPS), "--trainer.limit_train_batches", str(BATCHES_PER_EPOCH),
            "--trainer.limit_val_batches", "1", "--checkpoint.every_n_train_steps", str(EVERY), *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"{proc.args}\nexit {rc}:\n{log.read_text()[-4000:]}"


def _crash_and_resume(entry: str, config: str, data: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """Returns the run folders of (uninterrupted, crashed-and-resumed)."""
    ref_root, run_root = tmp_path / "reference", tmp_path / "crashed"
    marker = tmp_path / "stalled"
    stall = ('--trainer.callbacks+={"class_path": "tests.test_resume.StallAfterStep", '
             f'"init_args": {{"step": {STALL_AT}, "marker": "{marker}"}}}}')
    reference = _start(_command(entry, config, data, ref_root, *extra), tmp_path / "reference.log")
    crashing = _start(_command(entry, config, data, run_root, *extra, stall), tmp_path / "crashed.log")
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert crashing.poll() is None, f"the crashing run ended early:\n{(tmp_path / 'crashed.log').read_text()[-4000:]}"
        assert time.monotonic() < deadline, "the crashing run never reached the stall step"
        time.sleep(0.2)
    crashing.send_signal(signal.SIGKILL)
    crashing.wait(timeout=30)
    assert crashing.returncode == -signal.SIGKILL
    ckpt = torch.load(run_root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STALL_AT - 1, "the newest checkpoint must be the one before the kill"
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["epoch"] == 1 and loader_state["batches"] == 1, f"not mid-epoch: {loader_state}"
    resumed = _start(_command(entry, config, data, run_root, *extra, "--ckpt_path", "last"), tmp_path / "resumed.log")
    _finish(resumed, tmp_path / "resumed.log")
    _finish(reference, tmp_path / "reference.log")
    return ref_root, run_root


def _assert_identical_runs(ref_root: Path, run_root: Path) -> None:
    a = torch.load(ref_root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run_root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), f"weights differ after resume: {name}"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"optimizer state {key} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    # the logger run was reopened (same CSV version) and holds the same rows: every step's loss and
    # every validation, before and after the crash, with the rows of the lost step logged once
    runs = sorted((run_root / "csv").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"], f"resume opened a new logger run: {runs}"
    ref = pd.read_csv(sorted((ref_root / "csv").glob("version_*"))[0] / "metrics.csv")
    got = pd.read_csv(runs[0] / "metrics.csv")
    columns = [c for c in ref.columns if c.startswith(("train/loss", "val/", "epoch", "step"))]
    assert ref["train/loss"].notna().sum() == STEPS
    assert ref["val/loss"].notna().sum() >= 1
    pd.testing.assert_frame_equal(ref[columns].reset_index(drop=True), got[columns].reset_index(drop=True),
                                  check_exact=True)


def test_rosie_sigkill_mid_epoch_resumes_bit_identical(synthetic_dataset: Path, tmp_path: Path) -> None:
    ref_root, run_root = _crash_and_resume("rosie_train", "experiments/configs/rosie/tiny.yaml", synthetic_dataset,
                                           tmp_path, "--data.batch_size", "4", "--data.val_samples", "4",
                                           "--data.ssim_region_px", "16")
    _assert_identical_runs(ref_root, run_root)


def test_virtues_sigkill_mid_epoch_resumes_bit_identical(synthetic_dataset: Path, tmp_path: Path) -> None:
    ref_root, run_root = _crash_and_resume("virtues_pretrain", "experiments/configs/virtues/tiny.yaml",
                                           synthetic_dataset, tmp_path)
    _assert_identical_runs(ref_root, run_root)


# ------------------------------------------------------------------------------------------------
# fast unit checks of the pieces


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index) -> int:
        from datamodules.resumable import split_index

        return split_index(index)[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_restarts_inside_the_epoch(num_workers: int) -> None:
    """The resumed loader yields exactly the rest of the interrupted epoch, then the next epochs."""
    from datamodules.resumable import EpochSampler, ResumableDataLoader

    def loader() -> ResumableDataLoader:
        data = _Indices(23)
        return ResumableDataLoader(data, sampler=EpochSampler(data, samples_per_epoch=17, seed=5), batch_size=4,
                                   collate_fn=list, num_workers=num_workers, persistent_workers=num_workers > 0)

    full = loader()
    full.sampler.set_epoch(3)
    epoch3 = list(full)
    full.sampler.set_epoch(4)
    epoch4 = list(full)
    assert [len(b) for b in epoch3] == [4, 4, 4, 4, 1]
    assert epoch3 != epoch4 and len({i for b in epoch3 for i in b}) == 17  # a fresh subset, no repeats

    first = loader()
    first.sampler.set_epoch(3)
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert state["epoch"] == 3 and state["batches"] == 2

    second = loader()  # a fresh process: Lightning calls load_state_dict, then set_epoch, then iterates
    second.load_state_dict(state)
    second.sampler.set_epoch(3)
    assert seen + list(second) == epoch3
    second.sampler.set_epoch(4)
    assert list(second) == epoch4


def test_ranks_share_the_single_process_global_batches() -> None:
    """Rank r's k-th batch of size b holds part of the single-process k-th batch of size W·b."""
    from datamodules.resumable import EpochSampler

    data = _Indices(40)
    single = [i for _, i in EpochSampler(data, seed=1, num_replicas=1, rank=0)]
    ranks = [[i for _, i in EpochSampler(data, seed=1, num_replicas=2, rank=r)] for r in range(2)]
    for k in range(5):
        assert sorted(ranks[0][4 * k : 4 * k + 4] + ranks[1][4 * k : 4 * k + 4]) == sorted(single[8 * k : 8 * k + 8])


def test_augmentation_is_a_function_of_seed_epoch_index(synthetic_dataset: Path) -> None:
    from datamodules.rosie import RosieDataModule
    from datamodules.virtues import VirTuesDataModule

    dm = RosieDataModule([str(synthetic_dataset)], batch_size=2, augment=True, seed=0)
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    torch.manual_seed(123)
    a = ds[(2, 7)]["image"]
    torch.manual_seed(456)  # the global RNG plays no part
    assert torch.equal(a, ds[(2, 7)]["image"])
    assert not torch.equal(a, ds[(3, 7)]["image"])

    vm = VirTuesDataModule([str(synthetic_dataset)], modality="imc", batch_size=2, subimage_size=128)
    vm.setup("fit")
    vds = vm.dataset("train", train=True)
    torch.manual_seed(1)
    x = vds[(1, 0)]
    torch.manual_seed(2)
    y = vds[(1, 0)]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert torch.equal(x["marker_ids"], y["marker_ids"])


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    """A save that dies half-way leaves the previous last.ckpt intact and the partial file apart;
    the next setup removes the partial file."""
    from callbacks.checkpointing import PARTIAL_SUFFIX, ResumableCheckpoint

    cb = ResumableCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1)
    final = tmp_path / "last.ckpt"

    def save_ok(path, weights_only=False):
        torch.save({"step": 1}, path)

    def save_dies(path, weights_only=False):
        Path(path).write_bytes(b"\x80\x02half a checkpoint")
        raise KeyboardInterrupt("killed during the write")

    trainer = SimpleNamespace(save_checkpoint=save_ok, is_global_zero=True, global_step=1, loggers=[],
                              strategy=SimpleNamespace(barrier=lambda name=None: None))
    cb._save_checkpoint(trainer, str(final))
    assert torch.load(final, weights_only=True) == {"step": 1}
    trainer.save_checkpoint, trainer.global_step = save_dies, 2
    with pytest.raises(KeyboardInterrupt):
        cb._save_checkpoint(trainer, str(final))
    assert torch.load(final, weights_only=True) == {"step": 1}, "the previous checkpoint was damaged"
    partial = tmp_path / f".last.ckpt{PARTIAL_SUFFIX}"
    assert partial.exists()
    assert cb._find_last_checkpoints(SimpleNamespace(default_root_dir=str(tmp_path))) == {str(final)}
    setup_trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path),
                                    strategy=SimpleNamespace(broadcast=lambda x: x))
    cb.setup(setup_trainer, None, "fit")
    assert not partial.exists() and final.exists()


def test_rng_states_round_trip() -> None:
    import random

    import numpy as np

    from callbacks.checkpointing import ResumableCheckpoint

    cb = ResumableCheckpoint(dirpath="unused")
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    state = cb.state_dict()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restored = ResumableCheckpoint(dirpath="unused")
    restored.load_state_dict(state)
    restored.on_train_start(SimpleNamespace(world_size=1, global_rank=0), None)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
