"""Predict multiplex images from H&E with a trained ROSIE model.

    python -m experiments.rosie_predict --ckpt C --he IMAGE_OR_DATASET --out OUT [--stride 8]
        [--tissue-id ID | --split test] [--batch-size 64] [--ome-tiff] [--blend]
        [--cell-mask FILE | --segment he|dapi [--expand-um 2]] [--device auto|cpu|cuda] [--overwrite]
        [--accelerator auto|cpu|gpu --devices N [--num-nodes K] [--strategy ddp]]

``--he`` is an H&E image file (RGB uint8: a whole-slide file OpenSlide reads — .svs, .ndpi, .mrxs,
.scn, ... —, a tiled/pyramidal TIFF or OME-TIFF, PNG or JPEG; slides and TIFFs are read lazily, region
by region, through :mod:`datamodules.slide_readers`, and the foreground thumbnail comes from a reduced
pyramid level) or a dataset folder, with ``--tissue-id`` for one tissue or ``--split`` for all tissues
of a split. The µm/px is ``--mpp``, else the file's (OME-XML, Aperio/OpenSlide MPP, TIFF resolution
tags). ``OUT`` is a dataset folder (created or extended) holding the prediction as modality ``codex``
at ``mpp × stride`` µm/px, with NGFF multiscales levels (2× block means down to
``--pyramid-min-side`` px, default 512; level 0 is the prediction), plus ``qc.json``/``qc.csv``
(dynamic range per marker, W1 distance of the H&E histogram to the training set when known,
patches/s), and optionally ``<tissue>.ome.tif`` (tiled, with SubIFD pyramid levels by the same rule)
and ``<tissue>.cells.h5ad``. The sliding window, padding and foreground policies are documented in
:mod:`lightning_modules.rosie_inference`.

Cells: per-cell mean expression (``<tissue>.cells.h5ad``, one row per cell) needs a cell mask at the
H&E resolution: ``--cell-mask``, or a dataset's stored mask. Plain H&E has none, so ``--segment he``
segments the H&E's hematoxylin channel first (nuclei grown ``--expand-um`` µm into cells;
:mod:`analysis.cell_segmentation`) and ``--segment dapi`` a dataset's measured DAPI on the H&E grid
(the paper's choice). The segmented mask is written into ``OUT`` as
``segmentations/<mpp>mpp/cell_masks/instances/<tissue>.npz`` in the same pass; a tissue whose
dataset already stores a cell mask keeps it. Segmentation holds the label image in memory, so
images above 10⁹ px are refused before the model is loaded.

Resumable: every tissue ends with a completion record (``qc/tissues/<tissue>.json``); a rerun skips
tissues that are complete with the same stride and blending and redoes the rest (``--overwrite``
redoes all). With ``--devices``/``--num-nodes`` the tissues are shared out under Lightning
``predict`` (one tissue = one step; each tissue written by one rank; rank 0 merges the QC tables):
``--accelerator gpu --devices 4``, or ``torchrun``/SLURM with ``--num-nodes`` as for training.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from analysis import cell_segmentation as cs
from analysis.outputs import looks_like_dataset
from datamodules import layout
from datamodules.command_line import run_command
from datamodules.image_files import open_tiff, read_mask_file
from datamodules.slide_readers import OPENSLIDE_SUFFIXES
from datamodules.store import DatasetStore, StoreError, instance_ids
from callbacks.rosie_prediction_writer import RosiePredictionWriter
from datamodules.rosie_tiles import RosieTileDataModule
from lightning_modules import rosie_inference as ri
from lightning_modules.rosie_inference.speed import configure_for_speed
from lightning_modules.tissue_jobs import TissueJob, parse_devices

log = logging.getLogger("rosie_predict")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.rosie_predict", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of RosieModule, or the official ROSIE weights (--official)")
    p.add_argument("--official", action="store_true", help="the checkpoint is the authors' released ROSIE.pth (resize to 224 + ImageNet normalisation)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of the checkpoint (only for files you trust)")
    p.add_argument("--he", required=True, help="H&E image file, or a dataset folder (with --tissue-id or --split)")
    p.add_argument("--tissue-id", default=None, help="tissue to predict (dataset input), or the id to give an image file (default: file name)")
    p.add_argument("--split", default=None, help="dataset input: predict every tissue of this split (train/val/test)")
    p.add_argument("--out", required=True, help="output dataset folder (created if absent)")
    p.add_argument("--stride", type=int, default=8, help="output block size in px, 1..8 (8 = the paper's standard, 1 = full resolution)")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of an H&E image file (default: from OME metadata, else 0.5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tile-size", type=int, default=256, help="output px per streamed tile side (memory bound)")
    p.add_argument("--foreground", choices=["otsu", "all"], default="otsu",
                   help="blocks to predict: Otsu tissue mask (a dataset's stored tissue mask when present), or all")
    p.add_argument("--ome-tiff", action="store_true", help="also write OUT/<tissue_id>.ome.tif (tiled, pyramidal)")
    p.add_argument("--pyramid-min-side", type=int, default=ri.MIN_TOP_SIDE,
                   help="output pyramids (OME-Zarr multiscales, OME-TIFF SubIFDs): levels halve until the longer side "
                        "is at most this many px")
    p.add_argument("--blend", action="store_true", help="Gaussian overlap blend to native resolution (M, H, W)")
    p.add_argument("--blend-kernel", type=float, default=None, help="blend window in px (default 2 × stride)")
    p.add_argument("--cell-mask", default=None,
                   help="instance mask at the H&E resolution (.npz key 'mask', .npy, .tif) -> OUT/<tissue_id>.cells.h5ad; "
                        "dataset input uses the stored cell mask when present")
    p.add_argument("--segment", choices=["he", "dapi"], default=None,
                   help="tissues without a cell mask: segment cells from the H&E (he) or the dataset's measured DAPI "
                        "(dapi) and write the mask and OUT/<tissue_id>.cells.h5ad")
    p.add_argument("--expand-um", type=float, default=cs.DEFAULT_EXPAND_UM,
                   help="with --segment: µm each nucleus grows into its cell body")
    p.add_argument("--reference-hist", default=None, help="training-set H&E histograms (R,3,256) .npy/.npz for the W1 QC")
    p.add_argument("--no-rescale", action="store_true", help="keep the model's scaled outputs (skip the checkpoint's marker scales)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="redo tissues that are already complete in OUT (default: skip them, so a rerun resumes)")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator (cpu, gpu, auto); with --devices, runs under Lightning predict")
    p.add_argument("--devices", default=None, help="Lightning devices per node (an int or 'auto'): tissues are shared out across ranks")
    p.add_argument("--num-nodes", type=int, default=1, help="Lightning nodes (multi-node prediction with torchrun / SLURM)")
    p.add_argument("--strategy", default=None, help="Lightning strategy (default ddp when more than one device)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes reading H&E regions (0: read in the main process)")
    p.add_argument("--mode", choices=["exact", "dense"], default="exact",
                   help="exact: every patch through the network; dense: the dense approximation (faster)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto/bf16: bf16 autocast on CUDA (weights and outputs stay fp32), fp32 on CPU; fp32: never autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (GPU runs; the first batch compiles)")
    p.add_argument("--stitching", choices=["grid", "official"], default="grid",
                   help="grid: one prediction per stride block, white padding (this project); official: the authors' "
                        "script (stride halved, black padding, Gaussian splat at native resolution)")
    p.add_argument("--resample", action="store_true",
                   help="an H&E at another µm/px than the model's is resampled to the model's on the fly")
    p.add_argument("--ignore-resolution", action="store_true",
                   help="predict an H&E at another µm/px than the model's as it is")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_cell_mask(path: str | Path) -> object:
    """A 2-D instance mask at the H&E resolution: TIFF read lazily (slide-sized), else read whole
    (.npz key 'mask' or a single array, .npy, .png); ids are checked as the store checks them."""

    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import zarr

        tif = open_tiff(path)
        arr = zarr.open(tif.series[0].aszarr(level=0), mode="r")
        if arr.ndim != 2 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            tif.close()
            raise ValueError(f"{path}: a cell mask must be one 2-D plane of integer instance ids, got shape {arr.shape} "
                             f"{arr.dtype}")
        if np.dtype(arr.dtype).itemsize > 4 or np.issubdtype(arr.dtype, np.signedinteger):
            return instance_ids(np.asarray(arr), f"cell mask {path}")  # signed or 64-bit: check the values
        return arr
    return instance_ids(read_mask_file(path, "cell mask"), f"cell mask {path}")


def _default_tissue_id(path: Path) -> str:
    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".jpeg", ".jpg", ".btf", ".bmp") + OPENSLIDE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem).strip("._-") or "tissue"
    return stem


def pending_jobs(jobs: list, out: str, options, need_cells: bool = False) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    """Split ``jobs`` into (to run, already complete in ``out``); ``options.overwrite`` runs all.

    ``need_cells``: a tissue completed without a cell table (an earlier run without ``--segment``)
    is not complete for this one.
    """
    if options.overwrite:
        return list(jobs), []
    todo, done = [], []
    for job in jobs:
        complete = ri.is_complete(out, job.tissue_id, options)
        if complete and need_cells:
            complete = "cells_h5ad" in ((ri.read_record(out, job.tissue_id) or {}).get("entry") or {})
        (done if complete else todo).append(job)
    return todo, done


def segment_tissue(image: object, mpp: float, source: str, expand_um: float, dataset: Path | None,
                   tissue_id: str) -> tuple[np.ndarray, dict]:
    """A cell mask of one tissue at the H&E resolution, and how it was made (kept in the QC entry and .h5ad)."""
    _, h, w = image.shape  # type: ignore[attr-defined]
    start = time.perf_counter()
    if source == "he":
        seg = cs.segment_cells_he(image, mpp, expand_um)
    else:
        if dataset is None:
            raise ValueError("--segment dapi needs a dataset folder as --he (its measured DAPI); use --segment he for an "
                             "H&E image file")
        seg = cs.segment_cells_dapi(ri.store_dapi_plane(str(dataset), tissue_id, mpp, (h, w)), mpp, expand_um)
    seconds = time.perf_counter() - start
    n_cells = len(np.unique(seg.cells)) - 1
    print(f"{tissue_id}: segmented {n_cells} cells from the {'H&E hematoxylin' if source == 'he' else 'DAPI'} channel "
          f"(nuclei grown {expand_um:g} µm) in {seconds:.1f} s", flush=True)
    info = {"method": "analysis.cell_segmentation", "source": source, "expand_um": float(expand_um),
            "stain_threshold": seg.threshold if np.isfinite(seg.threshold) else None,  # inf: a blank image
            "n_cells": n_cells, "seconds": round(seconds, 3)}
    return seg.cells, info


def check_arguments(args: argparse.Namespace) -> None:
    """Numbers outside their physical range are refused before anything is read or written."""
    ri.check_stride(args.stride)
    for flag, value in (("--batch-size", args.batch_size), ("--tile-size", args.tile_size)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if args.tile_size > 8192:
        raise ValueError(f"--tile-size {args.tile_size}: at most 8192 output px per tile side (memory per tile)")
    if args.mpp is not None:
        layout.check_mpp(args.mpp, "--mpp")
    if args.blend_kernel is not None and not 0 < args.blend_kernel <= 1024:
        raise ValueError(f"--blend-kernel {args.blend_kernel}: must be a window in px between 0 and 1024")
    if not 8 <= args.pyramid_min_side <= 65536:
        raise ValueError(f"--pyramid-min-side {args.pyramid_min_side}: must be between 8 and 65536 px")
    if args.num_nodes < 1:
        raise ValueError(f"--num-nodes {args.num_nodes}: must be >= 1")
    if not 0 <= args.expand_um <= 100:
        raise ValueError(f"--expand-um {args.expand_um}: must be between 0 and 100 µm")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers {args.num_workers}: must be >= 0")
    if args.resample and args.ignore_resolution:
        raise ValueError("--resample and --ignore-resolution contradict each other: pass one of them")
    if args.segment and args.cell_mask:
        raise ValueError("--segment and --cell-mask both give the cells: pass one of them")


def check_store_segmentation(dataset: Path, tissue_ids: list[str], source: str) -> None:
    """``--segment`` on a dataset: every tissue without a stored cell mask must be segmentable (checked before the model loads)."""
    store = DatasetStore(str(dataset))
    for tid in tissue_ids:
        image = store.image("he", tid)
        if ri.store_has_cell_mask(str(dataset), tid, image.mpp):
            continue
        _, h, w = image.shape
        cs.check_size(h, w, f"{dataset} tissue {tid!r}")
        if source == "dapi":
            ri.store_dapi_plane(str(dataset), tid, image.mpp, (h, w))


def check_file_tissue_id(out: str, tissue_id: str, he: Path, explicit: bool, overwrite: bool) -> None:
    """Two files whose names sanitise to one id must not share (or silently skip) one prediction."""
    record = ri.read_record(out, tissue_id) if Path(out).exists() else None
    source = (record or {}).get("tissue_row", {}).get("source")
    if source is None or Path(str(source)).resolve() == he.resolve():
        return
    if explicit and overwrite:
        return
    how = "pass --overwrite to replace it" if explicit else "pass --tissue-id to name this one"
    raise ValueError(f"--out {out}: tissue id {tissue_id!r}" + ("" if explicit else f" (from the file name {he.name!r})")
                     + f" already holds the prediction of another file, {source}; {how}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    return run_command(lambda: predict(args))


def source_mpp(args: argparse.Namespace, he: Path, job: TissueJob, model_mpp: float | None) -> float:
    """The H&E's µm/px: the store's, the file's, ``--mpp``, else the model's (or 0.5 µm/px) with a warning."""
    if job.source == "store":
        return float(DatasetStore(str(he)).image("he", job.tissue_id).mpp)
    if args.mpp:
        return float(args.mpp)
    image, file_mpp = ri.open_he_image(he)
    image.close()
    if file_mpp is None:
        guess = model_mpp or 0.5
        log.warning("%s: no pixel size in the file and no --mpp: assuming %g µm/px", he, guess)
        return guess
    return float(file_mpp)


def check_resolution(name: str, mpp: float, model_mpp: float | None, args: argparse.Namespace) -> list | None:
    """``[from, to]`` µm/px to resample, None to predict as is; refuses a mismatch nobody asked for."""
    if model_mpp is None or ri.same_mpp(mpp, model_mpp) or args.ignore_resolution:
        return None
    if args.resample:
        return [mpp, model_mpp]
    raise ValueError(f"{name}: the H&E is {mpp:g} µm/px but the model {args.ckpt} was trained at {model_mpp:g} µm/px; "
                     f"pass --resample to resample it to {model_mpp:g} µm/px on the fly, or --ignore-resolution to "
                     f"predict at {mpp:g} µm/px anyway")


def predict(args: argparse.Namespace) -> int:

    check_arguments(args)
    he = Path(args.he)
    if not he.exists():
        raise FileNotFoundError(f"--he {he}: no such file or dataset folder")
    if Path(args.out).resolve() == he.resolve():
        raise ValueError(f"--out {args.out} is the input dataset: write predictions to a separate folder so they "
                         "cannot be mistaken for (or replace) measured images")
    ri.check_prediction_target(args.out)
    options = ri.PredictOptions(stride=args.stride, batch_size=args.batch_size, tile_size=args.tile_size,
                                foreground="store" if args.foreground == "otsu" else "all", blend=args.blend,
                                blend_kernel=args.blend_kernel, ome_tiff=args.ome_tiff, overwrite=args.overwrite,
                                progress=not args.no_progress, stitching=args.stitching, mode=args.mode,
                                pyramid_min_side=args.pyramid_min_side)
    jobs: list = []
    if he.is_dir():
        if not looks_like_dataset(he):
            raise ValueError(f"--he {he}: is a folder but not a dataset (no metadata/tissues.parquet or modality folder); "
                             "give an H&E image file, or a dataset folder made by ingest")
        if (args.tissue_id is None) == (args.split is None):
            raise ValueError(f"--he {he} is a dataset folder: give exactly one of --tissue-id ID or --split SPLIT")
        if args.mpp is not None:
            log.info("--mpp is ignored for dataset input: the H&E resolution is the store's")
        ids = [args.tissue_id] if args.tissue_id else DatasetStore(str(he)).tissue_ids(args.split)
        if not ids:
            raise StoreError(f"{he}: no tissue in split {args.split!r}")
        if args.cell_mask and len(ids) > 1:
            raise ValueError("--cell-mask is for a single tissue; with --split the stored cell masks are used")
        jobs = [TissueJob("store", tid) for tid in ids]
        if args.segment:
            check_store_segmentation(he, ids, args.segment)
    else:
        if args.split:
            raise ValueError("--split needs a dataset folder as --he")
        tissue_id = args.tissue_id or _default_tissue_id(he)
        layout.check_tissue_id(tissue_id)
        check_file_tissue_id(args.out, tissue_id, he, args.tissue_id is not None, args.overwrite)
        jobs.append(TissueJob("file", tissue_id))
        image, _ = ri.open_he_image(he)  # refuse a bad image before loading the model
        _, h, w = image.shape
        image.close()
        if args.segment == "dapi":
            raise ValueError("--segment dapi needs a dataset folder as --he (its measured DAPI); use --segment he for an "
                             "H&E image file")
        if args.segment:
            cs.check_size(h, w, f"--he {he}")
        if min(h, w) < ri.PATCH_SIZE:
            log.warning("%s: the image (%d×%d px) is smaller than the model's %d-px patch: every window is mostly white "
                        "padding, so expect weak predictions", he, h, w, ri.PATCH_SIZE)
    for job in jobs:
        layout.check_tissue_id(job.tissue_id)
    if args.cell_mask:
        load_cell_mask(args.cell_mask)  # refuse a bad mask before loading the model

    todo, done = pending_jobs(jobs, args.out, options, need_cells=bool(args.segment))
    for job in done:
        print(f"{job.tissue_id}: already complete in {args.out} (same stride), skipped; --overwrite redoes it")
    if not todo:
        return 0

    predictor = ri.PatchPredictor.from_checkpoint(args.ckpt, official=True if args.official else None, device=args.device,
                                                  trust_checkpoint=args.trust_checkpoint, rescale=not args.no_rescale,
                                                  amp=args.precision != "fp32")
    if args.compile:
        configure_for_speed(predictor, "bf16" if predictor.amp else "fp32", channels_last=True, compile=True)
    model_mpp = predictor.meta.get("model_mpp")
    if model_mpp is None:
        log.info("%s states no H&E µm/px: the input resolution is not checked", args.ckpt)
    resample = {}
    for job in todo:  # every resolution is checked before anything is written
        name = f"--he {he}" + (f" tissue {job.tissue_id!r}" if job.source == "store" else "")
        mpp = source_mpp(args, he, job, model_mpp)
        resample[job.tissue_id] = (mpp, check_resolution(name, mpp, model_mpp, args))
        if resample[job.tissue_id][1] and (args.cell_mask or args.segment):
            raise ValueError(f"{name}: --resample with cell masks is not supported (the mask is at {mpp:g} µm/px); "
                             "resample the slide and its mask first")
    reference = ri.load_reference_hists(args.reference_hist, predictor)
    if reference is None:
        log.info("no training-set H&E histograms (--reference-hist or checkpoint): the W1 QC is skipped")
    channel_table = ri.store_channel_table(str(he)) if he.is_dir() else None

    def prepare_job(job: TissueJob) -> None:
        """One tissue's plan: its inputs gathered (and cells segmented) once, by global rank 0."""
        mpp, resampling = resample[job.tissue_id]
        if job.source == "store":
            image, _, tissue_mask, cell_mask, row = ri.store_tissue_inputs(str(he), job.tissue_id)
            source = {"kind": "store", "root": str(he.resolve()), "tissue_id": job.tissue_id}
            identity = {**source, "image": str(getattr(image, "path", ""))}
        else:
            image, _ = ri.open_he_image(he)
            tissue_mask, cell_mask, row = None, None, {"source": str(he.resolve())}
            source = {"kind": "file", "path": str(he.resolve())}
            stat = he.stat()
            identity = {**source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if args.cell_mask:
            cell_mask = load_cell_mask(args.cell_mask)
        segmentation = None
        if args.segment and cell_mask is None:
            cell_mask, segmentation = segment_tissue(image, mpp, args.segment, args.expand_um,
                                                     he if job.source == "store" else None, job.tissue_id)
        elif args.segment:
            log.info("%s: the dataset stores a cell mask; it is used instead of --segment", job.tissue_id)
        if resampling:
            source["resample"] = resampling
            image, tissue_mask = ri.resample_he(image, *resampling), None
            mpp = resampling[1]
        meta = {**ri.predictor_meta(predictor, args.mode), "source_mpp": resample[job.tissue_id][0]}
        try:
            ri.plan_tissue(image, predictor, args.out, job.tissue_id, mpp,
                           dataclasses.replace(options, overwrite=True), source=source, fresh=args.overwrite,
                           tissue_mask=tissue_mask, cell_mask=cell_mask, reference_hists=reference, tissue_row=row,
                           channel_table=channel_table, segmentation=segmentation, identity=identity, meta=meta)
        finally:
            if hasattr(image, "close"):
                image.close()

    def report(entry: dict) -> None:
        dr = [v for v in entry["dynamic_range"].values() if v is not None]
        print(f"{entry['tissue_id']}: output {entry['output_shape']} at {entry['output_mpp']:g} µm/px -> {args.out}/{entry['image']}"
              + (f"; median dynamic range {np.median(dr):.3g}" if dr else "")
              + (f"; W1 to training H&E {entry['w1_to_training_he']:.3g}" if entry["w1_to_training_he"] is not None else ""),
              flush=True)

    accelerator, devices = lightning_devices(args)
    datamodule = RosieTileDataModule(args.out, [job.tissue_id for job in todo],
                                     prepare=lambda: [prepare_job(job) for job in todo], num_workers=args.num_workers)
    writer = RosiePredictionWriter(args.out, on_tissue=report)
    strategy = args.strategy or ("ddp" if devices not in (1, "1") or args.num_nodes > 1 else "auto")
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
                        callbacks=[writer], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.no_progress, inference_mode=True)
    with torch.no_grad():  # scoped: a caller in the same process (a test, an experiment driver) keeps its autograd
        trainer.predict(ri.RosieTilePredictor(predictor, args.batch_size, args.mode), datamodule=datamodule,
                        return_predictions=False)
    return 0


def lightning_devices(args: argparse.Namespace) -> tuple[str, int | str | list[int]]:
    """``--accelerator/--devices`` as given, else one device from ``--device`` (auto | cpu | cuda | cuda:N)."""
    if args.devices is not None or args.accelerator is not None:
        return args.accelerator or "auto", parse_devices(args.devices if args.devices is not None else 1)
    device = ri.resolve_device(args.device)
    if device.type == "cuda":
        return "gpu", [device.index or 0]
    return "cpu", 1


if __name__ == "__main__":
    sys.exit(main())
