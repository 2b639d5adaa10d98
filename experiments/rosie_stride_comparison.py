"""Stride 8 against stride 1 output (ROSIE Supplementary Fig. 5): what the finer sliding window buys.

    python -m experiments.rosie_stride_comparison --ckpt model.ckpt --data DATASET --out OUT
        [--tissue-id ID | --split test] [--coarse 8] [--fine 1] [--markers CD45,PanCK,CD68]

The paper runs its analyses at stride 8 and shows stride-1 outputs only as images; this command
also measures the difference. For each marker, over the tissue's foreground:

* ``pearson_patch_*``: Pearson R against the measured CODEX averaged in 8×8-px patches (the paper's
  evaluation unit; the fine map is averaged into the same patches), so the two strides are scored
  on identical units;
* ``pearson_native_*``: Pearson R against the measured CODEX at native resolution (the coarse map
  repeated to native pixels, the fine one as is): the detail a stride-1 map adds;
* ``pearson_coarse_vs_fine``: agreement of the two predictions on 8×8 patches.

Writes ``stride_comparison.csv`` (per marker), ``summary.json`` (means) and
``stride_comparison.png`` (H&E, measured, stride 8, stride 1 for three markers). One tissue is
enough to see the effect and keeps the stride-1 run (64× the patches) to minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.outputs import json_default
from analysis.rosie_metrics import pearson_per_marker
from datamodules.command_line import run_command
from datamodules.store import DatasetStore
from experiments.rosie_predict import main as rosie_predict

PATCH = 8


def block_mean(image: np.ndarray, block: int) -> np.ndarray:
    """(C, H, W) -> (C, H // block, W // block) means (the remainder rows/columns are dropped)."""
    c, h, w = image.shape
    hb, wb = h // block, w // block
    return image[:, : hb * block, : wb * block].reshape(c, hb, block, wb, block).mean(axis=(2, 4))


def predict(ckpt: str, data: str, tissue: str, stride: int, out: Path) -> np.ndarray:
    code = rosie_predict(["--ckpt", ckpt, "--he", data, "--tissue-id", tissue, "--out", str(out), "--stride", str(stride),
                          "--no-progress", "--overwrite"])
    if code:
        raise ValueError(f"prediction at stride {stride} failed (exit {code}; its error is above)")
    store = DatasetStore(str(out))
    return np.asarray(store.image("codex", tissue, store.resolutions("codex")[0]).read_all(), dtype=np.float32)


def _flat(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return image.reshape(image.shape[0], -1)[:, keep.reshape(-1)].T


def compare(measured: np.ndarray, coarse: np.ndarray, fine: np.ndarray, fg: np.ndarray, coarse_stride: int) -> pd.DataFrame:
    """Per-marker Pearson table of the two strides (arrays: measured/fine (M, H, W), coarse (M, H/s, W/s))."""
    h, w = (measured.shape[1] // PATCH) * PATCH, (measured.shape[2] // PATCH) * PATCH
    coarse_native = np.repeat(np.repeat(coarse, coarse_stride, 1), coarse_stride, 2)[:, :h, :w]
    fine, measured, fg = fine[:, :h, :w], measured[:, :h, :w], fg[:h, :w]
    fg_patch = block_mean(fg[None].astype(np.float32), PATCH)[0] >= 0.5
    truth_p, coarse_p, fine_p = (block_mean(a, PATCH) for a in (measured, coarse_native, fine))
    return pd.DataFrame({
        "pearson_patch_coarse": pearson_per_marker(_flat(truth_p, fg_patch), _flat(coarse_p, fg_patch)),
        "pearson_patch_fine": pearson_per_marker(_flat(truth_p, fg_patch), _flat(fine_p, fg_patch)),
        "pearson_native_coarse": pearson_per_marker(_flat(measured, fg), _flat(coarse_native, fg)),
        "pearson_native_fine": pearson_per_marker(_flat(measured, fg), _flat(fine, fg)),
        "pearson_coarse_vs_fine": pearson_per_marker(_flat(coarse_p, fg_patch), _flat(fine_p, fg_patch)),
    })


def plot(he: np.ndarray, measured: np.ndarray, coarse: np.ndarray, fine: np.ndarray, idx: list[int], names: list[str],
         coarse_stride: int, path: Path) -> Path:
    import matplotlib  # lazy: only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(160, measured.shape[1], measured.shape[2])
    y0, x0 = (measured.shape[1] - size) // 2, (measured.shape[2] - size) // 2
    crop = (slice(y0, y0 + size), slice(x0, x0 + size))
    coarse_native = np.repeat(np.repeat(coarse, coarse_stride, 1), coarse_stride, 2)
    fig, axes = plt.subplots(len(idx), 4, figsize=(10, 2.6 * len(idx)), squeeze=False)
    for row, m in enumerate(idx):
        panels = [np.moveaxis(he[:, crop[0], crop[1]], 0, -1), measured[m][crop], coarse_native[m][crop], fine[m][crop]]
        for col, (img, title) in enumerate(zip(panels, ["H&E", "measured", f"stride {coarse_stride}", "stride 1"])):
            ax = axes[row, col]
            ax.imshow(img, cmap=None if col == 0 else "magma")
            ax.set_title(title if col == 0 else f"{names[m]}: {title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    store = DatasetStore(args.data)
    tissue = args.tissue_id or next(iter(store.tissue_ids(args.split)), None)
    if tissue is None:
        raise ValueError(f"{args.data}: no tissue in split {args.split!r}; give --tissue-id")
    if not 1 <= args.fine < args.coarse <= PATCH:
        raise ValueError(f"--fine {args.fine} / --coarse {args.coarse}: need 1 <= fine < coarse <= {PATCH}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coarse = predict(args.ckpt, args.data, tissue, args.coarse, out / "pred_coarse")
    fine = predict(args.ckpt, args.data, tissue, args.fine, out / "pred_fine")
    if args.fine != 1:
        fine = np.repeat(np.repeat(fine, args.fine, 1), args.fine, 2)
    names = [str(n) for n in DatasetStore(str(out / "pred_coarse")).channels("codex")["channel_name"]]
    truth_names = [str(n) for n in store.channels("codex")["channel_name"]]
    mpp = min(store.resolutions("codex"))
    truth = np.asarray(store.image("codex", tissue, mpp).read_all(), dtype=np.float32)[[truth_names.index(n) for n in names]]
    fg = store.tissue_mask(tissue, mpp)
    fg = np.ones(truth.shape[1:], bool) if fg is None else np.asarray(fg, bool)
    table = compare(truth, coarse, fine, fg, args.coarse)
    table.insert(0, "marker", names)
    table.to_csv(out / "stride_comparison.csv", index=False)
    summary = {"tissue": tissue, "coarse_stride": args.coarse, "fine_stride": args.fine,
               **{f"mean_{c}": float(np.nanmean(table[c])) for c in table.columns if c != "marker"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    wanted = [m for m in args.markers.split(",") if m in names] or names[:3]
    he = np.asarray(store.image("he", tissue, min(store.resolutions("he"))).read_all())
    plot(he, truth, coarse, fine, [names.index(m) for m in wanted], names, args.coarse, out / "stride_comparison.png")
    print(json.dumps(summary, indent=2, default=json_default))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rosie_stride_comparison", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", required=True, help="measured dataset (H&E + CODEX)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tissue-id", default=None, help="tissue to compare (default: the split's first)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--coarse", type=int, default=8)
    parser.add_argument("--fine", type=int, default=1)
    parser.add_argument("--markers", default="CD45,PanCK,CD68", help="markers shown in the figure")
    args = parser.parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
