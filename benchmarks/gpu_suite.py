"""One GPU benchmark: ROSIE exact and dense throughput, VirTues pretraining step, peak memory.

    python -m benchmarks.gpu_suite [--quick] [--no-compile] [--out DIR]     (also: make bench-gpu)

On a CUDA machine it prints the device, torch version and settings, then:

* ROSIE model throughput (convnext_small, random weights: speed does not depend on them), exact
  mode at 128 px (native) and 224 px (official semantics: 128 px patches resized to 224 +
  ImageNet normalisation inside the network), fp32 and bf16 autocast, eager and ``torch.compile``:
  patches/s and model FLOP utilisation (FLOPs from FlopCounterMode / peak of the card);
* ROSIE end to end on a synthetic slide (PNG written, read, predicted, Zarr written) through
  ``experiments.rosie_predict`` with ``--mode exact`` and ``--mode dense`` at stride 8: patches/s
  (output pixels/s) including reading and writing;
* VirTues pretraining step at the released size (``VirTuesArch()`` defaults, batch 16, 40 markers,
  128 px crops, MAE masks) for each attention backend this machine can run: step time, tokens/s,
  FLOP utilisation;
* peak GPU memory of every line.

Targets (issue 13): exact 224 px bf16 >= 8,000 patches/s end to end on one H100; dense >= 5x exact's
end-to-end throughput at stride 8. Without a GPU it says so and exits 0 (``--smoke`` runs every
path on the CPU with tiny sizes to check the code, numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from datamodules.markers import ROSIE_PANEL
from experiments import rosie_predict
from lightning_modules.components.rosie_backbone import OFFICIAL_PREPROCESS, RosieInputAdapter, RosieRegressor, build_rosie_regressor
from lightning_modules.components.virtues import VirTues, VirTuesArch
from lightning_modules.components.virtues.attention import flash_available, torch_varlen_available
from lightning_modules.components.virtues.masking import independent_masks_for_batch
from lightning_modules.rosie import RosieModule
from lightning_modules.rosie_inference.predictor import PatchPredictor
from lightning_modules.rosie_inference.speed import configure_for_speed

#: Dense peak FLOP/s by card (bf16 tensor cores, fp32 without TF32) for the utilisation column.
PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12)}


def peak_flops(device: torch.device, precision: str) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAKS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call after one warm-up call (compilation, allocator)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def peak_memory_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return f"{gib:.1f} GiB"


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def rosie_model(arch: str, official: bool) -> torch.nn.Module:
    model = build_rosie_regressor(arch, len(ROSIE_PANEL))
    if official:
        pp = OFFICIAL_PREPROCESS
        return RosieRegressor(model, RosieInputAdapter(pp["resize_to"], pp["mean"], pp["std"]))
    return model


def bench_rosie_model(arch: str, device: torch.device, batch: int, repeats: int, compiles: list[bool]) -> None:
    print(f"\nROSIE model throughput ({arch}, batch {batch}, uint8 patches on the device -> predictions)")
    for size, official in ((128, False), (224, True)):
        for precision in ("fp32", "bf16"):
            for compiled in compiles:
                predictor = PatchPredictor(rosie_model(arch, official), list(ROSIE_PANEL),
                                           "unit" if official else "imagenet", device=device)
                configure_for_speed(predictor, precision, channels_last=True, compile=compiled)
                patches = torch.randint(0, 256, (batch, 3, 128, 128), dtype=torch.uint8, device=device)
                with torch.inference_mode():
                    flops = count_flops(lambda: predictor(patches[:1])) * batch
                    sec = timed(lambda: predictor(patches), device, repeats)
                mfu = flops / sec / peak_flops(device, precision)
                label = f"{size} px {'official resize' if official else 'native'}"
                print(f"  {label:24s} {precision} {'compiled' if compiled else 'eager   '}: {batch / sec:9.0f} patches/s"
                      f"  MFU {mfu:6.1%}  peak {peak_memory_gib(device)}")


def write_checkpoints(folder: Path, arch: str) -> dict[str, list[str]]:
    """A random project checkpoint and a random official-layout one: ``{label: rosie_predict args}``."""
    torch.manual_seed(0)
    module = RosieModule(arch=arch, num_markers=len(ROSIE_PANEL), marker_names=list(ROSIE_PANEL))
    lightning_ckpt = folder / "rosie.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams), "hparams_name": "kwargs"}, lightning_ckpt)
    import torchvision  # only the official layout needs it: the authors' file is a torchvision ConvNeXt

    official = getattr(torchvision.models, "convnext_small")(weights=None, num_classes=len(ROSIE_PANEL))
    official_ckpt = folder / "official.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, official_ckpt)
    return {"128 px native": ["--ckpt", str(lightning_ckpt)],
            "224 px official": ["--ckpt", str(official_ckpt), "--official"]}


def bench_end_to_end(arch: str, device: torch.device, side: int, batch: int) -> None:
    """rosie_predict on a synthetic PNG slide, reading and writing included."""
    print(f"\nROSIE end to end (experiments.rosie_predict, {side}×{side} px synthetic slide, stride 8, "
          f"foreground all, batch {batch}, predictor defaults: bf16 autocast on CUDA, channels-last, eager)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        small = rng.integers(60, 230, size=(side // 8, side // 8, 3), dtype=np.uint8)
        Image.fromarray(small.repeat(8, 0).repeat(8, 1)).save(folder / "slide.png")
        n = math.ceil(side / 8) ** 2
        exact_rate = None
        for label, ckpt_args in write_checkpoints(folder, arch).items():
            for mode in ("exact", "dense"):
                if mode == "dense" and "official" in label:
                    continue  # dense mode refuses resizing networks (see lightning_modules/rosie_inference/dense.py)
                out = folder / f"pred_{mode}_{label.split()[0]}"
                argv = [*ckpt_args, "--he", str(folder / "slide.png"), "--out", str(out), "--stride", "8",
                        "--mode", mode, "--foreground", "all", "--batch-size", str(batch), "--device", str(device.type),
                        "--no-progress", "--overwrite", "--ignore-resolution"]
                sync(device)
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    rc = rosie_predict.main(argv)
                sync(device)
                sec = time.perf_counter() - start
                rate = n / sec
                extra = ""
                if mode == "exact" and label.startswith("128"):
                    exact_rate = rate
                if mode == "dense" and exact_rate:
                    extra = f"  = {rate / exact_rate:.1f}x exact"
                print(f"  {label:16s} {mode:5s}: rc {rc}, {n} patches in {sec:6.1f} s = {rate:9.0f} patches/s{extra}"
                      f"  peak {peak_memory_gib(device)}")


def bench_virtues(device: torch.device, batch: int, markers: int, crop: int, repeats: int, arch: VirTuesArch) -> None:
    print(f"\nVirTues pretraining step (d_model {arch.d_model}, encoder {arch.encoder_pattern}, batch {batch}, "
          f"{markers} markers, {crop} px crops, bf16 autocast, AdamW)")
    backends = ["sdpa_bucketed", "sdpa_padded"]
    if torch_varlen_available():
        backends.insert(0, "varlen")
    if flash_available() and device.type == "cuda":
        backends.insert(0, "flash")
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(markers, crop, crop, generator=g).to(device) for _ in range(batch)]
    ids = [torch.randperm(max(markers, 50), generator=g)[:markers].to(device) for _ in range(batch)]
    grid = crop // arch.patch_size
    masks = [m.to(device) for m in independent_masks_for_batch([markers] * batch, grid, grid, generator=g)]
    tokens = batch * markers * grid * grid
    for backend in backends:
        torch.manual_seed(0)
        model = VirTues(dataclasses.replace(arch, attention_backend=backend))
        model.set_marker_table(torch.randn(max(markers, 50), arch.esm_dim), [f"P{i:05d}" for i in range(max(markers, 50))])
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(images, ids, masks)
                pred = torch.cat([d.reshape(-1) for d in out.decoded]).float()
                loss = torch.nn.functional.mse_loss(pred, torch.cat([x.reshape(-1) for x in images]))
            loss.backward()
            opt.step()

        try:
            flops = count_flops(step)
            sec = timed(step, device, repeats)
        except (ImportError, ValueError, NotImplementedError, RuntimeError) as exc:
            print(f"  {backend:14s}: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        mfu = flops / sec / peak_flops(device, "bf16")
        print(f"  {backend:14s}: {sec * 1e3:8.1f} ms/step  {tokens / sec:10.0f} tokens/s  MFU {mfu:6.1%}"
              f"  peak {peak_memory_gib(device)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller slide")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile lines")
    ap.add_argument("--smoke", action="store_true", help="run every path on the CPU with tiny sizes (code check only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(f"benchmarks.gpu_suite: no CUDA GPU on this machine (torch {torch.__version__}); nothing to measure. "
              "Run it on a GPU machine (or --smoke to check the code paths on the CPU).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: numbers meaningless)"
    print(f"device: {name} | torch {torch.__version__} | CUDA {torch.version.cuda} | TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}")
    if args.smoke:
        bench_rosie_model("convnext_atto", device, 2, 1, [False])
        bench_end_to_end("convnext_atto", device, 256, 16)
        bench_virtues(device, 2, 4, 32, 1, VirTuesArch(d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64,
                                                       encoder_pattern="hv", decoder_pattern="f"))
        return 0
    torch.backends.cudnn.benchmark = True
    repeats = 5 if args.quick else 20
    bench_rosie_model("convnext_small", device, 256, repeats, [False] if args.no_compile else [False, True])
    bench_end_to_end("convnext_small", device, 4096 if args.quick else 8192, 512)
    bench_virtues(device, 16, 40, 128, 3 if args.quick else 10, VirTuesArch())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
