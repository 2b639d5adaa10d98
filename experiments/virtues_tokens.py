"""Cell, niche and tissue tokens of every tissue of a dataset split, from a VirTues checkpoint.

    python -m experiments.virtues_tokens --ckpt C --data DIR --out OUT [--split test|all] [--modality imc]
        [--batch-size 32] [--stride 42] [--pad 120] [--device auto] [--embeddings DIR ...] [--overwrite]
        [--accelerator gpu --devices N [--num-nodes K]]   (tissues shared out under Lightning predict)
        [--channels A,B,C | --channels-from OTHER_DATASET [--channels-from-modality imc]]

Per tissue (aggregation rules in :mod:`analysis.virtues_tokens`, encoder side in
:mod:`lightning_modules.virtues_tokens`):

* ``OUT/cells/<tissue>.h5ad`` — AnnData, one row per cell of the stored cell mask: ``X`` = cell
  tokens, ``obs`` = the dataset's cells table for that tissue (cell type, ...) plus the overlap
  weight, ``obsm['spatial']`` = (x, y) when the cells table has them, ``obsm['mean_expression']`` =
  the cell's mean preprocessed intensity per channel (the usual non-learned baseline for probes).
* ``OUT/niches/<tissue>.npz`` — ``tokens`` (K, d), ``corners`` (K, 2), ``tissue_fraction`` (K,), and
  ``patch_tokens`` (K, 16, 16, d) float16: every patch-summary token of the kept crops, the instances
  a gated-ABMIL tissue classifier aggregates (paper, tissue-level tasks).
* ``OUT/records/<tissue>.json`` — written last: the tissue is complete. A rerun skips complete
  tissues (``--overwrite`` redoes them), so an interrupted run resumes.

At the end ``OUT/tissue_tokens.parquet`` holds one row per tissue (the tissue table's columns plus
``token_0 … token_{d-1}``). With ``--devices``/``--num-nodes`` the tissues are shared out under
Lightning ``predict`` exactly as in ``experiments.rosie_predict`` (one tissue per step, written by one
rank; rank 0 builds the tissue-token table at the end). Markers are matched to the checkpoint's table exactly as in
``experiments.virtues_reconstruct`` (channels without a usable embedding are left out and logged).

``--channels`` (channel names or UniProt ids) or ``--channels-from OTHER`` (the markers whose UniProt
id is also in another dataset's panel) encode from those markers only: the cross-panel transfer of
the paper (Fig. 3e–g) computes both datasets' cell tokens from the markers their panels share, so
that a classifier trained on one sees the same kind of input on the other. VirTues reads any subset
of markers, so the tokens equal those of a dataset that measured only these channels (tested);
``obsm['mean_expression']`` then holds the same subset (the mean-abundance baseline of that figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from rich.progress import track
from scipy import ndimage

from analysis.outputs import claim_output_folder
from datamodules.preprocess import MultiplexPreprocessor
from datamodules.statistics import require_statistics
from datamodules.store import DatasetStore, StoreError
from experiments.commands import open_modality, run_command
from lightning_modules.tissue_jobs import TissueJob, parse_devices, run_tissue_jobs
from lightning_modules.virtues_loading import prepare_model
from lightning_modules.virtues_tokens import CropEncoder, extract_tissue_tokens

log = logging.getLogger("experiments.virtues_tokens")

COMMAND = "virtues_tokens"


def _atomic_write(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    """Write through ``write(tmp_path)`` to a temporary name beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cell_mean_expression(image: np.ndarray, mask: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """(N, C) mean of each channel over each cell's pixels, for the ids in ``cell_ids``."""
    return np.stack([ndimage.mean(ch, labels=mask, index=cell_ids) for ch in image], axis=1).astype(np.float32)


def tokens_for_tissue(store, tissue_id: str, modality: str, mpp: float, channels: list[int], marker_rows: list[int],
                      model, args: argparse.Namespace, device: torch.device) -> dict:  # type: ignore[no-untyped-def]
    """Extract and write one tissue's tokens; returns its completion record."""

    t0 = time.perf_counter()
    names = [str(n) for n in store.channels(modality)["channel_name"].iloc[channels]]
    stats = require_statistics(store, modality, mpp)
    preprocess = MultiplexPreprocessor.from_stats(stats, tissue_id, names, blur=args.blur)
    image = store.image(modality, tissue_id, mpp)
    cell_mask = store.cell_mask(tissue_id, mpp)
    tissue_mask = store.tissue_mask(tissue_id, mpp)
    encoder = CropEncoder(model, torch.tensor(marker_rows), device, chunk_size=args.batch_size)
    tokens = extract_tissue_tokens(image, channels, lambda c: torch.from_numpy(preprocess(c)), encoder, cell_mask,
                                   tissue_mask, pad=args.pad, stride=args.stride)
    out = Path(args.out)
    record = {"tissue_id": tissue_id, "dataset": store.url, "modality": modality, "mpp": mpp, "channels": names,
              "n_cells": int(len(tokens.cell_ids)), "n_niches": int(len(tokens.niche_tokens)),
              "n_cell_crops": tokens.n_cell_crops, "stride": args.stride, "pad": args.pad,
              "tissue_token": None if tokens.tissue_token is None else [float(v) for v in tokens.tissue_token]}
    if cell_mask is None:
        log.warning("%s: no cell mask at %g µm/px: no cell tokens", tissue_id, mpp)
    elif len(tokens.cell_ids):
        # the whole tissue, once (the cell mask is whole too); the store refuses images too large to hold
        _, height, width = image.shape
        expression = cell_mean_expression(preprocess(image.read(0, 0, height, width, channels)), cell_mask, tokens.cell_ids)
        cells = store.cells()
        obs = pd.DataFrame({"tissue_id": tissue_id, "cell_id": tokens.cell_ids, "overlap_weight": tokens.cell_weights})
        if cells is not None:
            mine = cells[cells["tissue_id"].astype(str) == tissue_id].drop(columns=["tissue_id"])
            obs = obs.merge(mine, on="cell_id", how="left")
        obs.index = [f"{tissue_id}:{c}" for c in tokens.cell_ids]
        adata = ad.AnnData(X=tokens.cell_tokens, obs=obs)
        adata.obsm["mean_expression"] = expression
        adata.uns["mean_expression_channels"] = names
        if {"x", "y"} <= set(obs.columns):
            adata.obsm["spatial"] = obs[["x", "y"]].to_numpy(np.float32)
        adata.uns["virtues"] = {"checkpoint": str(args.ckpt), "stride": args.stride, "pad": args.pad}
        _atomic_write(out / "cells" / f"{tissue_id}.h5ad", lambda p: adata.write_h5ad(p))
    def write_niches(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, tokens=tokens.niche_tokens, corners=tokens.niche_corners,
                     tissue_fraction=tokens.niche_tissue_fraction,
                     patch_tokens=tokens.patch_tokens.astype(np.float16))  # (K, 16, 16, d): MIL instances

    _atomic_write(out / "niches" / f"{tissue_id}.npz", write_niches)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    _atomic_write(out / "records" / f"{tissue_id}.json", lambda p: p.write_text(json.dumps(record)))
    return record


def merge_tissue_tokens(out: Path, tissues: pd.DataFrame | None) -> Path | None:
    """``tissue_tokens.parquet`` from every completion record (tissue-table columns joined when given)."""
    rows = []
    for path in sorted((out / "records").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("tissue_token") is None:
            continue
        row = {"tissue_id": record["tissue_id"]}
        row.update({f"token_{i}": v for i, v in enumerate(record["tissue_token"])})
        rows.append(row)
    if not rows:
        return None
    table = pd.DataFrame(rows)
    if tissues is not None:
        table = tissues.merge(table, on="tissue_id", how="right")
    path = out / "tissue_tokens.parquet"
    _atomic_write(path, lambda p: table.to_parquet(p))
    return path


def select_channels(store, modality: str, channels: list[int], marker_rows: list[int], wanted: Sequence[str] | None = None,
                    other=None, other_modality: str | None = None) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """The usable ``channels`` (and their ``marker_rows``) restricted to ``wanted`` (channel names or UniProt
    ids) or to the markers of ``other``'s panel (a :class:`DatasetStore`, matched by UniProt id, since two
    datasets name the same antibody differently). Unknown names and an empty selection are errors."""
    if wanted is None and other is None:
        return channels, marker_rows
    panel = store.channels(modality).reset_index(drop=True)
    names = [str(panel["channel_name"].iloc[i]) for i in channels]
    uids = [str(panel["uniprot_id"].iloc[i]).upper() for i in channels]
    if wanted is not None:
        wanted = [w.strip() for w in wanted if w.strip()]
        known = {n.lower() for n in panel["channel_name"].astype(str)} | {str(u).lower() for u in panel.get("uniprot_id", [])}
        unknown = [w for w in wanted if w.lower() not in known]
        if unknown:
            raise ValueError(f"--channels: {unknown} are not in {store.url}'s {modality} panel "
                             f"(channels: {panel['channel_name'].astype(str).tolist()})")
        keys = {w.lower() for w in wanted}
        keep = [k for k in range(len(channels)) if names[k].lower() in keys or uids[k].lower() in keys]
        source = "--channels"
    else:
        other_modality = other_modality or modality
        if other_modality not in other.modalities():
            raise StoreError(f"--channels-from {other.url}: no modality {other_modality!r} (has {other.modalities()})")
        shared = {str(u).upper() for u in other.channels(other_modality).get("uniprot_id", pd.Series(dtype=object)).dropna()}
        keep = [k for k in range(len(channels)) if uids[k] in shared]
        source = f"--channels-from {other.url}"
    if not keep:
        raise ValueError(f"{source}: none of {store.url}'s usable {modality} channels is selected")
    left = [names[k] for k in range(len(channels)) if k not in keep]
    if left:
        log.info("%s: %d usable channel(s) left out: %s", source, len(left), ", ".join(left))
    return [channels[k] for k in keep], [marker_rows[k] for k in keep]


def model_for_tokens(store, args: argparse.Namespace) -> tuple[torch.nn.Module, list[int], list[int], torch.device]:  # type: ignore[no-untyped-def]
    """The library's :func:`~lightning_modules.virtues_loading.prepare_model` for these options, with a
    warning when the blur setting differs from the one the checkpoint trained with."""
    prepared = prepare_model(store, args.modality, args.ckpt, args.config, args.embeddings,
                                   trust=args.trust_checkpoint, device=args.device, command=COMMAND)
    blur = prepared.data_hparams.get("blur")
    if blur is not None and bool(blur) != args.blur:
        log.warning("the checkpoint trained with blur=%s but --%sblur was given", blur, "" if args.blur else "no-")
    # other commands (retrieval, attention) share this loader without the channel-subset options
    channels_arg, channels_from = getattr(args, "channels", None), getattr(args, "channels_from", None)
    wanted = channels_arg.split(",") if channels_arg else None
    other = DatasetStore(channels_from) if channels_from else None
    channels, marker_rows = select_channels(store, args.modality, prepared.channels, prepared.marker_rows, wanted, other,
                                            getattr(args, "channels_from_modality", None) or args.modality)
    return prepared.model, channels, marker_rows, prepared.device


class TokenWorker:
    """The model a rank encodes with, and the device Lightning gave that rank."""
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device

    def to(self, device: torch.device) -> "TokenWorker":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_tokens", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="VirTuesModule checkpoint, or official model.safetensors (+ --config)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a .ckpt that needs it (runs code from the file: only files you made)")
    p.add_argument("--config", default=None, help="config.json of official weights")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="output folder (created; reruns skip complete tissues)")
    p.add_argument("--split", default="test", help="tissues of this split, or 'all'")
    p.add_argument("--modality", default="imc")
    p.add_argument("--mpp", type=float, default=None, help="resolution (default: the dataset's first)")
    p.add_argument("--batch-size", type=int, default=32, help="crops per encoder call (official: 32)")
    p.add_argument("--stride", type=int, default=42, help="cell-token crop stride in px (official: 42)")
    p.add_argument("--pad", type=int, default=120, help="zero padding around the image for cell tokens (official: 120)")
    p.add_argument("--no-blur", dest="blur", action="store_false", help="skip the 3x3 Gaussian blur of preprocessing")
    p.add_argument("--embeddings", action="append", default=[], help="extra marker_embeddings folder (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true", help="redo tissues that are already complete")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator; with --devices, runs under Lightning predict")
    p.add_argument("--devices", default=None, help="Lightning devices per node (int or 'auto'): tissues shared out across ranks")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default=None, help="Lightning strategy (default ddp for several devices)")
    p.add_argument("--no-progress", action="store_true")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--channels", default=None, help="comma-separated channel names or UniProt ids: encode from these only")
    sel.add_argument("--channels-from", default=None, metavar="OTHER_DATASET",
                     help="encode only from the markers (UniProt ids) this dataset's panel shares with OTHER_DATASET's")
    p.add_argument("--channels-from-modality", default=None, help="OTHER_DATASET's modality (default: --modality)")
    return p


def extract(args: argparse.Namespace) -> None:
    """Tokens of every pending tissue of ``args.split``, then the tissue-token table."""

    if args.batch_size < 1 or args.stride < 1 or args.pad < 0:
        raise ValueError("--batch-size and --stride must be positive and --pad non-negative")
    store, mpp = open_modality(args.data, args.modality, args.mpp)
    ids = store.tissue_ids(None if args.split == "all" else args.split)
    if not ids:
        raise StoreError(f"{store.url}: no tissue in split {args.split!r}")
    out = claim_output_folder(args.out, COMMAND)
    done = [t for t in ids if (out / "records" / f"{t}.json").exists()] if not args.overwrite else []
    for t in done:
        print(f"{t}: already complete in {out}, skipped; --overwrite redoes it")
    todo = [t for t in ids if t not in done]
    distributed = args.devices is not None or args.num_nodes > 1 or args.accelerator is not None
    if todo:
        model, channels, marker_rows, device = model_for_tokens(store, args)
        worker = TokenWorker(model, device)

        def run_job(job, worker: TokenWorker, rank: int = 0) -> dict:  # type: ignore[no-untyped-def]
            record = tokens_for_tissue(store, job.tissue_id, args.modality, mpp, channels, marker_rows, worker.model,
                                       args, worker.device)
            print(f"{job.tissue_id}: {record['n_cells']} cell tokens from {record['n_cell_crops']} crops, "
                  f"{record['n_niches']} niche tokens, {record['seconds']} s", flush=True)
            return record

        t0 = time.perf_counter()
        if distributed:

            run_tissue_jobs(worker, [TissueJob("store", t) for t in todo], run_job,
                            merge=lambda: merge_tissue_tokens(out, store.tissues()),
                            accelerator=args.accelerator or "auto", devices=parse_devices(args.devices),
                            num_nodes=args.num_nodes, strategy=args.strategy, progress=not args.no_progress)
        else:

            for tid in track(todo, description="VirTues tokens", disable=args.no_progress):
                run_job(TissueJob("store", tid), worker)
        log.info("%d tissues in %.1f s", len(todo), time.perf_counter() - t0)
    if not (distributed and todo):  # a distributed run merged on rank 0 already
        path = merge_tissue_tokens(out, store.tissues())
        if path is not None:
            print(f"tissue tokens: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    return run_command(lambda: extract(args))

if __name__ == "__main__":
    sys.exit(main())
