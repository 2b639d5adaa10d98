"""Masked-reconstruction evaluation of VirTues (paper Methods "Masked reconstructions", Fig. 2a–d, h).

The model enters as a plain ``nn.Module`` with the VirTues forward
(``model(images, marker_ids, masks) -> .decoded``) and crops enter already preprocessed
(:class:`EvalCrop`); reading crops from a dataset is the caller's job
(``experiments.virtues_reconstruct``), so this module has no Lightning and no file layout in it.

Every choice below is also written to ``evaluation.json`` by :func:`write_outputs`.

* **Strategies** (paper; ``docs/virtues-official-layout.md`` 3.1), on the ``H/8 × W/8``
  token grid, no channel dropout:

  - ``independent``: per channel ``r ~ U(0.6, 1)``, ``ceil(r·h·w)`` random tokens masked;
  - ``marker``: for each crop and each of its channels ``c`` in turn, channel ``c`` fully masked and
    all others visible (the ``C`` variants of a crop are batched);
  - ``niche``: one ``r ~ U(0.6, 1)`` per crop, the same ``ceil(r·h·w)`` positions masked in all channels.

  Masks are drawn from a ``torch.Generator`` seeded by ``(seed, strategy, crop index)``, so a rerun,
  a different batch size or a different model sees identical masks.
* **Evaluated pixels**: the pixels of the masked tokens only (a masked token = its ``p × p`` pixels),
  pooled over all crops of a dataset, per marker (Pearson r over that pixel set).
* **F1 of positivity**: a pixel is positive when its value (in the model's preprocessed space:
  clip → log1p → dataset standardisation → blur) is strictly above the threshold ``t_m`` =
  **the mean of the ground truth of marker m over the evaluated pixels** (the same pixel set as the
  Pearson r, i.e. per dataset, strategy and marker). Truth and prediction are thresholded at the
  same ``t_m``; F1 = 2TP / (2TP + FP + FN) (NaN when there is no positive in either).
* **Baselines** (scored on exactly the same pixels):

  - ``visible_mean`` (independent and niche masking): every masked pixel of channel c in a crop is
    predicted by the mean of the *visible* pixels of channel c in that crop. Under niche masking the
    visible positions are shared by all channels, so the rule is the same per channel. A channel
    with no visible pixel in the crop (possible when ``ceil(r·h·w) = h·w``) is predicted by 0, the
    dataset mean of the standardised channel.
  - ``most_correlated`` (marker masking): for target marker m, the other marker k whose pixel values
    correlate best with m — largest ``|r|``, so an anti-correlated marker counts too — on the
    **training** crops of the same dataset (the ``fit`` crops; when a dataset has no training crop,
    the evaluated crops themselves, which favours the baseline; the source is recorded), mapped by the
    least-squares line ``m ≈ a + b·k`` fitted on those same pixels. If k is not measured in a crop,
    the next best marker measured there is used. The partner is always visible under marker masking.
* **Marker masking cost**: C forward passes per crop (each with all other channels visible), so
  ``marker_max_crops`` can limit it to an evenly spaced subset of crops per dataset; only the masked
  channel is decoded (VirTues decodes channels independently, so the values equal the full forward).
* **Aggregation**: ``summary`` = mean over markers (and datasets) of the per-marker values (NaN
  values — e.g. a marker constant over the evaluated pixels — are left out of the mean and logged).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from analysis.outputs import atomic_output_dir, json_default
from analysis.virtues_reconstruction_baselines import (
    PartnerFit,
    PixelStats,
    fit_most_correlated,
    partner_prediction,
    pearson_f1,
    visible_mean_prediction,
)
from analysis.virtues_reconstruction_data import (
    METHODS,
    PER_MARKER_COLUMNS,
    RATIO_RANGE,
    SEEN_SUMMARY_COLUMNS,
    SKIPPED_COLUMNS,
    STRATEGIES,
    STRATEGY_CODE,
    SUMMARY_COLUMNS,
    EvalCrop,
    MarkerVocabulary,
    ReconstructionError,
    ReconstructionResult,
    build_marker_vocabulary,
    pixel_mask,
)
from analysis.virtues_reconstruction_figures import plot_all
from analysis.virtues_reconstruction_outputs import summarise, summarise_per_dataset, summarise_seen
from lightning_modules.components.virtues.encoder import unpatchify
from lightning_modules.components.virtues.masking import independent_mask, niche_mask

__all__ = ["METHODS", "PER_MARKER_COLUMNS", "SEEN_SUMMARY_COLUMNS", "SKIPPED_COLUMNS", "STRATEGIES", "SUMMARY_COLUMNS",
           "EvalCrop", "MarkerVocabulary", "PartnerFit", "PixelStats", "ReconstructionError", "ReconstructionResult",
           "build_marker_vocabulary", "crop_generator", "evaluate_reconstruction", "fit_most_correlated", "pearson_f1",
           "pixel_mask", "strategy_masks", "subsample_per_dataset", "summarise", "summarise_per_dataset", "summarise_seen",
           "supports_channel_decoding", "visible_mean_prediction", "write_outputs"]

log = logging.getLogger(__name__)

# ============================================================================================
# Masks
# ============================================================================================


def crop_generator(seed: int, strategy: str, crop_index: int) -> torch.Generator:
    """The generator of one crop's masks: independent of batching, model and other strategies."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + STRATEGY_CODE[strategy] * 100_003 + int(crop_index))


def strategy_masks(strategy: str, num_channels: int, h: int, w: int, generator: torch.Generator | None = None,
                   ratio_range: Sequence[float] = RATIO_RANGE) -> Tensor:
    """The mask variants of one crop, ``(V, C, h, w)`` bool (True = masked).

    ``independent`` and ``niche`` give one variant; ``marker`` gives ``C`` variants, variant ``c``
    masking channel ``c`` entirely and nothing else.
    """
    if strategy == "independent":
        return independent_mask(num_channels, h, w, ratio_range, generator)[None]
    if strategy == "niche":
        return niche_mask(num_channels, h, w, ratio_range, generator)[None]
    if strategy == "marker":
        eye = torch.eye(num_channels, dtype=torch.bool)
        return eye[:, :, None, None].expand(num_channels, num_channels, h, w).clone()
    raise ReconstructionError(f"unknown masking strategy {strategy!r}; choose from {STRATEGIES}")


# ============================================================================================
# Evaluation
# ============================================================================================


def _forward(model: nn.Module, images: list[Tensor], ids: list[Tensor], masks: list[Tensor], device: torch.device) -> list[Tensor]:
    out = model([x.to(device) for x in images], [i.to(device) for i in ids], [m.to(device) for m in masks])
    decoded = out.decoded if hasattr(out, "decoded") else out[0]
    return [d.detach().float().cpu() for d in decoded]


def supports_channel_decoding(model: nn.Module) -> bool:
    """True for the VirTues module: encoder pass + a decoder that reconstructs channels independently."""
    return all(hasattr(model, a) for a in ("encode", "decoder", "patch_size"))


def _forward_channels(model: nn.Module, images: list[Tensor], ids: list[Tensor], masks: list[Tensor], channels: list[int],
                      device: torch.device) -> list[Tensor]:
    """Decode only channel ``channels[b]`` of sample b, as ``(1, H, W)``.

    Why: under marker masking only the masked channel is scored, and VirTues' decoder treats every
    channel as its own sequence ``[PS tokens | that channel's tokens]``; decoding the one channel
    gives exactly the values the full forward would (tested), at 1/C of the decoder cost.
    """

    enc = model.encode([x.to(device) for x in images], [i.to(device) for i in ids], [m.to(device) for m in masks])
    ps = torch.stack(list(enc.patch_summary))
    tokens = torch.stack([enc.channel_tokens[b][c] for b, c in enumerate(channels)])
    _, h, w, _ = tokens.shape
    patches = model.decoder(ps, tokens, torch.arange(len(channels), device=ps.device))
    decoded = unpatchify(patches, h, w, model.patch_size)
    return [d[None].detach().float().cpu() for d in decoded]


def _row_index(crops: Sequence[EvalCrop]) -> tuple[dict[tuple[str, str], int], list[tuple[str, str, str]]]:
    index: dict[tuple[str, str], int] = {}
    rows: list[tuple[str, str, str]] = []
    for c in crops:
        for m, u in zip(c.markers, c.uniprot_ids):
            key = (c.dataset, m)
            if key not in index:
                index[key] = len(rows)
                rows.append((c.dataset, m, u))
    return index, rows


def evaluate_reconstruction(
    model: nn.Module,
    crops: Sequence[EvalCrop],
    fit_crops: Sequence[EvalCrop] | None = None,
    strategies: Sequence[str] = STRATEGIES,
    seed: int = 0,
    batch_size: int = 16,
    seen: Mapping[str, bool] | None = None,
    patch_size: int | None = None,
    device: str | torch.device = "cpu",
    ratio_range: Sequence[float] = RATIO_RANGE,
    progress: bool = True,
    channel_decoding: bool = True,
    marker_max_crops: int | None = None,
) -> ReconstructionResult:
    """Score VirTues and the paper's baselines under each masking strategy.

    Args:
        model: VirTues-like module; ``model(images, marker_ids, masks).decoded`` -> list of (C, H, W).
        crops: evaluated crops (preprocessed; marker ids = rows of the model's table).
        fit_crops: crops the ``most_correlated`` baseline is fitted on (the training split); None or
            empty for a dataset -> that dataset's evaluated crops (recorded in ``baseline_fits``).
        seen: UniProt id -> seen during pretraining (default: all True).
        patch_size: token size in pixels (default ``model.patch_size``).
        channel_decoding: under marker masking decode only the masked channel (same values, much
            faster) when the model has ``encode``/``decoder``; False = always the full forward.
        marker_max_crops: marker masking costs C forward passes per crop (each with all other
            channels visible); at most this many crops per dataset are used for it (evenly spaced
            in crop order). None = all crops.
    """
    if not crops:
        raise ReconstructionError("no crops to evaluate")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ReconstructionError(f"unknown strategies {unknown}; choose from {STRATEGIES}")
    p = int(patch_size or getattr(model, "patch_size", 8))
    H, W = crops[0].image.shape[-2:]
    if H % p or W % p:
        raise ReconstructionError(f"crop size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    device = torch.device(device)
    index, rows = _row_index(crops)
    K = len(rows)
    seen = dict(seen or {})

    # ---- most-correlated partners ------------------------------------------------------------
    fits: dict[tuple[str, str], list[PartnerFit]] = {}
    fit_rows = []
    if "marker" in strategies:
        fit_crops = list(fit_crops or [])
        have_fit = {c.dataset for c in fit_crops}
        missing = sorted({c.dataset for c in crops} - have_fit)
        if missing:
            log.warning("no training crops for %s: the most-correlated baseline is fitted on the evaluated crops "
                        "(favours the baseline)", missing)
        fits = fit_most_correlated([c for c in fit_crops] + [c for c in crops if c.dataset in missing])
        for (ds, m), fl in fits.items():
            best = fl[0] if fl else None
            fit_rows.append({"dataset": ds, "marker": m, "partner": best.partner if best else None,
                             "intercept": best.intercept if best else np.nan, "slope": best.slope if best else np.nan,
                             "r_fit": best.r if best else np.nan, "source": "evaluated" if ds in missing else "train"})

    model = model.eval()
    channel_decoding = channel_decoding and supports_channel_decoding(model)
    records: list[dict] = []
    examples: list[dict] = []
    n_scored: dict[str, int] = {}
    t_start = time.perf_counter()
    all_crops = list(crops)
    for strategy in strategies:
        t0 = time.perf_counter()
        methods = METHODS[strategy]
        crops = all_crops
        if strategy == "marker" and marker_max_crops is not None:
            crops = subsample_per_dataset(all_crops, marker_max_crops)
        masks = [None if strategy == "marker" else strategy_masks(strategy, len(c.markers), h, w,
                                                                   crop_generator(seed, strategy, i), ratio_range)[0]
                 for i, c in enumerate(crops)]
        # thresholds: mean truth over the evaluated pixels (known before any prediction)
        tsum, tcnt = np.zeros(K), np.zeros(K)
        for c, m in zip(crops, masks):
            rws = np.array([index[(c.dataset, mk)] for mk in c.markers])
            if m is None:
                tsum[rws] += c.image.double().sum((1, 2)).numpy()
                tcnt[rws] += H * W
            else:
                sel = pixel_mask(m, p)
                tsum[rws] += (c.image.double() * sel).sum((1, 2)).numpy()
                tcnt[rws] += sel.sum((1, 2)).numpy()
        thr_all = torch.from_numpy(np.where(tcnt > 0, tsum / np.maximum(tcnt, 1), 0.0))
        stats = {meth: PixelStats(K) for meth in methods}
        example_crop: dict[str, int] = {}
        for i, c in enumerate(crops):
            example_crop.setdefault(c.dataset, i)

        # ---- jobs: (crop, variant mask, channel rows evaluated) -----------------------------------
        def jobs() -> Iterator[tuple[int, Tensor, slice | int]]:
            for i, c in enumerate(crops):
                if strategy == "marker":
                    variants = strategy_masks("marker", len(c.markers), h, w)
                    for ch in range(len(c.markers)):
                        yield i, variants[ch], ch
                else:
                    yield i, masks[i], slice(None)

        keep: dict[int, dict[str, np.ndarray]] = {}
        batch: list[tuple[int, Tensor, slice | int]] = []
        n_jobs = sum(len(c.markers) for c in crops) if strategy == "marker" else len(crops)
        done = 0

        def flush() -> None:
            nonlocal done
            if not batch:
                return
            args = ([crops[i].image for i, _, _ in batch], [crops[i].marker_ids for i, _, _ in batch], [m for _, m, _ in batch])
            single = strategy == "marker" and channel_decoding
            with torch.inference_mode():
                if single:
                    decoded = _forward_channels(model, *args, [ch for _, _, ch in batch], device)
                else:
                    decoded = _forward(model, *args, device)
            for (i, m, ch), dec in zip(batch, decoded):
                c = crops[i]
                rws = torch.tensor([index[(c.dataset, mk)] for mk in c.markers])
                sl = slice(ch, ch + 1) if isinstance(ch, int) else ch
                sel = pixel_mask(m, p)[sl]
                truth = c.image[sl]
                thr = thr_all[rws[sl]]
                dec = dec if single else dec[sl]
                stats["virtues"].add(rws[sl], truth, dec, sel, thr)
                if "visible_mean" in stats:
                    stats["visible_mean"].add(rws[sl], truth, visible_mean_prediction(c.image, m, p)[sl], sel, thr)
                if "most_correlated" in stats:
                    stats["most_correlated"].add(rws[sl], truth, partner_prediction(c, fits, sl), sel, thr)
                if i == example_crop.get(c.dataset):
                    ex = keep.setdefault(i, {"input": c.image.numpy().copy(), "recon": np.zeros_like(c.image.numpy())})
                    ex["recon"][sl] = dec.numpy()
                    ex["input"][sl] = np.where(sel.numpy(), np.nan, c.image[sl].numpy())
            done += len(batch)
            batch.clear()
            if progress:
                log.info("%s masking: %d/%d samples (%.1f s)", strategy, done, n_jobs, time.perf_counter() - t0)

        for job in jobs():
            batch.append(job)
            if len(batch) >= batch_size:
                flush()
        flush()

        r = {meth: stats[meth].pearson() for meth in methods}
        f1 = {meth: stats[meth].f1() for meth in methods}
        n = {meth: stats[meth].n() for meth in methods}
        for meth in methods:
            for k, (ds, marker, uid) in enumerate(rows):
                if n[meth][k] == 0:
                    continue
                records.append({"dataset": ds, "strategy": strategy, "method": meth, "marker": marker, "uniprot_id": uid,
                                "seen": bool(seen.get(uid, True)), "pearson_r": float(r[meth][k]), "f1": float(f1[meth][k]),
                                "n_pixels": int(n[meth][k])})
        for i, ex in keep.items():
            c = crops[i]
            examples.append({"dataset": c.dataset, "tissue_id": c.tissue_id, "y": c.y, "x": c.x, "strategy": strategy,
                             "markers": list(c.markers), "truth": c.image.numpy(), "input": ex["input"], "recon": ex["recon"],
                             "preprocessor": c.preprocessor})
        log.info("%s masking: %d crops scored in %.1f s", strategy, len(crops), time.perf_counter() - t0)
        n_scored[strategy] = len(crops)
    crops = all_crops

    per_marker = pd.DataFrame.from_records(records, columns=PER_MARKER_COLUMNS)
    settings = {
        "strategies": list(strategies), "seed": seed, "ratio_range": list(ratio_range), "patch_size": p,
        "crop_size": [int(H), int(W)], "n_crops": _count_by_dataset(crops), "n_fit_crops": _count_by_dataset(fit_crops or []),
        "crops_scored_per_strategy": n_scored, "marker_max_crops": marker_max_crops,
        "seconds": time.perf_counter() - t_start,
    }
    return ReconstructionResult(per_marker, summarise(per_marker), summarise_seen(per_marker),
                                summarise_per_dataset(per_marker), pd.DataFrame(fit_rows), examples, settings)


def _count_by_dataset(crops: Sequence[EvalCrop]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in crops:
        out[c.dataset] = out.get(c.dataset, 0) + 1
    return out


def subsample_per_dataset(crops: Sequence[EvalCrop], k: int) -> list[EvalCrop]:
    """At most ``k`` crops per dataset, evenly spaced in the given order (deterministic)."""
    by: dict[str, list[EvalCrop]] = {}
    for c in crops:
        by.setdefault(c.dataset, []).append(c)
    out = []
    for ds_crops in by.values():
        n = len(ds_crops)
        pick = range(n) if n <= k else np.unique(np.linspace(0, n - 1, max(k, 1)).round().astype(int))
        out += [ds_crops[i] for i in pick]
    return out


# ============================================================================================
# Outputs
# ============================================================================================


def write_outputs(result: ReconstructionResult, out_dir: str | Path, skipped: pd.DataFrame | None = None,
                  info: Mapping[str, Any] | None = None, overwrite: bool = False, figures: bool = True,
                  extra_files: Mapping[str, str] | None = None) -> Path:
    """per_marker.csv, summary.csv, summary_seen_unseen.csv, summary_per_dataset.csv, baseline_fits.csv,
    skipped_markers.csv, evaluation.json and the figures, written into a temporary folder renamed to
    ``out_dir`` at the end (an existing ``out_dir`` is refused unless ``overwrite``)."""
    skipped = skipped if skipped is not None else pd.DataFrame(columns=SKIPPED_COLUMNS)
    with atomic_output_dir(out_dir, overwrite, command="virtues_reconstruct") as tmp:
        result.per_marker.to_csv(tmp / "per_marker.csv", index=False)
        result.summary.to_csv(tmp / "summary.csv", index=False)
        result.summary_seen_unseen.to_csv(tmp / "summary_seen_unseen.csv", index=False)
        result.summary_per_dataset.to_csv(tmp / "summary_per_dataset.csv", index=False)
        result.baseline_fits.to_csv(tmp / "baseline_fits.csv", index=False)
        skipped.reindex(columns=SKIPPED_COLUMNS).to_csv(tmp / "skipped_markers.csv", index=False)
        figs = [p.name for p in plot_all(result, tmp)] if figures else []
        doc = (__doc__ or "").split("Every choice below", 1)[-1]
        payload = {"settings": result.settings, "info": dict(info or {}), "figures": figs,
                   "n_skipped_markers": int(len(skipped)), "choices": doc.strip()}
        (tmp / "evaluation.json").write_text(json.dumps(payload, indent=2, default=json_default))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)
