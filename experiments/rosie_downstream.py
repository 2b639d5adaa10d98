"""ROSIE's science after the prediction (paper Figs. 3-5, Supplementary Fig. 6), on a prediction folder
and its measured dataset.

    python -m experiments.rosie_downstream --pred PRED --truth TRUTH --out OUT [--evaluation EVAL]
        [--split test] [--label-column cell_type] [--cell-types types.yaml] [--parts phenotyping,scgp,...]

Parts (each also callable alone, ``--parts``):

* **phenotyping** (Fig. 3): reference labels from the measured cell expression (Leiden clusters
  annotated by marker profile, or the user's own ``cells.parquet`` labels), a k = 100 kNN on the top
  24 markers by the ROSIE evaluation's Pearson R, trained on a class-balanced sample of measured
  cells, labels ROSIE's and the morphology baseline's predicted cell expression; F1 per type with
  bootstrap CIs against the bulk baseline; confusion matrices; T-cell proportion per sample.
* **scgp** (Fig. 4): SCGP tissue structures on measured expression, ROSIE's predicted expression and
  the morphology baseline's features (morphometry + mean RGB, as in the paper), each partitioned
  jointly over the evaluated samples; predicted partitions mapped one-to-one onto measured ones; ARI
  per sample and F1 over the mapped labels.
* **neighbourhoods** (Fig. 5): Delaunay graph on cell centroids; LNE proportion and TIL count per
  sample from measured, ROSIE and morphology labels and structures; Pearson/Spearman R across samples.
* **qc** (Supplementary Fig. 6): mean Pearson R of all samples and of those passing the W1 and
  dynamic-range filters (needs ``--evaluation`` and the prediction folder's ``qc.csv``).

Cells come from the truth dataset's cell masks (else the masks ``rosie_predict --segment`` wrote);
the morphology baseline (a 3-layer MLP on per-cell morphometry + mean RGB) is trained on the truth
dataset's ``train`` cells and validated on its ``val`` cells. Without ``--evaluation`` the top-24
markers are ranked by the per-cell Pearson R of the evaluated cells (stated in ``downstream.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cell_graphs import delaunay_edges
from analysis.outputs import atomic_output_dir, check_output_folder, json_default
from analysis.rosie_baselines import MorphologyData, cell_morphology_predictions
from analysis.rosie_neighbourhoods import compare_neighbourhoods, neighbourhood_table, plot_neighbourhood_scatter
from analysis.rosie_phenotyping import load_type_markers, phenotype_cells, plot_confusion, plot_f1_bars
from analysis.rosie_qc import filter_table, per_sample_quality, plot_quality
from analysis.scgp import partition_scores, plot_partition_maps, scgp_partition
from datamodules import layout
from datamodules.command_line import run_command
from datamodules.rosie_cell_data import CELL_SOURCES, MODALITY, SampleCells, read_sample_cells
from datamodules.rosie_evaluation_data import match_panel
from datamodules.store import DatasetStore, StoreError
from experiments.rosie_downstream_report import PAPER, report_section

log = logging.getLogger("experiments.rosie_downstream")
COMMAND = "rosie_downstream"
PARTS = ("phenotyping", "scgp", "neighbourhoods", "qc")
METHODS = ("rosie", "cell_morphology")


@dataclass
class EvaluatedCells:
    """The evaluated samples' cells stacked: one row per cell."""

    sample_ids: np.ndarray
    cell_ids: np.ndarray
    xy_um: np.ndarray
    markers: list[str]  # canonical marker names, columns of the three matrices
    measured: np.ndarray
    rosie: np.ndarray
    morphology: np.ndarray  # the morphology baseline's predicted expression
    features: np.ndarray  # morphometry + mean RGB (the SCGP morphology baseline's input)
    labels: np.ndarray | None


def _with_indicator(features: np.ndarray) -> np.ndarray:
    """The morphology MLP's input: the 22 cell features and a 'cell present' indicator (always 1 here)."""
    return np.hstack([features, np.ones((len(features), 1))])


def read_cells(pred: DatasetStore, truth: DatasetStore, split: str, train_split: str = "train", val_split: str = "val",
               label_column: str | None = None, morphology_epochs: int = 50, seed: int = 0,
               cells: str = "stored") -> EvaluatedCells:
    """Measured, ROSIE and morphology-baseline expression of every cell of the evaluated tissues."""
    match = match_panel(pred.channels(MODALITY)["channel_name"].tolist(), truth.channels(MODALITY)["channel_name"].tolist())
    matched = match[match["status"] == "matched"]
    if matched.empty:
        raise StoreError(f"no predicted marker of {pred.url} matches a measured {MODALITY} channel of {truth.url}")
    markers, pnames, tnames = (matched[c].tolist() for c in ("marker", "predicted_channel", "measured_channel"))
    predicted_ids = {t for r in pred.resolutions(MODALITY) for t in pred.image_ids(MODALITY, r)}
    ids = [t for t in truth.tissue_ids(split) if t in predicted_ids]
    if not ids:
        raise StoreError(f"{pred.url}: no predicted tissue of split {split!r} of {truth.url}; predict them first")
    samples = [s for t in ids
               if (s := read_sample_cells(truth, t, tnames, pred, pnames, label_column=label_column, cells=cells))]
    if not samples:
        raise StoreError(f"{truth.url}: none of the {len(ids)} evaluated tissues has a cell mask; segment them "
                         "(rosie_predict --segment) or ingest cell masks")
    morphology = _morphology_predictions(truth, tnames, samples, train_split, val_split, morphology_epochs, seed, cells)
    stack = np.concatenate
    return EvaluatedCells(
        sample_ids=stack([np.full(s.n_cells, s.tissue_id, dtype=object) for s in samples]),
        cell_ids=stack([s.cell_ids for s in samples]), xy_um=stack([s.xy_um for s in samples]), markers=markers,
        measured=stack([s.measured for s in samples]), rosie=stack([s.predicted for s in samples]),
        morphology=stack([morphology[s.tissue_id] for s in samples]), features=stack([s.features for s in samples]),
        labels=stack([s.labels for s in samples]) if label_column else None)


def _morphology_predictions(truth: DatasetStore, channels: list[str], evaluated: list[SampleCells], train_split: str,
                            val_split: str, epochs: int, seed: int, cells: str) -> dict[str, np.ndarray]:
    """The paper's cell-morphology baseline at the cell level: MLP from morphometry + mean RGB to expression."""
    def gather(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        found = [c for t in truth.tissue_ids(split) if (c := read_sample_cells(truth, t, channels, cells=cells)) is not None]
        if not found:
            return None
        y = np.concatenate([c.measured for c in found])
        return _with_indicator(np.concatenate([c.features for c in found])), y, np.ones(y.shape, bool)

    train = gather(train_split)
    if train is None:
        raise StoreError(f"{truth.url}: no {train_split!r} tissue with a cell mask to train the morphology baseline on")
    data = MorphologyData(train, gather(val_split), {s.tissue_id: _with_indicator(s.features) for s in evaluated},
                          len(truth.tissue_ids(train_split)))
    return cell_morphology_predictions(data, epochs=epochs, seed=seed)


def pearson_table(cells: EvaluatedCells, evaluation: str | None) -> tuple[pd.DataFrame, str]:
    """Per-marker Pearson R of ROSIE: the evaluation's table when given, else over the evaluated cells."""
    if evaluation is not None:
        path = Path(evaluation) / "per_marker.csv"
        if not path.is_file():
            raise FileNotFoundError(f"--evaluation {evaluation}: no per_marker.csv (the output of rosie_evaluate)")
        table = pd.read_csv(path)
        return table[table["method"] == "rosie"][["marker", "pearson_r"]], f"{path} (patch level)"
    r = [np.corrcoef(cells.measured[:, j], cells.rosie[:, j])[0, 1] if cells.measured[:, j].std() > 0 else np.nan
         for j in range(len(cells.markers))]
    return pd.DataFrame({"marker": cells.markers, "pearson_r": r}), "per-cell Pearson R of the evaluated cells"


def run(pred: str | Path, truth: str | Path, out: str | Path, *, split: str = "test", evaluation: str | None = None,
        parts: Sequence[str] = PARTS, label_column: str | None = None, cell_types: str | None = None,
        morphology_epochs: int = 50, scgp_resolution: float | None = None, dynamic_range_threshold: float | None = None,
        n_boot: int = 1000, knn_k: int = 100, cells_from: str = "stored", seed: int = 0, overwrite: bool = False,
        figures: bool = True) -> dict:
    """Run the asked parts; write tables, figures, ``downstream.json`` and ``downstream.md`` to ``out``."""
    t0 = time.perf_counter()
    check_output_folder(out, COMMAND, overwrite)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    pred_store, truth_store = DatasetStore(str(pred)), DatasetStore(str(truth))
    split = layout.normalise_split(split)
    results: dict = {"settings": {"pred": str(pred), "truth": str(truth), "split": split, "parts": list(parts),
                                  "seed": seed, "morphology_epochs": morphology_epochs, "knn_k": knn_k,
                                  "cells": cells_from}}
    tables: dict[str, pd.DataFrame] = {}
    figs: dict[str, Callable[[Path], object]] = {}  # file name -> draws it at a path
    cells = read_cells(pred_store, truth_store, split, label_column=label_column, morphology_epochs=morphology_epochs,
                       seed=seed, cells=cells_from) if {"phenotyping", "scgp", "neighbourhoods"} & set(parts) else None
    labels: dict[str, np.ndarray] = {}
    partitions: dict[str, np.ndarray] = {}
    if cells is not None:
        results["settings"].update(n_samples=int(len(set(cells.sample_ids))), n_cells=int(len(cells.cell_ids)),
                                   markers=cells.markers)
    if "phenotyping" in parts:
        table, source = pearson_table(cells, evaluation)
        types = load_type_markers(cell_types) if cell_types else None
        kwargs = {"type_markers": types} if types else {}
        pheno = phenotype_cells(cells.measured, cells.markers, {"rosie": cells.rosie, "cell_morphology": cells.morphology},
                                table, cells.sample_ids, labels=cells.labels, k=knn_k, n_boot=n_boot, seed=seed, **kwargs)
        labels = {"measured": pheno.reference, **pheno.predicted}
        tables["phenotyping_f1"] = pheno.scores
        tables["t_cell_proportions"] = pheno.t_cell_proportions
        for method, (counts, normalised) in pheno.confusion.items():
            tables[f"confusion_{method}"] = counts
            figs[f"confusion_{method}.png"] = partial(plot_confusion, normalised,
                                                      title=f"Confusion: {method} vs measured (row-normalised)")
        if pheno.cluster_table is not None:
            tables["reference_clusters"] = pheno.cluster_table
        figs["phenotyping_f1.png"] = partial(plot_f1_bars, pheno.scores, title="Cell phenotyping F1 (bootstrap 95% CI)")
        results["phenotyping"] = {"knn_markers": pheno.markers, "top_markers_from": source,
                                  "reference": "user labels" if cells.labels is not None else "Leiden + marker annotation"}
    if "scgp" in parts or "neighbourhoods" in parts:
        inputs = {"measured": cells.measured, "rosie": cells.rosie, "cell_morphology": cells.features}
        partitions = {name: scgp_partition(cells.xy_um, x, cells.sample_ids, resolution=scgp_resolution, seed=seed)
                      for name, x in inputs.items()}
        scores = [partition_scores(partitions[m], partitions["measured"], cells.sample_ids, n_boot=n_boot, seed=seed)[0]
                  .assign(method=m) for m in METHODS]
        tables["scgp_scores"] = pd.concat(scores, ignore_index=True)
        tables["scgp_partitions"] = pd.DataFrame({"tissue_id": cells.sample_ids, "cell_id": cells.cell_ids,
                                                  "x_um": cells.xy_um[:, 0], "y_um": cells.xy_um[:, 1], **partitions})
        first = cells.sample_ids == cells.sample_ids[0]
        figs["scgp_maps.png"] = partial(plot_partition_maps, cells.xy_um[first], {k: v[first] for k, v in partitions.items()},
                                        title=f"SCGP structures, {cells.sample_ids[0]}")
    if "neighbourhoods" in parts:
        if not labels:
            raise ValueError("--parts neighbourhoods needs phenotyping (cell labels) in the same run")
        edges = delaunay_edges(cells.xy_um, cells.sample_ids)
        hoods = {m: neighbourhood_table(labels[m], edges, cells.sample_ids, partitions[m])
                 for m in ("measured", *METHODS)}
        tables["neighbourhoods"] = pd.concat([t.assign(method=m) for m, t in hoods.items()], ignore_index=True)
        tables["neighbourhood_correlations"] = pd.concat(
            [compare_neighbourhoods(hoods["measured"], hoods[m]).assign(method=m) for m in METHODS], ignore_index=True)
        figs["neighbourhoods_rosie.png"] = partial(plot_neighbourhood_scatter, hoods["measured"], hoods["rosie"])
    if "qc" in parts:
        qc_path = Path(str(pred)) / "qc.csv"
        if evaluation is None or not qc_path.is_file():
            raise ValueError("--parts qc needs --evaluation (rosie_evaluate output) and the prediction folder's qc.csv")
        samples = per_sample_quality(pd.read_csv(Path(evaluation) / "per_sample_marker.csv"), pd.read_csv(qc_path),
                                     dynamic_range_threshold=dynamic_range_threshold)
        tables["qc_samples"], tables["qc_filters"] = samples, filter_table(samples)
        figs["qc_filters.png"] = partial(plot_quality, samples)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["paper"] = PAPER
    _write(out, overwrite, tables, figs if figures else {}, results)
    return {"tables": tables, **results}


def _write(out: str | Path, overwrite: bool, tables: dict[str, pd.DataFrame], figs: dict[str, Callable[[Path], object]],
           results: dict) -> None:
    with atomic_output_dir(out, overwrite, command=COMMAND) as tmp:
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=name.startswith("confusion_"))
        written = []
        for name, draw in figs.items():
            draw(path=tmp / name)
            written.append(name)
        results["figures"] = written
        (tmp / "downstream.json").write_text(json.dumps(results, indent=2, default=json_default))
        (tmp / "downstream.md").write_text("\n".join(report_section(tables, results, figure_dir=".")) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.rosie_downstream", description=__doc__.split("\n")[0])
    p.add_argument("--pred", required=True, help="prediction folder (output of rosie_predict)")
    p.add_argument("--truth", required=True, help="the measured dataset (CODEX, cell masks, train/val/test splits)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--evaluation", default=None, help="rosie_evaluate output: per-marker Pearson for the top-24 markers, QC")
    p.add_argument("--split", default="test", help="evaluated split of the truth dataset")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--label-column", default=None, help="use this cells.parquet column as reference labels "
                   "(default: Leiden clusters of the measured expression, annotated by marker profile)")
    p.add_argument("--cell-types", default=None, help="YAML/CSV marker -> cell type table (default: the paper's 7 types)")
    p.add_argument("--cells", choices=CELL_SOURCES, default="stored",
                   help="cells from the stored masks, or segmented here from the measured DAPI (the paper) or the H&E")
    p.add_argument("--morphology-epochs", type=int, default=50, help="epochs of the morphology MLP (paper: 50)")
    p.add_argument("--scgp-resolution", type=float, default=None, help="SCGP CPM resolution (default: scaled to the cell count)")
    p.add_argument("--dynamic-range-threshold", type=float, default=None,
                   help="exclude (sample, marker) pairs whose predicted dynamic range is below this (paper: a threshold)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--knn-k", type=int, default=100, help="neighbours of the phenotyping kNN (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    return p


def check_arguments(args: argparse.Namespace) -> list[str]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.morphology_epochs < 1:
        raise ValueError(f"--morphology-epochs {args.morphology_epochs}: must be >= 1")
    if args.knn_k < 1:
        raise ValueError(f"--knn-k {args.knn_k}: must be >= 1 (the paper uses 100)")
    if args.bootstrap < 10:
        raise ValueError(f"--bootstrap {args.bootstrap}: use at least 10 resamples (1,000 for reported CIs)")
    if args.scgp_resolution is not None and not args.scgp_resolution > 0:
        raise ValueError(f"--scgp-resolution {args.scgp_resolution}: must be positive")
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        parts = check_arguments(args)
        result = run(args.pred, args.truth, args.out, split=args.split, evaluation=args.evaluation, parts=parts,
                     label_column=args.label_column, cell_types=args.cell_types, morphology_epochs=args.morphology_epochs,
                     scgp_resolution=args.scgp_resolution, dynamic_range_threshold=args.dynamic_range_threshold,
                     n_boot=args.bootstrap, knn_k=args.knn_k, cells_from=args.cells, seed=args.seed, overwrite=args.overwrite, figures=not args.no_figures)
        print("\n".join(report_section(result["tables"], result, figure_dir=None)))
        print(f"wrote {args.out} in {result['seconds']} s")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
