"""Dense ROSIE: one ConvNeXt pass over a large region, then every window's cells pooled and headed.

Why
    ConvNeXt is convolutional up to its global pooling: the stem (4×4 conv, stride 4) and the three
    downsampling layers (2×2 conv, stride 2) cut the image into non-overlapping cells, the blocks
    are depthwise 7×7 convolutions and per-pixel MLPs, and every LayerNorm normalises the channels
    of one pixel (no spatial statistics). A 128 px window whose corner sits on the 32 px cell grid
    of a large feature map is therefore 4×4 cells of that map, and the exact patch prediction is
    ``head(mean of those 16 cells)``; only the *context* differs: the exact patch sees zeros beyond
    its border in every 7×7 convolution, the dense map sees the real neighbouring tissue.

Shift-and-stitch without repeating work
    Windows on a stride-``s`` grid have corners at every multiple of ``g = gcd(s, 32)`` modulo 32,
    so one stride-32 map is not enough. Instead of 32/g shifted passes of the whole network per
    axis, the shift is introduced as late as possible: a stride-``f`` layer whose input stride ``r``
    is a multiple of ``g`` needs one phase; otherwise it runs once per phase (its input cropped by
    ``p·r`` px, ``p < f``), and everything after it runs once per phase. At ``s = 8`` the stem and
    the first two stages run once, stage 3 four times and stage 4 sixteen times: each window's
    cells are computed once, and ~50× fewer FLOPs per output pixel than exact mode (measured by
    ``python -m benchmarks.rosie_dense``).

Plain ``nn.Module`` code, no Lightning: the network is a timm ``ConvNeXt`` (the project's default
and the layout the authors' weights are mapped onto).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Input stride of the ConvNeXt feature map (stem 4 × three stride-2 downsamples).
FEATURE_STRIDE = 32


def _stride_of(layer: nn.Module) -> int:
    """The stride of the (only) strided convolution inside ``layer``; 1 for an Identity."""
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return 1
    conv = convs[0]
    k, st, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    if len(convs) != 1 or k != st or pad != 0 or conv.kernel_size[1] != conv.stride[1]:
        raise ValueError(f"dense mode needs non-overlapping strided convolutions (kernel = stride, no padding), got {conv}")
    return st


def is_dense_compatible(model: nn.Module) -> bool:
    """True for a timm ConvNeXt (stem, stages with downsample + blocks, norm_pre, head)."""
    return all(hasattr(model, a) for a in ("stem", "stages", "norm_pre", "forward_head")) and all(
        hasattr(s, "downsample") and hasattr(s, "blocks") for s in model.stages)


class DenseConvNeXt(nn.Module):
    """``(1, 3, H, W)`` normalised region -> predictions of every ``window`` px window on a stride grid.

    ``forward(x, stride)`` returns ``(ni, nj, M)`` where ``[i, j]`` is the network's output for the
    window with top-left corner ``(i·stride, j·stride)``, for every window that fits in the region
    (``ni = (H − window)//stride + 1``). The weights are the wrapped ConvNeXt's own (shared, not
    copied). Level 0 is the stem + stage 0 (input stride 1), level ``k >= 1`` is stage ``k`` (its
    downsample is the strided layer).
    """

    def __init__(self, convnext: nn.Module, window: int = 128) -> None:
        super().__init__()
        if not is_dense_compatible(convnext):
            raise ValueError(f"dense mode needs a timm ConvNeXt backbone, got {type(convnext).__name__}")
        if _stride_of(convnext.stages[0].downsample) != 1:
            raise ValueError("dense mode expects stage 0 without downsampling (timm ConvNeXt layout)")
        self.net = convnext
        self.level_strides = [_stride_of(convnext.stem)] + [_stride_of(s.downsample) for s in convnext.stages[1:]]
        self.feature_stride = math.prod(self.level_strides)
        if window % self.feature_stride:
            raise ValueError(f"window {window} px is not a whole number of {self.feature_stride} px feature cells")
        self.window = window
        self.cells = window // self.feature_stride

    def phase_counts(self, stride: int) -> list[int]:
        """Phases per axis run at each level for windows on a ``stride`` px grid.

        Window corners are multiples of ``g = gcd(stride, 32)``; a level with input stride ``r`` and
        factor ``f`` lays a cell grid of pitch ``r·f`` and must start it at every residue of the
        corners modulo ``r·f`` not already reached by the levels before it.
        """
        g = math.gcd(stride, self.feature_stride)
        counts, r = [], 1
        for f in self.level_strides:
            counts.append((r * f) // max(g, r) if g < r * f else 1)
            r *= f
        return counts

    def feature_maps(self, x: torch.Tensor, stride: int) -> list[tuple[tuple[int, int], torch.Tensor]]:
        """``[((oy, ox), map (1, C, h, w))]``: map cell ``(a, b)`` covers input pixels from ``(oy + 32a, ox + 32b)``."""
        phases = self.phase_counts(stride)
        out: list = []

        def run(t: torch.Tensor, level: int, offset: tuple[int, int], in_stride: int) -> None:
            if level == len(phases):
                out.append((offset, self.net.norm_pre(t)))
                return
            f, n = self.level_strides[level], phases[level]
            for py in range(n):
                for px in range(n):
                    if level == 0:
                        dy, dx = py * (f // n), px * (f // n)  # pixel shift of the stem's cell grid
                        y = self.net.stages[0](self.net.stem(t[:, :, dy:, dx:]))
                    else:
                        dy, dx = py * in_stride, px * in_stride  # one input cell = in_stride px
                        y = self.net.stages[level](t[:, :, py:, px:])
                    run(y, level + 1, (offset[0] + dy, offset[1] + dx), in_stride * f)

        run(x, 0, (0, 0), 1)  # depth-first: one phase's maps alive at a time, peak memory ~ one pass
        return out

    def forward(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"dense mode takes one region (1, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H < self.window or W < self.window:
            raise ValueError(f"region {H}×{W} is smaller than one {self.window} px window")
        ni, nj = (H - self.window) // stride + 1, (W - self.window) // stride + 1
        D, c = self.feature_stride, self.cells
        ys, xs = torch.arange(ni) * stride, torch.arange(nj) * stride
        out = None
        for (oy, ox), fmap in self.feature_maps(x, stride):
            ri = ((ys - oy) % D == 0) & (ys >= oy)
            rj = ((xs - ox) % D == 0) & (xs >= ox)
            if not ri.any() or not rj.any():
                continue
            pooled = F.avg_pool2d(fmap.float(), c, stride=1)  # (1, C, h-c+1, w-c+1): every c×c cell block
            ai, bj = ((ys[ri] - oy) // D).to(x.device), ((xs[rj] - ox) // D).to(x.device)
            feats = pooled[0][:, ai][:, :, bj]  # (C, ni', nj')
            head_in = feats.permute(1, 2, 0).reshape(-1, feats.shape[0], 1, 1).to(fmap.dtype)
            pred = self.net.forward_head(head_in).float().reshape(int(ri.sum()), int(rj.sum()), -1)
            if out is None:
                out = pred.new_zeros(ni, nj, pred.shape[-1])
            ii, jj = torch.nonzero(ri).flatten().to(x.device), torch.nonzero(rj).flatten().to(x.device)
            out[ii[:, None], jj[None, :]] = pred
        if out is None:  # every window corner is reached by some phase; kept as a guard
            raise RuntimeError("dense mode produced no window (phase bookkeeping error)")
        return out
