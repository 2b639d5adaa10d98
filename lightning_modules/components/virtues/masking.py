"""Token masking and channel dropout for VirTues (pure torch, reproducible with a Generator).

Conventions: masks are bool ``(C, h, w)`` on the patch grid, True = masked. Counts are exact:
``ceil(r * h * w)`` positions are masked, chosen as the first entries of a uniformly random
permutation (``argsort`` of i.i.d. uniform noise, vectorised over channels).

Strategies (paper Methods, "Masked reconstructions"; only the first is used for training by the
official code):
- :func:`independent_mask`: per channel ``r ~ U(0.6, 1)`` (training and evaluation).
- :func:`marker_mask`: one channel fully masked, all others visible.
- :func:`niche_mask`: one ratio per image; the same grid positions masked in all channels.
- :func:`channel_dropout`: keep ``ceil(C * U(0.75, 1))`` channels, in random order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def _check_ratio_range(ratio_range: Sequence[float], name: str = "ratio_range") -> tuple[float, float]:
    lo, hi = float(ratio_range[0]), float(ratio_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= low <= high <= 1, got {tuple(ratio_range)}")
    return lo, hi


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> Tensor:
    """n draws of U(lo, hi) in float64 on the generator's device (CPU by default)."""
    device = generator.device if generator is not None else "cpu"
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64, device=device)


def _random_ranks(rows: int, cols: int, generator: torch.Generator | None) -> Tensor:
    """Per row, a uniformly random permutation's inverse: rank of each column (0..cols-1)."""
    device = generator.device if generator is not None else "cpu"
    noise = torch.rand(rows, cols, generator=generator, device=device)
    return noise.argsort(dim=1).argsort(dim=1)


def counts_from_ratios(ratios: Tensor, num_positions: int) -> Tensor:
    """Exact number of masked positions ``ceil(r * num_positions)`` (int64)."""
    return torch.ceil(ratios * num_positions).long().clamp_(0, num_positions)


def independent_mask(
    num_channels: int,
    h: int,
    w: int,
    ratio_range: Sequence[float] = (0.6, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Each channel independently: ``r ~ U(ratio_range)``, mask exactly ``ceil(r*h*w)`` positions."""
    lo, hi = _check_ratio_range(ratio_range)
    P = h * w
    n_masked = counts_from_ratios(_uniform(num_channels, lo, hi, generator), P)
    ranks = _random_ranks(num_channels, P, generator)
    return (ranks < n_masked.to(ranks.device)[:, None]).reshape(num_channels, h, w)


def marker_mask(
    num_channels: int,
    h: int,
    w: int,
    channel: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One channel (given, or drawn uniformly) fully masked; every other channel fully visible."""
    if num_channels < 1:
        raise ValueError("marker_mask needs at least one channel")
    if channel is None:
        device = generator.device if generator is not None else "cpu"
        channel = int(torch.randint(num_channels, (1,), generator=generator, device=device))
    if not 0 <= channel < num_channels:
        raise IndexError(f"channel {channel} out of range for {num_channels} channels")
    mask = torch.zeros(num_channels, h, w, dtype=torch.bool)
    mask[channel] = True
    return mask


def niche_mask(
    num_channels: int,
    h: int,
    w: int,
    ratio_range: Sequence[float] = (0.6, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """One ratio for the image; the same ``ceil(r*h*w)`` grid positions masked in all channels."""
    lo, hi = _check_ratio_range(ratio_range)
    P = h * w
    n_masked = counts_from_ratios(_uniform(1, lo, hi, generator), P)
    ranks = _random_ranks(1, P, generator)
    positions = (ranks < n_masked.to(ranks.device)[:, None]).reshape(1, h, w)
    return positions.expand(num_channels, h, w).clone()


def channel_dropout(
    num_channels: int,
    keep_range: Sequence[float] = (0.75, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the channels to keep: ``ceil(C * f)``, ``f ~ U(keep_range)``, in random order.

    The random order is intended (official ChannelDropout also shuffles the channels); apply the
    same indices to the image and to its marker ids.
    """
    lo, hi = _check_ratio_range(keep_range, "keep_range")
    if num_channels == 0:
        return torch.zeros(0, dtype=torch.long)
    f = _uniform(1, lo, hi, generator)
    n_keep = max(1, int(math.ceil(float(f) * num_channels)))
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(num_channels, generator=generator, device=device)[: min(n_keep, num_channels)]


def apply_channel_dropout(
    image: Tensor,
    marker_ids: Tensor,
    keep_range: Sequence[float] = (0.75, 1.0),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Drop (and shuffle) channels of one sample ``(C, H, W)`` together with its ``(C,)`` ids."""
    if image.shape[0] != marker_ids.shape[0]:
        raise ValueError(f"image has {image.shape[0]} channels but {marker_ids.shape[0]} marker ids")
    keep = channel_dropout(image.shape[0], keep_range, generator).to(image.device)
    return image[keep], marker_ids[keep]


def independent_masks_for_batch(
    channel_counts: Sequence[int],
    h: int,
    w: int,
    ratio_range: Sequence[float] = (0.6, 1.0),
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Independent masks for a ragged batch, drawn in one vectorised call."""
    total = int(sum(channel_counts))
    masks = independent_mask(total, h, w, ratio_range, generator)
    return list(masks.split(list(channel_counts)))
