"""DDP equivalence: 2 CPU processes (gloo) at batch 4 each train like 1 process at batch 8.

Both runs are the real CLI (`python -m experiments.rosie_train fit`, tiny ROSIE config, same seed);
the 2-process run uses `--trainer.strategy ddp --trainer.devices 2`, so Lightning re-launches the
entry point for rank 1 exactly as on a cluster. Why the runs can agree:

* the train sampler (`datamodules.resumable.EpochSampler`) gives rank r positions r, r+2, … of the
  single-process order: the two ranks' k-th batches together are the single-process k-th batch;
* augmentations are a function of (seed, epoch, index), not of the rank or worker RNG;
* every sample contributes independently (ConvNeXt uses LayerNorm, no BatchNorm) and every sample
  has the same number of present markers, so the mean of the two ranks' masked-MSE losses is the
  loss of the full batch, and DDP's gradient average is the full-batch gradient.

What differs is only the floating-point summation order (per-rank means, gloo's all-reduce), so
the curves agree to a stated tolerance, not bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 8

# Measured on CPU (torch 2.x, gloo, 8 steps of Adam lr 1e-3): per-step loss max relative difference
# 1.5e-7; final weights relative L2 difference 1.7e-7, largest single weight 8.9e-6. Bounds: loss and
# weight norm 1e-5 (~60x room); a single weight 1e-3, one Adam step's size (lr): Adam rescales each
# gradient element, so an element whose gradient is close to 0 can turn round-off into a step.
LOSS_RTOL = 1e-5
WEIGHT_REL_L2 = 1e-5
WEIGHT_ATOL = 1e-3


class RecordLosses(L.Callback):
    """Test hook: the mean over ranks of each step's training loss, written by rank 0 as JSON."""

    def __init__(self, path: str):
        self.path = path
        self.losses: list[float] = []
        self.batch_sizes: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = pl_module.all_gather(outputs["loss"].detach())
        self.losses.append(float(loss.double().mean()))
        self.batch_sizes.append(int(pl_module.all_gather(torch.tensor(len(batch["image"]))).sum()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"losses": self.losses, "batch_sizes": self.batch_sizes,
                                                   "world_size": trainer.world_size}))


def _run(data: Path, root: Path, record: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.rosie_train", "fit",
           "--config", str(REPO / "experiments/configs/rosie/tiny.yaml"), "--data.data_dirs", f"[{data}]",
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
           "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "0",
           f'--trainer.callbacks+={{"class_path": "tests.test_ddp.RecordLosses", "init_args": {{"path": "{record}"}}}}',
           *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(root / "run.log", "w"), stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, root: Path) -> None:
    rc = proc.wait(timeout=300)
    assert rc == 0, f"exit {rc}:\n{(root / 'run.log').read_text()[-4000:]}"


def test_two_process_ddp_matches_one_process_at_the_same_global_batch(synthetic_dataset: Path, tmp_path: Path) -> None:
    single = _run(synthetic_dataset, tmp_path / "single", tmp_path / "single.json", "--data.batch_size", "8")
    ddp = _run(synthetic_dataset, tmp_path / "ddp", tmp_path / "ddp.json", "--data.batch_size", "4",
               "--trainer.devices", "2", "--trainer.strategy", "ddp")
    _wait(single, tmp_path / "single")
    _wait(ddp, tmp_path / "ddp")
    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "ddp.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["batch_sizes"] == two["batch_sizes"] == [8] * STEPS
    a, b = np.array(one["losses"]), np.array(two["losses"])
    assert len(a) == len(b) == STEPS
    assert a[-1] < a[0], "the tiny run should learn something"
    rel = np.abs(a - b) / np.abs(a)
    print(f"loss curves: max relative difference {rel.max():.2e} (per step {np.array2string(rel, precision=1)})")
    assert rel.max() < LOSS_RTOL, f"DDP loss curve differs: single {a}, ddp {b}"

    ckpt = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["callbacks"]["ResumableCheckpoint"]["rng"]) == 2, "the RNG states of both ranks are saved"
    wa = torch.load(tmp_path / "single/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    wb = ckpt["state_dict"]
    keys = [k for k in wa if wa[k].is_floating_point()]
    rel_l2 = (sum(float((wa[k] - wb[k]).double().pow(2).sum()) for k in keys)
              / sum(float(wa[k].double().pow(2).sum()) for k in keys)) ** 0.5
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in keys)
    print(f"final weights: relative L2 difference {rel_l2:.2e}, max abs difference {worst:.2e}")
    assert rel_l2 < WEIGHT_REL_L2 and worst < WEIGHT_ATOL
