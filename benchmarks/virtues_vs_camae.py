"""Fig. 1e, cost half: VirTues vs the CA-MAE baseline at 10 / 20 / 40 markers.

    python -m benchmarks.virtues_vs_camae --out runs/fig1e [--markers 10 20 40] [--size 64] [--batch 2]
        [--dim 64] [--heads 2] [--depth 4] [--decoder-depth 1] [--repeats 3] [--threads 1] [--overwrite]

Paper protocol (Methods, "Scaling analysis"): cost ``c = m × t``, ``m`` the memory of a forward pass
over a batch of 16 images, ``t`` its inference time, 10 warm-up runs then the mean of 100; plus the
number of parameters. Here, at a reduced width so it runs on a CPU in about a minute:

* ``inference``: the unmasked encoder pass that produces cell / niche tokens (no gradients);
* ``train``: one masked forward + backward of the full autoencoder (VirTues' independent masks
  U(0.6, 1); CA-MAE's Kraus 75 %), the cost a pretraining step pays;
* FLOPs by ``torch.utils.flop_counter`` with the exact per-sequence attention (``loop`` backend
  under PyTorch's math SDPA kernel, which the counter sees; fused kernels are invisible to it);
* memory: CUDA peak allocation, or on CPU the profiler's peak of live allocations (op granularity);
* parameters at the benchmark width, and at the paper's sizes (VirTues released model; CA-MAE
  ViT-B/8 encoder with MAE-size decoders per channel), beside the paper's "25× at 40 markers".

Both models use the same block implementation and attention kernels (``auto``), so the difference
is the architecture: VirTues' factorized (spatial/marker) encoder and channel-wise decoder vs
CA-MAE's full attention over all channel × position tokens and one decoder per channel.

Outputs in ``--out``: ``cost.csv`` (one row per model × markers), ``cost.png`` and the printed table.
The probe-F1 half of Fig. 1e needs models trained on 10/20/40-marker panels; it is not measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from analysis.outputs import atomic_output_dir
from benchmarks.virtues_attention import memory_bytes, timed
from datamodules.command_line import run_command
from lightning_modules.components.camae import CAMAE, CAMAEArch, camae_loss, count_parameters, \
    decoder_parameters_per_channel
from lightning_modules.components.virtues import VirTues, VirTuesArch, independent_masks_for_batch

COMMAND = "virtues_vs_camae"
PAPER_PARAMETER_RATIO_40 = 25.0  # "the number of parameters in VirTues is already 25x less than CA-MAE for 40 markers"
COLUMNS = ["model", "markers", "params", "params_paper_size", "infer_ms", "infer_peak_mb", "infer_cost_mb_s",
           "infer_gflops", "train_ms", "train_peak_mb", "train_gflops"]


def build_models(args: argparse.Namespace, n_table: int) -> dict[str, torch.nn.Module]:
    """VirTues and CA-MAE at the same width, depth and decoder depth, one decoder per table row."""
    torch.manual_seed(args.seed)
    pattern = ("hv" * args.depth)[: args.depth]
    virtues = VirTues(VirTuesArch(d_model=args.dim, encoder_heads=args.heads, decoder_heads=args.heads,
                                  ffn_dim=2 * args.dim, encoder_pattern=pattern, decoder_pattern="f" * args.decoder_depth))
    camae = CAMAE(CAMAEArch(d_model=args.dim, encoder_depth=args.depth, encoder_heads=args.heads,
                            encoder_ffn_dim=2 * args.dim, decoder_dim=args.dim, decoder_depth=args.decoder_depth,
                            decoder_heads=args.heads, decoder_ffn_dim=2 * args.dim, cross_attention_heads=args.heads,
                            layernorm_eps=1e-5))
    table, ids = torch.randn(n_table, 640), [f"M{i}" for i in range(n_table)]
    for m in (virtues, camae):
        m.set_marker_table(table, ids)
    return {"virtues": virtues, "camae": camae}


def paper_size_parameters(markers: int) -> dict[str, int]:
    """Parameter counts at the paper's sizes, without allocating them (meta device)."""
    with torch.device("meta"):
        virtues, camae = VirTues(), CAMAE()
    return {"virtues": count_parameters(virtues),
            "camae": count_parameters(camae) + markers * decoder_parameters_per_channel(camae.arch)}


def make_batch(batch: int, markers: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(markers, size, size, generator=g) for _ in range(batch)]
    ids = [torch.randperm(markers, generator=g) for _ in range(batch)]
    grid = size // 8
    masks = {"virtues": independent_masks_for_batch([markers] * batch, grid, grid, (0.6, 1.0), generator=g),
             "camae": independent_masks_for_batch([markers] * batch, grid, grid, (0.75, 0.75), generator=g)}
    return images, ids, masks


def steps(name: str, model: torch.nn.Module, images, ids, masks) -> tuple[Callable[[], None], Callable[[], None]]:
    def infer() -> None:
        with torch.no_grad():
            model.encode(images, ids)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        out = model(images, ids, masks)
        if name == "camae":
            loss = camae_loss(out.decoded, images, masks, 8)[0]
        else:
            loss = torch.nn.functional.mse_loss(torch.cat([d.reshape(-1) for d in out.decoded]),
                                                torch.cat([x.reshape(-1) for x in images]))
        loss.backward()

    return infer, train


def count_flops(model: torch.nn.Module, fn: Callable[[], None]) -> float:
    """GFLOPs of one call with exact per-sequence attention (math SDPA: visible to the counter)."""
    if isinstance(model, VirTues):
        saved = model.attention_backend
        model.attention_backend = "loop"
    else:
        saved = model.arch
        model.arch = dataclasses.replace(model.arch, attention_backend="loop")
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        if isinstance(model, VirTues):
            model.attention_backend = saved
        else:
            model.arch = saved
    return counter.get_total_flops() / 1e9


def measure(args: argparse.Namespace, progress: Callable[[str], None] = print) -> pd.DataFrame:
    device = torch.device(args.device)
    models = {k: m.to(device) for k, m in build_models(args, max(args.markers)).items()}
    rows = []
    for markers in args.markers:
        images, ids, masks = make_batch(args.batch, markers, args.size, args.seed)
        images, ids = [x.to(device) for x in images], [x.to(device) for x in ids]
        paper = paper_size_parameters(markers)
        for name, model in models.items():
            m = [x.to(device) for x in masks[name]]
            infer, train = steps(name, model.eval(), images, ids, m)
            t_inf = timed(infer, device, args.warmup, args.repeats)
            mem_inf = memory_bytes(infer, device) / 2**20
            model.train()
            t_tr = timed(train, device, args.warmup, args.repeats)
            mem_tr = memory_bytes(train, device) / 2**20
            own = count_parameters(model) - (0 if name == "virtues" else
                                             (model.num_channels - markers) * decoder_parameters_per_channel(model.arch))
            rows.append({"model": name, "markers": markers, "params": own, "params_paper_size": paper[name],
                         "infer_ms": t_inf * 1e3, "infer_peak_mb": mem_inf, "infer_cost_mb_s": mem_inf * t_inf,
                         "infer_gflops": count_flops(model, infer), "train_ms": t_tr * 1e3, "train_peak_mb": mem_tr,
                         "train_gflops": count_flops(model, train)})
            progress(f"{name} at {markers} markers: inference {t_inf * 1e3:.1f} ms, train step {t_tr * 1e3:.1f} ms")
    return pd.DataFrame(rows, columns=COLUMNS)


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """CA-MAE / VirTues per marker count, the paper's parameter ratio beside ours."""
    wide = df.set_index(["markers", "model"]).unstack("model")
    out = pd.DataFrame(index=wide.index)
    for col in ("params", "params_paper_size", "infer_ms", "infer_peak_mb", "infer_cost_mb_s", "infer_gflops",
                "train_ms", "train_gflops"):
        out[f"{col}_ratio"] = wide[(col, "camae")] / wide[(col, "virtues")]
    out["paper_params_ratio"] = [PAPER_PARAMETER_RATIO_40 if m == 40 else float("nan") for m in out.index]
    return out.reset_index()


def plot(df: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("infer_cost_mb_s", "inference cost m×t (MB·s)"), ("train_gflops", "train step GFLOPs"),
              ("params_paper_size", "parameters at paper size")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (col, label) in zip(axes, panels):
        for name, colour in (("virtues", "tab:blue"), ("camae", "tab:orange")):
            part = df[df["model"] == name]
            ax.plot(part["markers"], part[col], "o-", color=colour, label="VirTues" if name == "virtues" else "CA-MAE")
        ax.set_yscale("log")
        ax.set_xlabel("markers")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fig. 1e (cost): VirTues vs CA-MAE", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.virtues_vs_camae", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (cost.csv, cost.png)")
    p.add_argument("--markers", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--size", type=int, default=64, help="crop side in px (paper 128; 64 keeps CA-MAE's CPU run short)")
    p.add_argument("--batch", type=int, default=2, help="crops per batch (paper 16)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--depth", type=int, default=4, help="encoder blocks of both models")
    p.add_argument("--decoder-depth", type=int, default=1, help="decoder blocks (CA-MAE: per channel)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    for flag in ("size", "batch", "dim", "heads", "depth", "decoder_depth", "repeats", "threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive integer")
    if args.size % 8:
        raise ValueError(f"--size {args.size}: must be a multiple of the patch size 8")
    if args.dim % args.heads or (args.dim // args.heads) % 4:
        raise ValueError(f"--dim {args.dim} / --heads {args.heads} must be an integer divisible by 4 (2D RoPE)")
    if any(m < 1 for m in args.markers):
        raise ValueError(f"--markers {args.markers}: every count must be positive")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        check_arguments(args)
        torch.set_num_threads(args.threads)
        df = measure(args)
        ratios = ratio_table(df)
        with atomic_output_dir(args.out, overwrite=args.overwrite, command=COMMAND) as tmp:
            df.to_csv(tmp / "cost.csv", index=False)
            ratios.to_csv(tmp / "ratios.csv", index=False)
            plot(df, str(tmp / "cost.png"))
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(df.round(3).to_string(index=False))
            print("\nCA-MAE / VirTues:")
            print(ratios.round(2).to_string(index=False))
        print(f"wrote {args.out}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
