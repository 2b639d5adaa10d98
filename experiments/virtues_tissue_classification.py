"""Tissue-level classification with a gated ABMIL on frozen VirTues tokens (paper Fig. 4e–f).

    python -m experiments.virtues_tokens --ckpt C --data DIR --split all --out TOKENS
    python -m experiments.virtues_tissue_classification --tokens TOKENS --data DIR --label COL --out OUT
        [--seeds 5] [--max-epochs 100] [--patience 10] [--batch-size 16] [--val-fraction 0.2] [--overwrite]

Protocol of the Methods: the bag of a tissue is all patch-summary tokens of its kept crops; a gated
ABMIL (8 heads, hidden 256) is trained with Adam (lr 1e-4, 16 tissues per batch, ≤ 100 epochs, early
stopping with patience 10 on the loss of a 20 % validation subset of the training tissues); the test
tissues are scored with the weights of the epoch with the lowest validation loss (not the last
epoch's); the macro-F1 on the test tissues is averaged over ``--seeds`` runs, each with its own
initialisation and validation subset. The reference is logistic regression on the mean-pooled tissue token (the
unsupervised aggregation). Writes ``summary.csv`` (``method,macro_f1_mean,macro_f1_std,runs``),
``runs.csv`` (per seed: macro-F1, ``best_epoch`` scored, ``epochs`` run) and ``predictions.csv`` to
``OUT`` (atomically).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from analysis.outputs import atomic_output_dir
from datamodules.store import DatasetStore
from datamodules.tissue_bags import TissueBags, collate_bags, load_bag
from experiments.commands import refuse_existing_output, run_command
from lightning_modules.abmil import AbmilModule

log = logging.getLogger("experiments.virtues_tissue_classification")

COMMAND = "virtues_tissue_classification"


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_abmil(bags: list[np.ndarray], y: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
                n_classes: int, seed: int, args: argparse.Namespace) -> tuple[np.ndarray, dict[str, int]]:
    """One ABMIL run; returns the test-class predictions of the best-validation weights and
    ``{"best_epoch", "epochs"}`` (0-based epoch scored, epochs trained before stopping)."""

    L.seed_everything(seed, workers=True)

    def loader(idx: np.ndarray, shuffle: bool) -> DataLoader:
        return DataLoader(TissueBags([bags[i] for i in idx], y[idx]), batch_size=args.batch_size, shuffle=shuffle,
                          collate_fn=collate_bags, generator=torch.Generator().manual_seed(seed))

    module = AbmilModule(bags[0].shape[-1], n_classes, lr=args.lr)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EarlyStopping("val/loss", patience=args.patience, mode="min")], deterministic=True)
    trainer.fit(module, loader(train, True), loader(val, False))  # leaves the best-validation weights in
    probs = torch.cat(trainer.predict(module, loader(test, False)))
    return probs.argmax(1).numpy(), {"best_epoch": int(module.best_epoch), "epochs": len(module.val_history)}


def run(args: argparse.Namespace) -> pd.DataFrame:

    refuse_existing_output(args.out, args.overwrite, COMMAND)
    tissues = DatasetStore(args.data).tissues()
    if args.label not in tissues:
        raise ValueError(f"{args.data}: tissue table has no column {args.label!r} (columns: {list(tissues.columns)})")
    tissues = tissues[tissues[args.label].notna()]
    have = {p.stem for p in (Path(args.tokens) / "niches").glob("*.npz")}
    missing = sorted(set(tissues["tissue_id"]) - have)
    if missing:
        log.warning("%d labelled tissues have no tokens and are left out: %s", len(missing), missing[:10])
    tissues = tissues[tissues["tissue_id"].isin(have)].reset_index(drop=True)
    train_pool = np.flatnonzero(tissues["split"].astype(str).isin(args.train_splits).to_numpy())
    test = np.flatnonzero((tissues["split"].astype(str) == args.test_split).to_numpy())
    if len(train_pool) < 2 or len(test) == 0:
        raise ValueError(f"need >= 2 training tissues and >= 1 test tissue with tokens and a {args.label!r} label; "
                         f"have {len(train_pool)} and {len(test)}")
    classes = sorted(tissues[args.label].astype(str).unique())
    y = tissues[args.label].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy()
    bags = [load_bag(args.tokens, t) for t in tissues["tissue_id"]]
    present = sorted(set(y[test]))
    runs, preds = [], []
    for seed in range(args.seeds):
        tr, va = split_train_val(len(train_pool), args.val_fraction, seed)
        pred, epochs = train_abmil(bags, y, train_pool[tr], train_pool[va], test, len(classes), seed, args)
        f1 = f1_score(y[test], pred, labels=present, average="macro", zero_division=0)
        runs.append({"method": "virtues_abmil", "seed": seed, "macro_f1": f1, **epochs})
        preds += [{"method": "virtues_abmil", "seed": seed, "tissue_id": tissues.loc[i, "tissue_id"],
                   "true": classes[y[i]], "predicted": classes[p]} for i, p in zip(test, pred)]
    mean_tokens = np.stack([b.mean(0) for b in bags])
    scaler = StandardScaler().fit(mean_tokens[train_pool])
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(mean_tokens[train_pool]), y[train_pool])
    pred = clf.predict(scaler.transform(mean_tokens[test]))
    runs.append({"method": "mean_token_logreg", "seed": 0,
                 "macro_f1": f1_score(y[test], pred, labels=present, average="macro", zero_division=0)})
    preds += [{"method": "mean_token_logreg", "seed": 0, "tissue_id": tissues.loc[i, "tissue_id"],
               "true": classes[y[i]], "predicted": classes[p]} for i, p in zip(test, pred)]
    runs_df = pd.DataFrame(runs)
    summary = runs_df.groupby("method", sort=False)["macro_f1"].agg(["mean", "std", "count"]).reset_index()
    summary.columns = ["method", "macro_f1_mean", "macro_f1_std", "runs"]
    summary["n_train"], summary["n_test"], summary["label"] = len(train_pool), len(test), args.label
    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        summary.to_csv(tmp / "summary.csv", index=False)
        runs_df.to_csv(tmp / "runs.csv", index=False)
        pd.DataFrame(preds).to_csv(tmp / "predictions.csv", index=False)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_tissue_classification", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", required=True, help="output folder of experiments.virtues_tokens")
    p.add_argument("--data", required=True, help="the dataset (its tissue table gives labels and splits)")
    p.add_argument("--label", required=True, help="tissue-table column to predict")
    p.add_argument("--out", required=True)
    p.add_argument("--train-splits", nargs="+", default=["train", "val"], help="splits pooled for training/validation")
    p.add_argument("--test-split", default="test")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.seeds < 1 or not 0 < args.val_fraction < 1:
            raise ValueError("--seeds must be >= 1 and --val-fraction in (0, 1)")
        print(run(args).to_string(index=False))

    return run_command(body)

if __name__ == "__main__":
    sys.exit(main())
