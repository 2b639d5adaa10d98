"""VirTues attention readouts: marker importance scores and spatial attention maps (Suppl. Fig. 20).

    python -m experiments.virtues_attention --ckpt C --data DIR --out OUT [--label-column COL]
        [--split all] [--train-splits train val] [--epochs 5] [--finetune all|summary] [--overwrite]

Every tissue of ``--split`` is cut into its non-overlapping 128-px crops with ≥ 30 % tissue and encoded
unmasked (preprocessing as in training). Marker importance (Methods "Model inspection and
visualization", definitions in :mod:`analysis.virtues_attention`): from the first marker-attention
layer, per tissue (its crops' ρ summed, one region per tissue) and over all tissues (region
``all``) → ``marker_importance.csv``, ``marker_importance.png``.

With ``--label-column``, the model is augmented with channel-summary tokens and fine-tuned to
predict that tissue-table label from each crop of the ``--train-splits`` tissues (the paper: cancer
subtype on Cords et al.); the attention from the PS channel's summary token to the PS tokens in the
penultimate spatial-attention layer (mean over heads) is stitched over each tissue of ``--split`` →
``attention_maps/<tissue>.png``, ``attention_maps.npz`` and ``probe.csv`` (per tissue: label,
prediction from the mean crop probabilities, crop accuracy, whether it trained on it). Outputs are
written atomically to ``OUT``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from rich.progress import track
from torch.utils.data import DataLoader, TensorDataset

from analysis.outputs import atomic_output_dir
from analysis.virtues_attention import importance_table, marker_rho, plot_attention_map, plot_importance, stitch_maps
from datamodules.preprocess import MultiplexPreprocessor
from datamodules.statistics import require_statistics
from datamodules.virtues_eval_crops import grid_corners
from experiments.commands import open_modality, refuse_existing_output, run_command
from lightning_modules.virtues_attention_probe import (
    AttentionProbeModule,
    ChannelSummaryVirTues,
    marker_attention,
    penultimate_spatial_layer,
)
from lightning_modules.virtues_loading import prepare_model
from lightning_modules.virtues_tokens import read_zero_padded

log = logging.getLogger("experiments.virtues_attention")

COMMAND = "virtues_attention"
CROP = 128


def tissue_crops(store, tid: str, channels: list[int], names: list[str], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(crops (K, C, 128, 128) preprocessed, corners (K, 2), image (H, W) shape) of one tissue, or None
    when no crop holds enough tissue."""
    image = store.image(args.modality, tid, args.mpp)
    shape = (int(image.shape[1]), int(image.shape[2]))
    corners = grid_corners(shape, CROP, store.tissue_mask(tid, args.mpp), args.min_tissue)
    if not len(corners):
        log.warning("tissue %s: no %d-px crop holds %.0f %% tissue; left out", tid, CROP, 100 * args.min_tissue)
        return None
    preprocess = MultiplexPreprocessor.from_stats(args.stats, tid, names, blur=args.blur)
    crops = [torch.from_numpy(preprocess(read_zero_padded(image, int(y), int(x), CROP, channels))) for y, x in corners]
    return torch.stack(crops).float(), corners, shape


def in_chunks(crops: torch.Tensor, size: int):  # type: ignore[no-untyped-def]
    for start in range(0, len(crops), size):
        yield crops[start : start + size]


def train_probe(model, crops: torch.Tensor, labels: torch.Tensor, marker_ids: torch.Tensor, n_classes: int,
                device: torch.device, args: argparse.Namespace) -> ChannelSummaryVirTues:  # type: ignore[no-untyped-def]
    L.seed_everything(args.seed, workers=True)
    net = ChannelSummaryVirTues(model, len(marker_ids), n_classes)
    module = AttentionProbeModule(net, marker_ids, lr=args.lr, finetune=args.finetune)
    module.train()  # the loaded model comes in eval mode, and Lightning keeps a module's mode
    loader = DataLoader(TensorDataset(crops, labels), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.no_progress, deterministic=True)
    trainer.fit(module, loader)
    return net.to(device).eval()


def run(args: argparse.Namespace) -> pd.DataFrame:
    store, args.mpp = open_modality(args.data, args.modality, args.mpp)
    refuse_existing_output(args.out, args.overwrite, COMMAND)
    tissues = store.tissues()
    if args.label_column is not None and args.label_column not in tissues:
        raise ValueError(f"{args.data}: tissue table has no column {args.label_column!r} (columns: {list(tissues.columns)})")
    ids = store.tissue_ids(None if args.split == "all" else args.split)
    if not ids:
        raise ValueError(f"{args.data}: no tissue in split {args.split!r}")
    prepared = prepare_model(store, args.modality, args.ckpt, args.config, args.embeddings,
                             trust=args.trust_checkpoint, device=args.device, command=COMMAND)
    model, device = prepared.model.to(prepared.device).eval(), prepared.device
    marker_ids = torch.tensor(prepared.marker_rows, device=device)
    table = store.channels(args.modality)
    names = [str(n) for n in table["channel_name"].iloc[prepared.channels]]
    uids = [str(u) for u in table["uniprot_id"].iloc[prepared.channels]]
    args.stats = require_statistics(store, args.modality, args.mpp)

    data, rho = {}, {}
    for tid in track(ids, description="marker attention", disable=args.no_progress):
        found = tissue_crops(store, tid, prepared.channels, names, args)
        if found is None:
            continue
        data[tid] = found
        crops = found[0]
        rho[tid] = sum(marker_rho(a.cpu().numpy().transpose(1, 2, 3, 0, 4, 5))  # heads first, crops as positions
                       for a in (marker_attention(model, c.to(device), marker_ids) for c in in_chunks(crops, args.batch_size)))
    if not rho:
        raise ValueError(f"no tissue of split {args.split!r} has a crop with {args.min_tissue:.0%} tissue (--min-tissue)")
    rho_all = {"all": sum(rho.values()), **rho}
    importance = importance_table(rho_all, names, uids).rename(columns={"region": "tissue_id"})

    maps, probe_rows = {}, []
    if args.label_column is not None:
        labelled = tissues.set_index("tissue_id")[args.label_column].dropna().astype(str)
        train_ids = [t for t in store.tissue_ids() if t in labelled.index
                     and str(tissues.set_index("tissue_id").loc[t, "split"]) in args.train_splits]
        classes = sorted(labelled.loc[train_ids].unique()) if train_ids else []
        if len(classes) < 2:
            raise ValueError(f"--label-column {args.label_column}: the {args.train_splits} tissues carry {len(classes)} "
                             "class(es); fine-tuning needs at least 2")
        for tid in train_ids:  # training tissues outside --split still need their crops
            if tid not in data:
                found = tissue_crops(store, tid, prepared.channels, names, args)
                if found is not None:
                    data[tid] = found
        train_ids = [t for t in train_ids if t in data]
        crops = torch.cat([data[t][0] for t in train_ids])
        labels = torch.cat([torch.full((len(data[t][0]),), classes.index(labelled[t])) for t in train_ids])
        if args.max_train_crops and len(crops) > args.max_train_crops:
            keep = torch.from_numpy(np.sort(np.random.default_rng(args.seed).choice(len(crops), args.max_train_crops,
                                                                                   replace=False)))
            crops, labels = crops[keep], labels[keep]
        net = train_probe(model, crops, labels, marker_ids, len(classes), device, args)
        layer = penultimate_spatial_layer(model.arch.encoder_pattern)
        for tid in track([t for t in ids if t in data], description="attention maps", disable=args.no_progress):
            crops_t, corners, shape = data[tid]
            probs, grids = [], []
            with torch.no_grad():
                for chunk in in_chunks(crops_t, args.batch_size):
                    logits, _, att = net(chunk.to(device), marker_ids, attention_layer=layer)
                    probs.append(torch.softmax(logits, -1).cpu())
                    grids.append(att.mean(1).cpu())  # mean over heads
            probs_t, grids_t = torch.cat(probs), torch.cat(grids).numpy()
            maps[tid] = stitch_maps(list(grids_t), [tuple(c) for c in corners], shape, model.patch_size)
            truth = labelled.get(tid)
            crop_pred = probs_t.argmax(1).numpy()
            probe_rows.append({"tissue_id": tid, "label": truth, "predicted": classes[int(probs_t.mean(0).argmax())],
                               "crop_accuracy": float(np.mean([classes[i] == truth for i in crop_pred])) if truth in classes
                               else float("nan"), "n_crops": len(crops_t), "trained_on": tid in train_ids})

    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        importance.to_csv(tmp / "marker_importance.csv", index=False)
        plot_importance(importance.rename(columns={"tissue_id": "region"}), tmp / "marker_importance.png")
        if maps:
            pd.DataFrame(probe_rows).to_csv(tmp / "probe.csv", index=False)
            np.savez_compressed(tmp / "attention_maps.npz", **maps)
            (tmp / "attention_maps").mkdir()
            for tid, grid in maps.items():
                crops_t, corners, shape = data[tid]
                background = stitch_maps([c.mean(0).numpy() for c in crops_t], [tuple(c) for c in corners], shape, 1)
                plot_attention_map(background, grid, tmp / "attention_maps" / f"{tid}.png",
                                   title=f"{tid} ({args.label_column})")
    return importance


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_attention", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="VirTuesModule checkpoint, or official model.safetensors (+ --config)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a .ckpt that needs it (runs code from the file: only files you made)")
    p.add_argument("--config", default=None, help="config.json of official weights")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label-column", default=None, help="tissue-table label to fine-tune the summary tokens on (maps)")
    p.add_argument("--split", default="all", help="tissues to score and map ('all' or a split)")
    p.add_argument("--train-splits", nargs="+", default=["train", "val"], help="splits whose tissues fine-tune the probe")
    p.add_argument("--modality", default="imc")
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--min-tissue", type=float, default=0.3, help="crops need this tissue fraction (paper: 0.3)")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs over the training crops")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--finetune", choices=["all", "summary"], default="all",
                   help="all: the augmented model (paper); summary: only the summary tokens and the head")
    p.add_argument("--max-train-crops", type=int, default=4000, help="cap on fine-tuning crops (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-blur", dest="blur", action="store_false")
    p.add_argument("--embeddings", action="append", default=[])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.max_train_crops < 0:
            raise ValueError("--epochs and --batch-size must be >= 1, --lr positive, --max-train-crops >= 0")
        if not 0 <= args.min_tissue <= 1:
            raise ValueError("--min-tissue must be in [0, 1]")
        top = run(args).query("tissue_id == 'all'").sort_values("rank").head(10)
        print(top[["marker", "importance", "rank"]].to_string(index=False))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
