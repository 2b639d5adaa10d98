"""Cell segmentation accuracy and speed on the synthetic data, against the generator's own masks.

    python -m benchmarks.cell_segmentation [--data DIR] [--tissues 6 --size 512 --seed 0]
        [--source he dapi] [--expand-um 2.0]

Without ``--data`` the synthetic dataset is generated into a temporary folder
(``python -m experiments.data_synthetic --tissues 6 --size 512 --seed 0``, 0.5 µm/px). Each
tissue is segmented with the default settings of :mod:`analysis.cell_segmentation` from its H&E
(``he``: hematoxylin channel) and from the CODEX DAPI channel (``dapi``), and scored with
:func:`analysis.cell_segmentation.object_f1` (one-to-one matches at IoU ≥ 0.5):

* ``cells``: the segmented cells against the dataset's cell masks
  (``segmentations/0_5mpp/cell_masks/instances``);
* ``nuclei``: the segmented nuclei against the generator's nucleus labels. The dataset does not
  store them, so they are drawn again from the tissue's seed, exactly as the generator draws them
  (layout, then cells); the redrawn cell mask must equal the stored one, otherwise the row says
  ``n/a``.

``seconds`` is the wall time of segmenting one tissue (nuclei and cells) on this machine. The
last rows pool every tissue (matches, counts and seconds summed).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import cell_segmentation as cs
from datamodules.store import DatasetStore
from datamodules.synthetic import generate_dataset
from datamodules.synthetic.cell_shapes import paint_cells
from datamodules.synthetic.tissue import TISSUE_SEED_SALT
from datamodules.synthetic.tissue_layout import draw_latent, lay_out_tissue

MPP = 0.5
SYNTHETIC_ID = re.compile(r"^synth_s(\d+)_(\d+)$")


def generator_nuclei(tissue_id: str, size: int, stored_cells: np.ndarray) -> np.ndarray | None:
    """The generator's nucleus labels of a synthetic tissue, or None when they cannot be redrawn exactly."""
    match = SYNTHETIC_ID.match(tissue_id)
    if match is None:
        return None
    seed, index = int(match.group(1)), int(match.group(2))
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, TISSUE_SEED_SALT]))
    latent = draw_latent(rng)
    geometry, _ = paint_cells(rng, lay_out_tissue(rng, size, latent), latent)
    return geometry.nucleus if np.array_equal(geometry.cell, stored_cells) else None


def score_rows(tissue: str, source: str, seconds: float, pairs: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> list[dict]:
    """One table row per object kind."""
    rows = []
    for kind, (pred, true) in pairs.items():
        row = {"tissue": tissue, "source": source, "objects": kind, "seconds": seconds}
        if true is None:
            rows.append({**row, "n_true": None, "n_found": int(len(np.unique(pred)) - 1)})
            continue
        m = cs.object_f1(pred, true)
        rows.append({**row, "n_true": m.n_true, "n_found": m.n_pred, "n_matched": m.n_matched,
                     "precision": m.precision, "recall": m.recall, "f1": m.f1})
    return rows


def measure(data: Path, sources: list[str], expand_um: float) -> pd.DataFrame:
    """Segment every tissue of a synthetic dataset and score it against the generator's masks."""
    store = DatasetStore(str(data))
    tissues = store.tissues().set_index("tissue_id")
    rows: list[dict] = []
    for tid in store.tissue_ids():
        true_cells = store.cell_mask(tid, MPP)
        if true_cells is None:
            raise ValueError(f"{data}: tissue {tid!r} has no cell mask at {MPP} µm/px to score against")
        he = store.image("he", tid, MPP)
        true_nuclei = generator_nuclei(tid, he.shape[1], true_cells) if he.shape[1] == he.shape[2] else None
        label = f"{tid} ({tissues.loc[tid, 'architecture']})" if "architecture" in tissues.columns else tid
        for source in sources:
            if source == "he":
                rgb = np.moveaxis(he.read_all(), 0, -1)
                start = time.perf_counter()
                seg = cs.segment_cells_he(rgb, MPP, expand_um)
            else:
                codex = store.image("codex", tid, MPP)
                dapi = codex.read(0, 0, codex.shape[1], codex.shape[2], channels=[list(codex.channel_names).index("DAPI")])[0]
                start = time.perf_counter()
                seg = cs.segment_cells_dapi(dapi, MPP, expand_um)
            seconds = time.perf_counter() - start
            rows += score_rows(label, source, seconds, {"nuclei": (seg.nuclei, true_nuclei),
                                                        "cells": (seg.cells, true_cells.astype(np.int64))})
    table = pd.DataFrame(rows)
    pooled = []
    for (source, kind), group in table.groupby(["source", "objects"], sort=False):
        scored = group.dropna(subset=["n_true"])
        if len(scored) == 0:
            continue
        tp, n_true, n_found = scored["n_matched"].sum(), scored["n_true"].sum(), scored["n_found"].sum()
        pooled.append({"tissue": "all", "source": source, "objects": kind, "n_true": n_true, "n_found": n_found,
                       "n_matched": tp, "precision": tp / max(n_found, 1), "recall": tp / max(n_true, 1),
                       "f1": 2 * tp / max(n_true + n_found, 1), "seconds": scored["seconds"].sum()})
    return pd.concat([table, pd.DataFrame(pooled)], ignore_index=True)


def markdown(table: pd.DataFrame) -> str:
    """The table as the README quotes it."""
    def num(v: object, fmt: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

    lines = ["| tissue | source | objects | n true | n found | precision | recall | F1 | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        lines.append(f"| {r['tissue']} | {r['source']} | {r['objects']} | {num(r.get('n_true'), '.0f')} | "
                     f"{num(r.get('n_found'), '.0f')} | {num(r.get('precision'), '.3f')} | {num(r.get('recall'), '.3f')} | "
                     f"{num(r.get('f1'), '.3f')} | {num(r.get('seconds'), '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cell_segmentation", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="a synthetic dataset (default: generate one in a temp folder)")
    p.add_argument("--tissues", type=int, default=6, help="tissues to generate (without --data)")
    p.add_argument("--size", type=int, default=512, help="tissue side in px to generate (without --data)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (without --data)")
    p.add_argument("--source", nargs="+", choices=["he", "dapi"], default=["he", "dapi"], help="images to segment")
    p.add_argument("--expand-um", type=float, default=cs.DEFAULT_EXPAND_UM, help="nucleus-to-cell growth in µm")
    args = p.parse_args(argv)
    if args.data is not None:
        if not args.data.is_dir():
            p.error(f"--data {args.data}: no such dataset folder")
        table = measure(args.data, args.source, args.expand_um)
    else:
        with tempfile.TemporaryDirectory(prefix="virtuplex-seg-") as tmp:
            data = generate_dataset(Path(tmp) / "synthetic", n_tissues=args.tissues, size=args.size, seed=args.seed,
                                    progress=False)
            table = measure(data, args.source, args.expand_um)
    print(f"cell segmentation, default settings, expand {args.expand_um:g} µm, object F1 at IoU >= 0.5")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
