"""ROSIE inference speed: patches/s of the model, and what the sliding window adds on top.

    python -m benchmarks.rosie_inference [--archs convnext_atto convnext_small] [--device auto]
        [--batch-size 64] [--batches N]

For each architecture (random weights; speed does not depend on them), on the same number of
patches (``batches × batch size``, all foreground, stride 8):

* ``forward``: the bare model on pre-built, pre-normalised patches already on the device;
* ``predict``: the full :func:`lightning_modules.rosie_inference.predict_image` path (reading the
  H&E region, cutting patches on the device, uint8->float normalisation, the same model,
  stitching the output grid);
* ``window only``: the same path with a model that returns zeros, i.e. the cost of patch
  extraction + normalisation + stitching by itself.

The overhead is reported two ways: ``(predict − forward) / forward`` and ``window only / forward``
(the second is less noisy on a busy machine). Target: < 10 %. CPU runs use few batches so the
whole benchmark stays under ~2 minutes; on CUDA the model runs in bf16 autocast, channels-last.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch import nn

from datamodules.markers import ROSIE_PANEL
from lightning_modules import rosie_inference as ri
from lightning_modules.components.rosie_backbone import build_rosie_regressor


class _Zeros(nn.Module):
    def __init__(self, m: int):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.m)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _image(n_rows: int, n_cols: int, stride: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 230, size=(n_rows * stride // 4 + 1, n_cols * stride // 4 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(4, 0).repeat(4, 1)[: n_rows * stride, : n_cols * stride])


def bench_arch(arch: str, device: torch.device, batch_size: int, batches: int, stride: int = 8) -> dict:
    markers = list(ROSIE_PANEL)
    model = build_rosie_regressor(arch, len(markers))
    predictor = ri.PatchPredictor(model, markers, device=device)
    img = _image(batches, batch_size, stride)  # the output grid is batches × batch_size blocks
    n = batches * batch_size

    # pre-built patches, exactly those the sliding window will cut (white-padded at the border)
    pad = np.pad(img, ((ri.PATCH_SIZE, ri.PATCH_SIZE), (ri.PATCH_SIZE, ri.PATCH_SIZE), (0, 0)), constant_values=255)
    tops = [ri.patch_origin(i, stride) + ri.PATCH_SIZE for i in range(batches)]
    lefts = [ri.patch_origin(j, stride) + ri.PATCH_SIZE for j in range(batch_size)]
    patches = np.stack([pad[t : t + ri.PATCH_SIZE, lf : lf + ri.PATCH_SIZE] for t in tops for lf in lefts])
    x = predictor.prepare(torch.from_numpy(patches).permute(0, 3, 1, 2).to(device))

    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=predictor.amp):
        predictor.model(x[:batch_size])  # warm-up at the timed shape: kernels, allocator
        _sync(device)
        start = time.perf_counter()
        for b in range(0, n, batch_size):
            predictor.model(x[b : b + batch_size])
        _sync(device)
        forward_s = time.perf_counter() - start

    ri.predict_image(img[:stride], predictor, stride=stride, foreground="all", batch_size=batch_size)  # warm-up
    _sync(device)
    start = time.perf_counter()
    pred = ri.predict_image(img, predictor, stride=stride, foreground="all", batch_size=batch_size)
    _sync(device)
    predict_s = time.perf_counter() - start
    assert pred.stats.n_patches == n

    zeros = ri.PatchPredictor(_Zeros(len(markers)), markers, device=device)
    ri.predict_image(img[:stride], zeros, stride=stride, foreground="all", batch_size=batch_size)
    _sync(device)
    start = time.perf_counter()
    ri.predict_image(img, zeros, stride=stride, foreground="all", batch_size=batch_size)
    _sync(device)
    window_s = time.perf_counter() - start
    return {
        "arch": arch, "device": str(device), "batch": batch_size, "patches": n,
        "forward_patches_per_s": n / forward_s, "predict_patches_per_s": n / predict_s,
        "overhead_pct": 100 * (predict_s - forward_s) / forward_s, "window_only_pct": 100 * window_s / forward_s,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["convnext_atto", "convnext_small"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, help="batches per arch (default: 20 on CUDA; 3 atto / 1 small on CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    device = ri.resolve_device(args.device)
    rows = []
    for arch in args.archs:
        batches = args.batches or (20 if device.type == "cuda" else (1 if "small" in arch or "base" in arch else 3))
        rows.append(bench_arch(arch, device, args.batch_size, batches))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ROSIE inference, stride 8, 128 px patches, all foreground ({name})")
    print(f"{'arch':<16}{'device':<8}{'batch':>6}{'patches':>9}{'forward p/s':>13}{'predict p/s':>13}"
          f"{'overhead':>10}{'window only':>13}")
    for r in rows:
        print(f"{r['arch']:<16}{r['device']:<8}{r['batch']:>6}{r['patches']:>9}{r['forward_patches_per_s']:>13.1f}"
              f"{r['predict_patches_per_s']:>13.1f}{r['overhead_pct']:>9.1f}%{r['window_only_pct']:>12.1f}%")
    return rows


if __name__ == "__main__":
    main()
