"""What the masked-reconstruction evaluation works on: evaluated crops, the marker vocabulary and
the result tables (see :mod:`analysis.virtues_reconstruction` for the protocol)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

log = logging.getLogger("analysis.virtues_reconstruction")

STRATEGIES: tuple[str, ...] = ("independent", "marker", "niche")
#: strategy -> methods scored under it (VirTues first, then the paper's baseline for it).
METHODS: dict[str, tuple[str, ...]] = {
    "independent": ("virtues", "visible_mean"),
    "marker": ("virtues", "most_correlated"),
    "niche": ("virtues", "visible_mean"),
}

PER_MARKER_COLUMNS = ["dataset", "strategy", "method", "marker", "uniprot_id", "seen", "pearson_r", "f1", "n_pixels"]
SUMMARY_COLUMNS = ["strategy", "method", "pearson_r", "f1"]
SEEN_SUMMARY_COLUMNS = ["strategy", "method", "seen", "pearson_r", "f1", "n_markers"]
SKIPPED_COLUMNS = ["dataset", "marker", "uniprot_id", "reason"]
RATIO_RANGE = (0.6, 1.0)
STRATEGY_CODE = {s: i + 1 for i, s in enumerate(STRATEGIES)}


class ReconstructionError(ValueError):
    """Bad evaluation input; the message names the argument/marker and the fix."""


@dataclass
class EvalCrop:
    """One preprocessed crop, channels in the order of ``markers``.

    ``marker_ids`` are rows of the model's marker table; ``preprocessor`` (a
    ``datamodules.preprocess.MultiplexPreprocessor`` for these channels, optional) is used only to
    display images on the paper's [0, 1] scale.
    """

    dataset: str
    tissue_id: str
    y: int
    x: int
    image: Tensor  # (C, H, W) float32
    marker_ids: Tensor  # (C,) int64
    markers: list[str]
    uniprot_ids: list[str]
    preprocessor: Any = None

    def __post_init__(self) -> None:
        c = int(self.image.shape[0])
        if self.image.dim() != 3 or not (c == len(self.marker_ids) == len(self.markers) == len(self.uniprot_ids)):
            raise ReconstructionError(
                f"crop {self.dataset}/{self.tissue_id}@({self.y},{self.x}): image {tuple(self.image.shape)} with "
                f"{len(self.marker_ids)} marker ids, {len(self.markers)} names, {len(self.uniprot_ids)} UniProt ids"
            )


@dataclass
class ReconstructionResult:
    per_marker: pd.DataFrame
    summary: pd.DataFrame
    summary_seen_unseen: pd.DataFrame
    summary_per_dataset: pd.DataFrame
    baseline_fits: pd.DataFrame
    examples: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


# ============================================================================================
# Marker vocabulary (zero-shot extension)
# ============================================================================================


@dataclass
class MarkerVocabulary:
    """The marker table to install in the model: trained rows first (same order), new rows after."""

    uniprot_ids: list[str]
    embeddings: Tensor  # (N, d); rows of trained ids without an embedding are NaN (never looked up)
    seen: dict[str, bool]
    missing_trained: list[str]

    def usable(self, uniprot_id: str) -> bool:
        return uniprot_id in self.seen and uniprot_id not in self.missing_trained


def build_marker_vocabulary(
    trained_ids: Sequence[str] | None,
    available: Mapping[str, Tensor],
    needed: Sequence[str],
    allow_missing: bool = False,
    trained_markers: Collection[str] | None = None,
) -> MarkerVocabulary:
    """Rebuild the checkpoint's marker table and extend it with the evaluated panels' new markers.

    The checkpoint stores only the UniProt id ORDER of its table (the ESM vectors are inputs, not
    weights), so its rows are filled from ``available`` (the evaluated datasets' and any extra
    ``marker_embeddings`` folders) in exactly that order: marker index i keeps meaning the same protein.
    A marker of the evaluated panels that is not in the checkpoint (zero-shot) is appended after the
    trained rows if an embedding for it is available, and marked ``seen=False``; markers without any
    embedding are left out (the caller reports them).

    Args:
        trained_ids: the checkpoint's id order; None (official weights, no stored order) = the
            sorted ids of ``available``, all counted as seen.
        allow_missing: trained ids without an embedding become NaN rows instead of an error (safe:
            only rows of evaluated channels are looked up, and those all have embeddings).
        trained_markers: UniProt ids of the channels pretraining actually trained on
            (``datamodules.virtues_trained_markers``). A table row outside it is ``seen=False``: the
            table holds every embedding file of the pretraining folders, not only trained channels.
            None = every table row counts as seen (when the pretraining data is unknown).

    Raises:
        ReconstructionError: a trained id has no embedding and ``allow_missing`` is False.
    """
    dims = {int(t.numel()) for t in available.values()}
    if len(dims) > 1:
        raise ReconstructionError(f"marker embeddings of different sizes {sorted(dims)}: use one ESM-2 model for all")
    dim = dims.pop() if dims else 640
    if trained_ids is None:
        trained = sorted(available)
    else:
        trained = [str(u) for u in trained_ids]
    missing = [u for u in trained if u not in available]
    if missing and not allow_missing:
        raise ReconstructionError(
            f"{len(missing)} of the checkpoint's {len(trained)} markers have no embedding in the evaluated datasets' "
            f"marker_embeddings folders: {missing[:20]}{' ...' if len(missing) > 20 else ''}. The checkpoint stores only "
            "their UniProt ids; pass --embeddings <pretraining dataset>/marker_embeddings (repeatable), or "
            "--allow-missing-table-rows if no evaluated channel uses them"
        )
    new = sorted({str(u) for u in needed if str(u) in available and str(u) not in set(trained)})
    rows = [available[u].float().reshape(-1) if u in available else torch.full((dim,), float("nan")) for u in trained]
    rows += [available[u].float().reshape(-1) for u in new]
    ids = trained + new
    table = torch.stack(rows) if rows else torch.zeros(0, dim)
    trained_set = None if trained_markers is None else {str(u) for u in trained_markers}
    seen = {u: trained_set is None or u in trained_set for u in trained}
    seen.update({u: False for u in new})
    if new:
        log.info("zero-shot: %d markers not in the pretraining table get their embedding appended: %s", len(new), new)
    return MarkerVocabulary(ids, table, seen, missing)


def pixel_mask(token_mask: Tensor, patch_size: int) -> Tensor:
    """Token mask ``(..., h, w)`` -> pixel mask ``(..., h·p, w·p)``."""
    return token_mask.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
