"""Zero-shot reconstruction, leave one dataset out (paper Methods "Zero-shot inference", Fig. 2e-h).

    python -m experiments.virtues_zero_shot --data D1 --data D2 --data D3 --out OUT
        [--hold-out NAME ...] [--config experiments/configs/virtues/tiny.yaml] [--max-steps 200]
        [--ckpt NAME=PATH ...] [--split test] [--max-crops 16] [--strategies independent,marker,niche]
        [--seed 0] [--overwrite]

For each held-out dataset (every ``--data`` unless ``--hold-out`` names some): a VirTues model is
pretrained on all the OTHER datasets with the LightningCLI config ``--config`` for ``--max-steps``
steps (or ``--ckpt NAME=PATH`` gives that model), then the masked reconstruction of
``experiments.virtues_reconstruct`` runs on the held-out dataset. Markers are split into **seen**
(some channel of the training datasets was trained on it: ``qc_pass``, valid UniProt id, an
embedding; ``datamodules.virtues_trained_markers``) and **unseen** (everything else, including
markers that only had an embedding file in a training folder).

Outputs in ``OUT`` (atomic): ``<held-out>/`` the reconstruction outputs of that model,
``models/<held-out>.ckpt`` and ``runs/<held-out>/`` (logs) when pretrained here, ``seen_markers.csv``
(``held_out,marker,uniprot_id,seen``), ``summary_seen_unseen.csv`` (the reconstruction summaries
with a ``held_out`` column), ``zero_shot.png`` (Pearson r of seen vs unseen markers per strategy).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from analysis.outputs import atomic_output_dir
from datamodules.command_line import run_command
from datamodules.store import DatasetStore
from datamodules.virtues_trained_markers import trained_markers
from experiments import virtues_pretrain, virtues_reconstruct
from lightning_modules.virtues_loading import uniprot_id_or_none

log = logging.getLogger("experiments.virtues_zero_shot")
COMMAND = "virtues_zero_shot"
REPO = Path(__file__).resolve().parents[1]


def dataset_names(data: Sequence[str | Path]) -> list[str]:
    """The folder names, which identify datasets on the command line; duplicates are refused."""
    names = [Path(str(d)).name for d in data]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--data folders must have distinct names, {dup} repeats")
    return names


def parse_ckpts(items: Sequence[str], names: Sequence[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--ckpt {item!r}: expected NAME=PATH with NAME one of {list(names)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--ckpt {item!r}: no such file {path}")
        out[name] = Path(path)
    return out


def seen_table(held_out: str, store: DatasetStore, modality: str, seen: set[str]) -> pd.DataFrame:
    """One row per channel of the held-out panel with a UniProt id: seen during pretraining or not."""
    rows = []
    for _, row in store.channels(modality).iterrows():
        uid = uniprot_id_or_none(row.get("uniprot_id"))
        if uid is not None:
            rows.append({"held_out": held_out, "marker": str(row["channel_name"]), "uniprot_id": uid, "seen": uid in seen})
    return pd.DataFrame(rows, columns=["held_out", "marker", "uniprot_id", "seen"])


def pretrain(train_dirs: Sequence[str], config: str, max_steps: int, root: Path, seed: int, path: Path) -> Path:
    """Pretrain VirTues on ``train_dirs`` with the LightningCLI (bounded by ``max_steps``); save a checkpoint."""
    cli = virtues_pretrain.main(["fit", "--config", str(config), "--data.data_dirs", "[" + ",".join(train_dirs) + "]",
                                 "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(max_steps),
                                 "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false"])
    path.parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(str(path))
    return path


def run(data: Sequence[str | Path], out: str | Path, hold_out: Sequence[str] = (), config: str | Path | None = None,
        max_steps: int = 200, ckpts: Sequence[str] = (), split: str = "test", modality: str = "imc", max_crops: int = 16,
        strategies: Sequence[str] = ("independent", "marker", "niche"), seed: int = 0, overwrite: bool = False,
        marker_max_crops: int | None = 4, crop_size: int = 128, figures: bool = True) -> pd.DataFrame:
    """Leave-one-dataset-out pretraining + reconstruction; returns the seen/unseen summary."""
    data = [str(d) for d in data]
    if len(data) < 2:
        raise ValueError("zero-shot needs at least two --data folders (one held out, the others to pretrain on)")
    names = dataset_names(data)
    held = list(hold_out) or names
    unknown = [h for h in held if h not in names]
    if unknown:
        raise ValueError(f"--hold-out {unknown}: not among the --data folder names {names}")
    given = parse_ckpts(ckpts, names)
    config = str(config or REPO / "experiments/configs/virtues/tiny.yaml")
    summaries, seen_rows = [], []
    with atomic_output_dir(out, overwrite=overwrite, command=COMMAND) as tmp:
        for name in tqdm(held, desc="held-out datasets", unit="dataset"):
            i = names.index(name)
            train_dirs = [d for j, d in enumerate(data) if j != i]
            ckpt = given.get(name) or pretrain(train_dirs, config, max_steps, tmp / "runs" / name, seed,
                                               tmp / "models" / f"{name}.ckpt")
            seen = trained_markers(train_dirs, modality)
            seen_rows.append(seen_table(name, DatasetStore(data[i]), modality, seen))
            result = virtues_reconstruct.run(ckpt, [data[i]], tmp / name, split=split, modality=modality,
                                             max_crops=max_crops, seed=seed, strategies=strategies,
                                             marker_max_crops=marker_max_crops, crop_size=crop_size, figures=figures,
                                             trained_on=train_dirs)
            summaries.append(result.summary_seen_unseen.assign(held_out=name))
        summary = pd.concat(summaries, ignore_index=True)
        summary = summary[["held_out"] + [c for c in summary.columns if c != "held_out"]]
        summary.to_csv(tmp / "summary_seen_unseen.csv", index=False)
        pd.concat(seen_rows, ignore_index=True).to_csv(tmp / "seen_markers.csv", index=False)
        if figures:
            plot(summary, tmp / "zero_shot.png")
    return summary


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = summary[summary["method"] == "virtues"]
    table = part.pivot_table(index=["held_out", "strategy"], columns="seen", values="pearson_r")
    table = table.rename(columns={True: "seen", False: "unseen"})
    ax = table.plot.bar(figsize=(max(5, 0.8 * len(table)), 3.2))
    ax.set_ylabel("Pearson r (masked pixels)")
    ax.set_title("Zero-shot reconstruction: markers seen vs unseen in pretraining", fontsize=9)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_zero_shot", description=__doc__.split("\n")[0])
    p.add_argument("--data", action="append", required=True, help="dataset folder (repeatable, at least two)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--hold-out", action="append", default=[], help="dataset (folder name) to hold out; default all")
    p.add_argument("--config", default=None, help="VirTues LightningCLI YAML for pretraining (default: tiny.yaml)")
    p.add_argument("--max-steps", type=int, default=200, help="pretraining steps per held-out dataset")
    p.add_argument("--ckpt", action="append", default=[], help="NAME=PATH: use this model for held-out NAME")
    p.add_argument("--split", default="test")
    p.add_argument("--modality", default="imc")
    p.add_argument("--max-crops", type=int, default=16)
    p.add_argument("--marker-max-crops", type=int, default=4)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--strategies", default="independent,marker,niche")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        for flag, value in (("--max-steps", args.max_steps), ("--max-crops", args.max_crops),
                            ("--marker-max-crops", args.marker_max_crops), ("--crop-size", args.crop_size)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be a positive integer")
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        summary = run(args.data, args.out, args.hold_out, args.config, args.max_steps, args.ckpt, args.split,
                      args.modality, args.max_crops, strategies, args.seed, args.overwrite, args.marker_max_crops,
                      args.crop_size)
        print(summary.round(3).to_string(index=False))
        print(f"wrote {args.out}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
