"""Masked-reconstruction evaluation of a VirTues checkpoint (paper Fig. 2a–d, zero-shot Fig. 2h).

    python -m experiments.virtues_reconstruct --ckpt C --data DIR [--data DIR2 ...] --out OUT \\
        [--split test] [--modality imc] [--max-crops 64] [--seed 0] [--overwrite] \\
        [--config config.json]  (when --ckpt is an official model.safetensors)
        [--embeddings DIR ...] [--allow-missing-table-rows] [--marker-max-crops N] [--batch-size 16]

Crops: the non-overlapping 128×128 grid (from the top-left corner, whole crops only) of every tissue
of ``--split``, kept when at least ``--min-tissue-fraction`` of the crop is tissue (stored tissue
mask), at most ``--max-crops`` per dataset (a seeded, sorted random subset when there are more).
Each crop is read and preprocessed by the training DataModule's own dataset
(``VirTuesCropDataset`` with ``augment=False, masking=False``, no channel dropout), so the pixels are
exactly those the model was trained on; the blur setting comes from the checkpoint's DataModule
settings when it has them (``--crop-size`` is 128 unless given). Channels a tissue did not measure
(``channels_per_tissue``) are left out of that tissue's crops. The ``most_correlated`` baseline is fitted on the same grid of the
``--fit-split`` (train) tissues.

Markers: the checkpoint stores the UniProt id order of its marker table; the table is rebuilt from
the evaluated datasets' ``marker_embeddings`` (plus ``--embeddings`` folders) in that order. Markers
of the evaluated panel absent from it are appended (zero-shot, ``seen=False``) when an embedding
exists; channels without a UniProt id, failing QC or without any embedding are listed in the log
and ``skipped_markers.csv``. A marker is "seen" when the pretraining data trained on a channel of it
(``--trained-on`` folders, default the checkpoint's ``data_dirs``): a table row that only came from
an embedding file in a pretraining folder counts as unseen.

Outputs (written to a temporary folder, renamed to ``--out`` when complete): ``per_marker.csv``,
``summary.csv`` (``strategy,method,pearson_r,f1``), ``summary_seen_unseen.csv``,
``summary_per_dataset.csv``, ``baseline_fits.csv``, ``skipped_markers.csv``, ``evaluation.json``,
``reconstruction.log`` and PNG figures. See :mod:`analysis.virtues_reconstruction` for the metrics.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.outputs import check_output_folder
from analysis.virtues_reconstruction import (
    STRATEGIES,
    ReconstructionError,
    ReconstructionResult,
    build_marker_vocabulary,
    evaluate_reconstruction,
    write_outputs,
)
from datamodules import layout
from datamodules.command_line import run_command
from datamodules.store import DatasetStore, StoreError
from datamodules.virtues_eval_crops import load_crops
from datamodules.virtues_trained_markers import trained_markers
from lightning_modules.virtues_loading import available_embeddings, channel_plan, load_model, uniprot_id_or_none

log = logging.getLogger("experiments.virtues_reconstruct")
COMMAND = "virtues_reconstruct"


# ============================================================================================
# Run
# ============================================================================================


def run(
    ckpt: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    split: str = "test",
    modality: str = "imc",
    max_crops: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    config: str | Path | None = None,
    embeddings: Sequence[str | Path] = (),
    allow_missing_table_rows: bool = False,
    batch_size: int = 16,
    min_tissue_fraction: float = 0.3,
    fit_split: str = "train",
    max_fit_crops: int = 64,
    mpp: float | None = None,
    strategies: Sequence[str] = STRATEGIES,
    device: str = "cpu",
    figures: bool = True,
    marker_max_crops: int | None = None,
    crop_size: int = 128,
    trust_checkpoint: bool = False,
    trained_on: Sequence[str | Path] = (),
) -> ReconstructionResult:
    """Load, build crops, evaluate, write ``out``; returns the result tables.

    ``trained_on``: the pretraining dataset folders; default = the checkpoint's own DataModule
    ``data_dirs`` when they exist here. Seen markers = channels those datasets trained on."""
    out = Path(out)
    check_output_folder(out, COMMAND, overwrite)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    watched = [logging.getLogger(n) for n in ("analysis", "experiments", "datamodules", "lightning_modules")]
    old_levels = [lg.level for lg in watched]
    for lg in watched:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        t0 = time.perf_counter()
        loaded = load_model(ckpt, config, official_ids_from=embeddings, trust=trust_checkpoint, command=COMMAND)
        stores = [DatasetStore(d) for d in data]
        names = _unique_names([s.name for s in stores])
        for s in stores:
            if modality not in s.modalities():
                raise StoreError(f"{s.url}: no modality {modality!r} (has {s.modalities()}); pass --modality")
        available = available_embeddings(stores, embeddings)
        needed = [u for s in stores for u in (uniprot_id_or_none(v) for v in s.channels(modality).get("uniprot_id", [])) if u]
        seen_set = seen_markers(loaded.data_hparams, trained_on, modality)
        vocab = build_marker_vocabulary(loaded.trained_ids, available, needed, allow_missing_table_rows, seen_set)
        if loaded.trained_ids is None and not embeddings and seen_set is None:
            log.warning("official weights carry no marker list: every marker is counted as seen (pass --embeddings "
                        "<official marker_embeddings folder> to use the official table order and seen/unseen split)")
        model = loaded.model
        model.set_marker_table(vocab.embeddings, vocab.uniprot_ids)
        model.to(device)
        dm = loaded.data_hparams
        crop_size = int(crop_size)
        if int(dm.get("crop_size", crop_size)) != crop_size:
            log.warning("the checkpoint was trained on %s-px crops; evaluating %d-px crops", dm.get("crop_size"), crop_size)
        blur = bool(dm.get("blur", True))
        patch = int(getattr(model, "patch_size", 8))

        crops, fit_crops, skipped = [], [], []
        for store, name in zip(stores, names):
            keep, skip = channel_plan(store, modality, vocab)
            for row in skip:
                row["dataset"] = name
                log.warning("%s: marker %s (UniProt %s) not evaluated: %s", name, row["marker"], row["uniprot_id"], row["reason"])
            skipped += skip
            if not keep:
                log.warning("%s: no evaluable channel", name)
                continue
            kw = dict(crop_size=crop_size, patch_size=patch, blur=blur, mpp=mpp, min_tissue=min_tissue_fraction)
            got = load_crops(store, name, modality, split, keep, vocab, max_crops, seed, **kw)
            if not got:
                raise ReconstructionError(f"{store.url}: no {crop_size}-px crop with >= {min_tissue_fraction:.0%} tissue in split "
                                          f"{split!r} (tissues: {store.tissue_ids(split)}); check --split or lower "
                                          "--min-tissue-fraction")
            log.info("%s: %d crops of split %s, %d channels", name, len(got), split, len(keep))
            crops += got
            if "marker" in strategies:
                fit_crops += load_crops(store, name, modality, fit_split, keep, vocab, max_fit_crops, seed, **kw)
        if not crops:
            raise ReconstructionError("no dataset has an evaluable channel and crop")
        result = evaluate_reconstruction(model, crops, fit_crops, strategies, seed, batch_size, vocab.seen, patch, device,
                                         marker_max_crops=marker_max_crops)
        summary = result.summary
        log.info("summary (mean over markers):\n%s", summary.to_string(index=False))
        info = {"ckpt": str(ckpt), "data": [str(d) for d in data], "split": split, "modality": modality,
                "seen_from": "pretraining channels" if seen_set is not None else "marker table",
                "max_crops": max_crops, "min_tissue_fraction": min_tissue_fraction, "fit_split": fit_split,
                "crop_size": crop_size, "blur": blur, "n_table_rows": len(vocab.uniprot_ids),
                "unseen_markers": [u for u, s in vocab.seen.items() if not s],
                "missing_trained_rows": vocab.missing_trained, "seconds_total": time.perf_counter() - t0}
        skipped_df = pd.DataFrame(skipped, columns=["dataset", "marker", "uniprot_id", "reason"])
        write_outputs(result, out, skipped_df, info, overwrite=overwrite, figures=figures,
                      extra_files={"reconstruction.log": buffer.getvalue()})
    finally:
        for lg, lvl in zip(watched, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
    return result


def seen_markers(data_hparams: dict, trained_on: Sequence[str | Path], modality: str) -> set[str] | None:
    """UniProt ids of the channels pretraining trained on (see ``datamodules.virtues_trained_markers``):
    from ``trained_on`` when given, else from the checkpoint's DataModule ``data_dirs`` when all of
    them exist here; None (every table row counted as seen, with a warning) when neither is known."""
    dirs = [str(d) for d in trained_on] or [str(d) for d in data_hparams.get("data_dirs") or []]
    if not dirs:
        return None
    if not trained_on and not all(Path(d).exists() for d in dirs):
        log.warning("the checkpoint's pretraining folders %s are not here: every marker of its table is counted as "
                    "seen; pass --trained-on <pretraining dataset> for the seen/unseen split", dirs)
        return None
    return trained_markers(dirs, str(data_hparams.get("modality", modality)), str(data_hparams.get("train_split", "train")))


def _unique_names(names: Sequence[str]) -> list[str]:
    out, count = [], {}
    for n in names:
        count[n] = count.get(n, 0) + 1
        out.append(n if count[n] == 1 else f"{n}_{count[n]}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_reconstruct", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="VirTuesModule checkpoint (.ckpt) or official model.safetensors")
    p.add_argument("--config", default=None, help="config.json for official weights (default: next to them)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a .ckpt that needs it (runs code from the file: only files you made)")
    p.add_argument("--data", action="append", required=True, help="evaluated dataset folder (repeatable)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--split", default="test")
    p.add_argument("--modality", default="imc")
    p.add_argument("--mpp", type=float, default=None, help="resolution (default: the dataset's first)")
    p.add_argument("--max-crops", type=int, default=64, help="at most this many crops per dataset")
    p.add_argument("--marker-max-crops", type=int, default=None,
                   help="marker masking runs C forward passes per crop: use at most this many crops per dataset for it "
                        "(default: all evaluated crops)")
    p.add_argument("--crop-size", type=int, default=128, help="evaluated crop size in pixels (the paper's 128)")
    p.add_argument("--min-tissue-fraction", type=float, default=0.3)
    p.add_argument("--fit-split", default="train", help="split the most-correlated baseline is fitted on")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of " + ",".join(STRATEGIES))
    p.add_argument("--embeddings", action="append", default=[], help="extra marker_embeddings folder (repeatable)")
    p.add_argument("--trained-on", action="append", default=[],
                   help="pretraining dataset folder (repeatable): seen markers = its trained channels (default: the "
                        "checkpoint's data_dirs when they exist here)")
    p.add_argument("--allow-missing-table-rows", action="store_true",
                   help="checkpoint markers without any embedding become unused NaN rows instead of an error")
    p.add_argument("--batch-size", type=int, default=16, help="samples (crop variants) per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Numbers outside their range are refused before the model is loaded."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-crops", args.max_crops), ("--crop-size", args.crop_size)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if args.marker_max_crops is not None and args.marker_max_crops < 1:
        raise ValueError(f"--marker-max-crops {args.marker_max_crops}: must be a positive integer")
    if not 0.0 <= args.min_tissue_fraction <= 1.0:
        raise ValueError(f"--min-tissue-fraction {args.min_tissue_fraction}: must be a fraction between 0 and 1")
    if args.mpp is not None:
        layout.check_mpp(args.mpp, "--mpp")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]

    def body() -> None:
        check_arguments(args)
        result = run(args.ckpt, args.data, args.out, args.split, args.modality, args.max_crops, args.seed, args.overwrite,
                     args.config, args.embeddings, args.allow_missing_table_rows, args.batch_size, args.min_tissue_fraction,
                     args.fit_split, mpp=args.mpp, strategies=strategies, device=args.device,
                     marker_max_crops=args.marker_max_crops, crop_size=args.crop_size,
                     trust_checkpoint=args.trust_checkpoint, trained_on=args.trained_on)
        print(result.summary.to_string(index=False))
        print(f"wrote {args.out}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
