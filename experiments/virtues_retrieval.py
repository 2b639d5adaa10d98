"""Tissue retrieval with VirTues niche tokens and optimal transport (paper Fig. 4g–k).

    python -m experiments.virtues_retrieval --ckpt C --data DIR --out OUT [--split all] [--grid 4]
        [--labels COL ...] [--cell-type-column cell_type] [--pixels-per-tissue 4096] [--overwrite]

Every tissue of ``--split`` whose image holds the central ``grid × grid`` grid of 128-px crops (paper:
4 × 4; smaller images are left out and listed) is embedded as the set of its crops' niche tokens
(mean patch-summary token of the unmasked encoder pass, preprocessing as in training). Tissues are
ranked for each query by the exact 2-Wasserstein distance between token sets, never returning the
query's own patient. Scores (definitions in :mod:`analysis.virtues_retrieval`): precision of the
top-3 matches for each clinical label column against random retrieval with a McNemar test; L1
distance of cell-type proportions and sliced W2 distance of pixel sets between each query and its
closest match, against random matches.

Outputs (atomically, in ``OUT``): ``labels.csv``, ``composition.csv``, ``matches.csv`` (top-3 per
query with distances), ``distances.csv``, ``retrieval.png`` (distance matrix ordered by the first
label) and ``excluded.csv``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import track

from analysis.outputs import atomic_output_dir
from analysis.virtues_retrieval import (
    TOP_K,
    allowed_matches,
    central_grid_corners,
    composition_l1,
    distance_matrix,
    label_retrieval_table,
    molecular_distance,
    rank_matches,
)
from analysis.virtues_tokens import niche_token
from datamodules.preprocess import MultiplexPreprocessor
from datamodules.statistics import require_statistics
from experiments.commands import open_modality, refuse_existing_output, run_command
from experiments.virtues_tokens import model_for_tokens
from lightning_modules.virtues_tokens import CropEncoder, read_zero_padded

log = logging.getLogger("experiments.virtues_retrieval")

ID_COLUMNS = {"tissue_id", "patient_id", "split", "dataset"}

COMMAND = "virtues_retrieval"


def default_label_columns(tissues: pd.DataFrame, max_classes: int = 20, max_integer_classes: int = 5) -> list[str]:
    """Categorical tissue-table columns: text/categorical/bool with 2..max_classes values, or integers
    with at most ``max_integer_classes`` values (a grade, not a count); ids, the split and columns
    whose every value is distinct excluded."""
    out = []
    for column in tissues.columns:
        values = tissues[column]
        if column in ID_COLUMNS or pd.api.types.is_float_dtype(values):
            continue
        n = values.nunique(dropna=True)
        limit = max_integer_classes if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values) \
            else max_classes
        if 2 <= n <= limit and n < len(values):  # a value must repeat, or no match can ever share it
            out.append(column)
    return out


def embed_tissues(store, ids: Sequence[str], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Niche-token sets and pixel samples of the central crop grid of each tissue that has one."""
    model, channels, marker_rows, device = model_for_tokens(store, args)
    encoder = CropEncoder(model, torch.tensor(marker_rows), device, chunk_size=args.batch_size)
    stats = require_statistics(store, args.modality, args.mpp)
    names = [str(n) for n in store.channels(args.modality)["channel_name"].iloc[channels]]
    rng = np.random.default_rng(args.seed)
    kept, sets, pixels, excluded = [], [], [], []

    for tid in track(ids, description="niche tokens", disable=args.no_progress):
        image = store.image(args.modality, tid, args.mpp)
        corners = central_grid_corners(image.shape[1], image.shape[2], args.grid)
        if corners is None:
            excluded.append({"tissue_id": tid, "reason": f"image {image.shape[1]}x{image.shape[2]} px is smaller than "
                                                          f"the central {args.grid}x{args.grid} grid of 128-px crops"})
            continue
        preprocess = MultiplexPreprocessor.from_stats(stats, tid, names, blur=args.blur)
        crops = [torch.from_numpy(preprocess(read_zero_padded(image, int(y), int(x), 128, channels))) for y, x in corners]
        grids = encoder(crops)
        sets.append(torch.stack([niche_token(g) for g in grids]).numpy())
        flat = torch.cat([c.reshape(c.shape[0], -1) for c in crops], dim=1).T.numpy()  # (pixels, channels)
        pixels.append(flat[rng.choice(len(flat), min(args.pixels_per_tissue, len(flat)), replace=False)])
        kept.append(tid)
    return kept, sets, pixels, pd.DataFrame(excluded, columns=["tissue_id", "reason"])


def plot_distances(distances: np.ndarray, ids: Sequence[str], labels: pd.Series | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(labels.astype(str).to_numpy(), kind="stable") if labels is not None else np.arange(len(ids))
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(distances[np.ix_(order, order)], cmap="viridis")
    tick = [f"{ids[i]} ({labels.iloc[i]})" if labels is not None else ids[i] for i in order]
    ax.set_xticks(range(len(ids)), tick, rotation=90, fontsize=5)
    ax.set_yticks(range(len(ids)), tick, fontsize=5)
    ax.set_title("W2 between niche-token sets" + (f", ordered by {labels.name}" if labels is not None else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, pd.DataFrame]:

    store, args.mpp = open_modality(args.data, args.modality, args.mpp)
    ids = store.tissue_ids(None if args.split == "all" else args.split)
    refuse_existing_output(args.out, args.overwrite, COMMAND)
    kept, sets, pixels, excluded = embed_tissues(store, ids, args)
    if len(kept) < 3:
        raise ValueError(f"only {len(kept)} tissue(s) hold the central {args.grid}x{args.grid} grid: retrieval needs at "
                         "least 3 (use a smaller --grid for small images)")
    tissues = store.tissues().set_index("tissue_id").loc[kept].reset_index()
    patients = tissues["patient_id"].astype(str) if "patient_id" in tissues else tissues["tissue_id"]
    label_columns = args.labels or default_label_columns(tissues)
    missing = [c for c in label_columns if c not in tissues]
    if missing:
        raise ValueError(f"label column(s) {missing} not in the tissue table (columns: {list(tissues.columns)})")

    distances = distance_matrix(sets)
    allowed = allowed_matches(patients)
    ranking = rank_matches(distances, allowed)
    labels = label_retrieval_table(ranking, allowed, tissues[label_columns], seed=args.seed)
    rows = []
    cells = store.cells()
    if cells is not None and args.cell_type_column in cells:
        mine = cells[cells["tissue_id"].astype(str).isin(kept)]
        props = pd.crosstab(mine["tissue_id"].astype(str), mine[args.cell_type_column], normalize="index").reindex(kept).fillna(0)
        top, rand = composition_l1(props.to_numpy(), ranking, allowed)
        rows.append({"metric": f"cell-type composition L1 ({args.cell_type_column})", "closest_match": top, "random_match": rand})
    top, rand = molecular_distance(pixels, ranking, allowed, seed=args.seed)
    rows.append({"metric": "molecular composition sliced W2 (preprocessed pixels)", "closest_match": top, "random_match": rand})
    composition = pd.DataFrame(rows)
    matches = pd.DataFrame([{"query": kept[i], "rank": r + 1, "match": kept[j], "w2": distances[i, j],
                             **{f"same_{c}": str(tissues.loc[i, c]) == str(tissues.loc[j, c]) for c in label_columns}}
                            for i, order in enumerate(ranking) for r, j in enumerate(order[:TOP_K])])
    with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
        labels.to_csv(tmp / "labels.csv", index=False)
        composition.to_csv(tmp / "composition.csv", index=False)
        matches.to_csv(tmp / "matches.csv", index=False)
        pd.DataFrame(distances, index=kept, columns=kept).to_csv(tmp / "distances.csv")
        excluded.to_csv(tmp / "excluded.csv", index=False)
        plot_distances(distances, kept, tissues[label_columns[0]] if label_columns else None, tmp / "retrieval.png")
    return {"labels": labels, "composition": composition}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.virtues_retrieval", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="VirTuesModule checkpoint, or official model.safetensors (+ --config)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of a .ckpt that needs it (runs code from the file: only files you made)")
    p.add_argument("--config", default=None)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="all", help="tissues forming the database and the queries ('all' or a split)")
    p.add_argument("--modality", default="imc")
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--grid", type=int, default=4, help="central grid of 128-px crops per tissue (paper: 4)")
    p.add_argument("--labels", nargs="*", default=None, help="tissue-table columns to score (default: categorical ones)")
    p.add_argument("--cell-type-column", default="cell_type", help="cells-table column for the composition score")
    p.add_argument("--pixels-per-tissue", type=int, default=4096, help="pixels sampled per tissue for the sliced W2")
    p.add_argument("--batch-size", type=int, default=32)
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
        if args.grid < 1 or args.pixels_per_tissue < 1:
            raise ValueError("--grid and --pixels-per-tissue must be positive")
        result = run(args)
        print(result["labels"].to_string(index=False))
        print(result["composition"].to_string(index=False))

    return run_command(body)

if __name__ == "__main__":
    sys.exit(main())
