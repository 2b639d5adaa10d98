"""ROSIE dense (shift-and-stitch) mode against exact mode: FLOPs per output pixel and agreement.

    python -m experiments.data_synthetic --out /tmp/synth --tissues 8 --size 512 --seed 0
    python -m benchmarks.rosie_dense --synthetic /tmp/synth [--ckpt model.ckpt] [--strides 8 4]
        [--flop-arch convnext_small] [--arch convnext_atto] [--windows 96] [--out dense_agreement.csv]

FLOPs (primary metric, machine-independent): :class:`torch.utils.flop_counter.FlopCounterMode` on
the meta device (shapes only, nothing computed), exact = one 128 px patch per output pixel, dense =
one region of a ``--tile``×``--tile`` output tile divided by its output pixels (the halo included).

Agreement: per marker, Pearson and max |dense − exact| over windows, exact computed on ``--windows``
random foreground windows per image (exact mode on every window would take hours on a CPU); dense
on the whole image through :func:`~lightning_modules.rosie_inference.dense.predict_tile_dense`
tile by tile, exactly as ``--mode dense`` runs it. Images: the synthetic held-out (val + test)
tissues and the real H&E patches of ``../shared/data/he_codex_lung_hex``. Models: random init as
timm builds it (layer scale 1e-6: the blocks are nearly off, so agreement is trivially high),
random init with layer scale 1 (blocks fully on: the pessimistic control) and ``--ckpt`` (a
trained ROSIE checkpoint) when given.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from datamodules.sampling import read_padded
from datamodules.store import DatasetStore
from lightning_modules.components.rosie_backbone import build_rosie_regressor
from lightning_modules.rosie_inference.dense import dense_network, predict_tile_dense
from lightning_modules.rosie_inference.geometry import foreground_grid, output_shape, patch_origin
from lightning_modules.rosie_inference.he_input import as_he_image
from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.tiles import DEFAULT_TILE, read_tile, tile_grid

SHARED_HE = Path(__file__).resolve().parents[2] / "shared" / "data" / "he_codex_lung_hex" / "he_patches"


def flops_per_output_pixel(arch: str, stride: int, tile: int, markers: int = 50) -> tuple[float, float]:
    """``(exact, dense)`` FLOPs per output pixel, counted on the meta device."""
    model = build_rosie_regressor(arch, markers).eval().to("meta")
    with FlopCounterMode(display=False) as fc:
        model(torch.empty(1, 3, 128, 128, device="meta"))
    exact = fc.get_total_flops()
    dense = dense_network(model).dense
    side = (tile - 1) * stride + 128
    with FlopCounterMode(display=False) as fc:
        dense(torch.empty(1, 3, side, side, device="meta"), stride)
    return float(exact), fc.get_total_flops() / tile**2


def dense_grid(image, predictor: PatchPredictor, stride: int, fg: np.ndarray, tile: int) -> np.ndarray:
    """``(M, Hout, Wout)`` dense-mode predictions, tile by tile as ``--mode dense`` runs them."""
    grid = np.zeros((predictor.num_markers,) + fg.shape, dtype=np.float32)
    for t in tile_grid(*fg.shape, tile):
        region, _ = read_tile(image, fg, t, stride, predictor.patch_size)
        if region is not None:
            grid[:, t[0] : t[1], t[2] : t[3]] = predict_tile_dense(region, fg[t[0] : t[1], t[2] : t[3]], predictor, stride, 64)[0]
    return grid


def exact_at(image, predictor: PatchPredictor, stride: int, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """``(K, M)`` exact-mode predictions of the windows of blocks ``(ii, jj)`` (white-padded like exact mode)."""
    P = predictor.patch_size
    patches = np.stack([read_padded(image, patch_origin(i, stride), patch_origin(j, stride), P, P, fill=255)
                        for i, j in zip(ii, jj)])
    return np.concatenate([predictor(torch.from_numpy(patches[b : b + 32])).cpu().numpy()
                           for b in range(0, len(patches), 32)])


def agreement(images: list, predictor: PatchPredictor, stride: int, windows: int, tile: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per marker ``(pearson, max_abs_diff)`` of dense against exact over sampled windows of every image."""
    rng = np.random.default_rng(seed)
    dense_vals, exact_vals = [], []
    for image, fg_method in images:
        fg = foreground_grid(image, stride, fg_method)
        if not fg.any():
            continue
        grid = dense_grid(image, predictor, stride, fg, tile)
        ii, jj = np.nonzero(fg)
        pick = rng.choice(len(ii), size=min(windows, len(ii)), replace=False)
        exact_vals.append(exact_at(image, predictor, stride, ii[pick], jj[pick]))
        dense_vals.append(grid[:, ii[pick], jj[pick]].T)
    d, e = np.concatenate(dense_vals), np.concatenate(exact_vals)
    dc, ec = d - d.mean(0), e - e.mean(0)
    pearson = (dc * ec).sum(0) / np.sqrt((dc**2).sum(0) * (ec**2).sum(0) + 1e-30)
    return pearson, np.abs(d - e).max(0)


def load_images(synthetic: Path | None) -> dict[str, list]:
    """``{set name: [(image, foreground method)]}``: synthetic held-out tissues, real H&E patches."""
    sets: dict[str, list] = {}
    if synthetic is not None:
        store = DatasetStore(synthetic)
        tissues = pd.read_parquet(synthetic / "metadata" / "tissues.parquet")
        held = tissues[tissues["split"].isin(["val", "test"])]["tissue_id"]
        sets["synthetic held-out"] = [(store.image("he", t), "otsu") for t in held]
    if SHARED_HE.is_dir():
        pngs = sorted(SHARED_HE.glob("*/*.png"))
        sets["real H&E (HEX lung)"] = [(as_he_image(np.asarray(Image.open(p).convert("RGB"))), "all") for p in pngs]
    return sets


def models(arch: str, ckpt: str | None, seed: int) -> dict[str, PatchPredictor]:
    names = [f"m{i}" for i in range(50)]
    out = {}
    for label, gamma in ((f"{arch} random init (timm layer scale 1e-6)", None), (f"{arch} random init, layer scale 1", 1.0)):
        torch.manual_seed(seed)
        model = build_rosie_regressor(arch, len(names)).eval()
        if gamma is not None:
            for mod in model.modules():
                if isinstance(getattr(mod, "gamma", None), torch.nn.Parameter):
                    mod.gamma.data.fill_(gamma)
        out[label] = PatchPredictor(model, names, device="cpu")
    if ckpt:
        out[f"trained checkpoint {ckpt}"] = PatchPredictor.from_checkpoint(ckpt, device="cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", type=Path, default=None, help="synthetic dataset (held-out = val + test tissues)")
    ap.add_argument("--ckpt", default=None, help="a trained ROSIE checkpoint to measure as well")
    ap.add_argument("--strides", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--flop-arch", nargs="+", default=["convnext_small", "convnext_atto"])
    ap.add_argument("--arch", default="convnext_atto", help="architecture of the random-init agreement models")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE, help="output tile side (as rosie_predict)")
    ap.add_argument("--windows", type=int, default=96, help="exact-mode windows sampled per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="per-marker CSV")
    ap.add_argument("--no-agreement", action="store_true", help="FLOPs only")
    args = ap.parse_args(argv)
    if args.synthetic is not None and not (args.synthetic / "metadata" / "tissues.parquet").is_file():
        print(f"error: {args.synthetic} is not a dataset (no metadata/tissues.parquet)", file=sys.stderr)
        return 2
    print("FLOPs per output pixel (FlopCounterMode, meta device; tile", args.tile, "output px, halo included)")
    for arch in args.flop_arch:
        for s in args.strides:
            exact, dense = flops_per_output_pixel(arch, s, args.tile)
            print(f"  {arch:15s} stride {s}: exact {exact / 1e9:8.3f} GFLOP  dense {dense / 1e9:7.4f} GFLOP  "
                  f"ratio {exact / dense:6.1f}x")
    if args.no_agreement:
        return 0
    torch.set_grad_enabled(False)
    sets = load_images(args.synthetic)
    rows = []
    print("Agreement, dense vs exact (per marker over sampled windows): Pearson min / median, max |diff|, "
          "max |diff| / exact std")
    for label, predictor in models(args.arch, args.ckpt, args.seed).items():
        for set_name, images in sets.items():
            for s in args.strides:
                start = time.perf_counter()
                r, diff = agreement(images, predictor, s, args.windows, args.tile, args.seed)
                print(f"  {label} | {set_name} | stride {s}: Pearson {np.nanmin(r):.4f} / {np.nanmedian(r):.4f}, "
                      f"max|diff| {diff.max():.4g} ({time.perf_counter() - start:.0f} s)")
                rows += [{"model": label, "images": set_name, "stride": s, "marker": m, "pearson": float(r[k]),
                          "max_abs_diff": float(diff[k])} for k, m in enumerate(predictor.marker_names)]
    if args.out is not None and rows:
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print("per-marker table:", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
