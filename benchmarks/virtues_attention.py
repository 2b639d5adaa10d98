"""Speed and memory of VirTues' factorized attention (paper Fig. 1e protocol) and of the
packed-attention backends.

Usage::

    python -m benchmarks.virtues_attention               # reduced width, CPU-friendly (< 2 min)
    python -m benchmarks.virtues_attention --full-size   # d 512, 8 heads, 16 blocks, batch 16 (GPU)

Table 1: forward + backward time and memory of the encoder at 10/20/40 markers: factorized
(``hv`` alternating, VirTues) vs full attention over all visible tokens of a sample (``f`` blocks)
with the same width and depth: an ablation of VirTues' attention only. It is NOT the paper's CA-MAE
baseline (no per-channel decoders, and marker identities still enter the tokens); Fig. 1e against
the real CA-MAE is ``python -m benchmarks.virtues_vs_camae``. Training setting: independent masking
U(0.6, 1).
Memory = peak allocated CUDA memory on GPU; on CPU the bytes autograd saves for backward
(activations, deduplicated by storage), which is what grows with the token count.

Table 2: the packed-attention backends (``attention.py``) on the same encoder, plus the
attention call alone on the encoder's spatial (h) and marker (v) layouts. Ratios are to
``sdpa_padded``, measured in the same run.

Every time is the mean of ``--repeats`` runs after ``--warmup`` runs.

Measured 2026-11-22, default arguments (d 128, 2 heads, depth 4, batch 2, 1 thread, shared 2-core
CPU, torch 2.14.1; ~45 s):

| markers | full/fact attention scores | factorized ms | full ms | full/fact time | peak MB fact / full |
|---|---|---|---|---|---|
| 10 | 11.7x | 155 | 370 | 2.4x | 56 / 56 |
| 20 | 23.8x | 362 | 1042 | 2.9x | 93 / 94 |
| 40 | 46.8x | 741 | 2699 | 3.6x | 176 / 172 |

The attention work of full attention grows ~linearly faster with the marker count (the score
column), so its time ratio grows with it; peak memory is the same because PyTorch's fused SDPA
kernels never materialise the score matrix (the paper's memory gap assumes they do).

Backends at 40 markers (time / sdpa_padded): encoder fwd+bwd sdpa_bucketed 0.65; attention alone,
spatial (h) layout: bucketed 0.22, nested 1.28, flex (eager, forward only) 30x; marker (v)
layout: bucketed 0.81, nested 1.95. Hence ``sdpa_bucketed`` is the CPU default. Not measured on
a GPU in this session (no device); on CUDA with fp16/bf16 and flash-attn installed, ``flash`` is used.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Callable

import torch

from lightning_modules.components.virtues import VirTues, VirTuesArch, independent_masks_for_batch
from lightning_modules.components.virtues.attention import PackedSegments, flash_available, varlen_attention
from lightning_modules.components.virtues.encoder import EncoderLayout


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    total = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - t
    return total / repeats


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C++ start/stop chatter (written straight to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def memory_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory allocated during one call, above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: replay of the profiler's allocation records in time
    order (op granularity: a temporary allocated and freed inside one kernel is not seen).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _quiet_stderr(), torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    records = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    current = peak = 0
    for _, delta in records:
        current += delta
        peak = max(peak, current)
    return peak


def make_batch(batch: int, markers: int, size: int, n_table: int, mask: bool, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(markers, size, size, generator=g).to(device) for _ in range(batch)]
    ids = [torch.randperm(n_table, generator=g)[:markers].to(device) for _ in range(batch)]
    masks = None
    if mask:
        masks = [m.to(device) for m in independent_masks_for_batch([markers] * batch, size // 8, size // 8, generator=g)]
    return images, ids, masks


def encoder_step(model: VirTues, images, ids, masks) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(model_device(model).type, dtype=torch.bfloat16, enabled=model_device(model).type == "cuda"):
            enc = model.encode(images, ids, masks)
            loss = sum(p.float().square().mean() for p in enc.patch_summary) + sum(
                c.float().square().mean() for c in enc.channel_tokens
            )
        loss.backward()

    return step


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def build(args, pattern: str, device: torch.device, backend: str = "auto") -> VirTues:
    torch.manual_seed(0)
    arch = VirTuesArch(d_model=args.dim, encoder_heads=args.heads, decoder_heads=args.heads, ffn_dim=2 * args.dim,
                       encoder_pattern=pattern, decoder_pattern="f", attention_backend=backend)
    m = VirTues(arch).to(device)
    m.set_marker_table(torch.randn(args.n_table, 640), [f"M{i}" for i in range(args.n_table)])
    return m.train()


def table_factorized_vs_full(args, device: torch.device) -> None:
    fact_pattern = ("hv" * args.depth)[: args.depth]
    print(f"\n## VirTues encoder: factorized vs full attention (an ablation, not CA-MAE; see benchmarks.virtues_vs_camae)  (d={args.dim}, heads={args.heads}, depth={args.depth}, "
          f"batch={args.batch}, {args.size}x{args.size} crops, masking={'U(0.6,1)' if not args.no_mask else 'none'}, "
          f"{device.type}, fwd+bwd, mean of {args.repeats} after {args.warmup} warm-up)")
    mem_label = "peak MB"
    print(f"| markers | visible tokens/crop | full/fact attention scores | factorized ms | full ms | full/fact time | factorized {mem_label} "
          f"| full {mem_label} | full/fact mem |")
    print("|---|---|---|---|---|---|---|---|---|")
    fact = build(args, fact_pattern, device)
    full = build(args, "f" * args.depth, device)
    for markers in args.markers:
        images, ids, masks = make_batch(args.batch, markers, args.size, args.n_table, not args.no_mask, device)
        P = (args.size // 8) ** 2
        vis = (P * (markers + 1) - (sum(int(m.sum()) for m in masks) if masks else 0) / args.batch)
        row = []
        for model in (fact, full):
            step = encoder_step(model, images, ids, masks)
            try:
                t = timed(step, device, args.warmup, args.repeats)
                mem = memory_bytes(step, device)
                row.append((t * 1e3, mem / 2**20))
            except torch.OutOfMemoryError:
                row.append((float("nan"), float("nan")))
                torch.cuda.empty_cache()
        (tf, mf), (tu, mu) = row
        print(f"| {markers} | {vis:.0f} | {score_ratio(masks, args, markers, fact_pattern):.1f}x | {tf:.1f} | {tu:.1f} | {tu / tf:.2f}x | {mf:.1f} | {mu:.1f} | {mu / mf:.2f}x |")


def score_ratio(masks, args, markers: int, fact_pattern: str) -> float:
    """Attention-score entries (sum over sequences of length^2) of full vs factorized blocks:
    what a non-fused kernel materialises, and the attention FLOPs."""
    P = (args.size // 8) ** 2
    visible = (~torch.cat(masks).reshape(-1, P)) if masks else torch.ones(markers * args.batch, P, dtype=torch.bool)
    layout = EncoderLayout.build(visible, [markers] * args.batch, (args.size // 8,) * 2, {"h", "v", "f"})

    def scores(kind: str) -> float:
        return float((layout.segments[kind].lengths.double() ** 2).sum())

    fact = sum(scores(k) for k in fact_pattern) / len(fact_pattern)
    return scores("f") / fact


def _layout_qkv(args, markers: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    P = (args.size // 8) ** 2
    masks = independent_masks_for_batch([markers] * args.batch, args.size // 8, args.size // 8, generator=g)
    visible = ~torch.cat(masks).reshape(-1, P)
    layout = EncoderLayout.build(visible.to(device), [markers] * args.batch, (args.size // 8,) * 2, {"h", "v"})
    N = layout.visible_index.numel()
    hd = args.dim // args.heads
    qkv = [torch.randn(N, args.heads, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    return layout, qkv


def table_backends(args, device: torch.device) -> None:
    markers = max(args.markers)
    backends = ["sdpa_padded", "sdpa_bucketed"]
    if device.type == "cuda" and flash_available():
        backends.append("flash")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\n## Packed-attention backends  ({markers} markers, batch={args.batch}, d={args.dim}, heads={args.heads}, "
          f"{device.type} {str(dtype).replace('torch.', '')}; ratio = time / sdpa_padded time)")
    print("| backend | encoder fwd+bwd ms | ratio | attention h fwd+bwd ms | ratio | attention v fwd+bwd ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    images, ids, masks = make_batch(args.batch, markers, args.size, args.n_table, True, device)
    layout, (q, k, v) = _layout_qkv(args, markers, device, dtype)
    q_v, k_v, v_v = (t.detach()[layout.perm["v"]].requires_grad_() for t in (q, k, v))

    def attn_step(kind: str, backend: str, grad: bool = True) -> Callable[[], None]:
        # fresh PackedSegments each call: the per-forward index cost is part of what is measured
        lengths = layout.segments[kind].lengths
        qq, kk, vv = (q, k, v) if kind == "h" else (q_v, k_v, v_v)
        if not grad:
            qq, kk, vv = qq.detach(), kk.detach(), vv.detach()

        def step() -> None:
            with torch.set_grad_enabled(grad):
                out = varlen_attention(qq, kk, vv, PackedSegments(lengths), backend=backend)
                if grad:
                    out.float().square().mean().backward()

        return step

    results = {}
    for be in backends + ["nested"]:
        enc_ms = float("nan")
        if be != "nested":  # nested is far slower on CPU: measured on the attention call only
            model = build(args, ("hv" * args.depth)[: args.depth], device, be)
            enc_ms = timed(encoder_step(model, images, ids, masks), device, args.warmup, args.repeats) * 1e3
        # nested is ~10x slower on CPU: one untimed-warm-up-free run keeps the benchmark short
        w, r = (0, 1) if be == "nested" else (args.warmup, args.repeats)
        h_ms = timed(attn_step("h", be), device, w, r) * 1e3
        v_ms = timed(attn_step("v", be), device, w, r) * 1e3
        results[be] = (enc_ms, h_ms, v_ms)
    ref = results["sdpa_padded"]
    for be, (enc_ms, h_ms, v_ms) in results.items():
        print(f"| {be} | {enc_ms:.1f} | {enc_ms / ref[0]:.2f} | {h_ms:.1f} | {h_ms / ref[1]:.2f} | {v_ms:.1f} "
              f"| {v_ms / ref[2]:.2f} |")
    # FlexAttention: forward only on CPU (no CPU backward in PyTorch); eager mode, so no block sparsity
    try:
        flex_h = timed(attn_step("h", "flex", grad=False), device, 1, 1) * 1e3
        pad_h = timed(attn_step("h", "sdpa_padded", grad=False), device, 1, 1) * 1e3
        print(f"\nflex (eager, forward only, h layout): {flex_h:.1f} ms = {flex_h / pad_h:.2f}x sdpa_padded forward "
              f"({pad_h:.1f} ms)")
    except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
        print(f"\nflex backend not measurable here: {type(e).__name__}: {str(e)[:120]}")
    seg_h, seg_v = layout.segments["h"], layout.segments["v"]
    print(f"layout: {seg_h.total} visible tokens; h: {seg_h.num_segments} sequences, max {seg_h.max_seqlen}, "
          f"padding factor {seg_h.num_segments * seg_h.max_seqlen / seg_h.total:.1f}x; v: {seg_v.num_segments} "
          f"sequences, max {seg_v.max_seqlen}, padding factor {seg_v.num_segments * seg_v.max_seqlen / seg_v.total:.1f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full-size", action="store_true", help="released size: d 512, 8 heads, 16 blocks, batch 16")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--markers", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--n-table", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-mask", action="store_true", help="unmasked (inference-like) tokens")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (0 = torch default). Default 1: on a small shared CPU, OpenMP "
                        "threads that contend with other processes made timings 10-50x slower and erratic")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-backends", action="store_true")
    args = p.parse_args(argv)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # flex's tracing chatter
    if args.full_size:
        args.dim, args.heads, args.depth, args.batch = 512, 8, 16, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    args.n_table = max(args.n_table, max(args.markers))
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    table_factorized_vs_full(args, device)
    if not args.skip_backends:
        table_backends(args, device)


if __name__ == "__main__":
    main()
