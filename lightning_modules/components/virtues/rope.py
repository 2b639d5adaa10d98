"""2D rotary position embedding (RoPE) on the patch grid, laid out like the official VirTues.

Why this exact layout: the released weights carry the sin/cos tables as *persistent* buffers
under ``...multi_head_attention.pos_emb.rope1d.{sin,cos}`` (shape ``(1200, head_dim // 2)``),
so the module tree must reproduce those names for a strict ``load_state_dict``.

Per head (head_dim ``D``), the first ``D/2`` dims are rotated by the grid ROW index and the last
``D/2`` by the grid COLUMN index. Inside each half the "rotate-half" (GPT-NeoX) pairing is used:
pairs ``(k, k + D/4)`` with frequency ``base ** (-2k / (D/2))``. Positions are integer patch-grid
indices (no centring, no scaling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim (GPT-NeoX convention, not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding1D(nn.Module):
    """Holds the sin/cos tables of one axis; values follow the official float32 recipe."""

    def __init__(self, dim: int, max_positions: int = 1200, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE dim must be even, got {dim}")
        self.dim = dim
        self.max_positions = max_positions
        self.base = base
        sin, cos = self._tables(dim, max_positions, base)
        # Persistent on purpose: the released state_dict contains them (24 keys at full size).
        self.register_buffer("sin", sin, persistent=True)
        self.register_buffer("cos", cos, persistent=True)

    @staticmethod
    def _tables(dim: int, max_positions: int, base: float) -> tuple[Tensor, Tensor]:
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # each half-block repeated: rotate-half layout
        return emb.sin(), emb.cos()


class RotaryEmbedding2D(nn.Module):
    """Row/column RoPE for one attention head size; applied identically to every head."""

    def __init__(self, head_dim: int, max_positions: int = 1200, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.rope1d = RotaryEmbedding1D(head_dim // 2, max_positions, base)

    def angles(self, row: Tensor, col: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin of shape ``row.shape + (1, head_dim)`` (the 1 broadcasts over heads)."""
        # Range (< max_positions) is checked once per forward by the model, from the grid shape.
        cos = torch.cat((self.rope1d.cos[row], self.rope1d.cos[col]), dim=-1).to(dtype)
        sin = torch.cat((self.rope1d.sin[row], self.rope1d.sin[col]), dim=-1).to(dtype)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate ``x`` of shape ``(..., heads, head_dim)`` with tables from :meth:`angles`."""
        half = self.head_dim // 2
        x_row, x_col = x[..., :half], x[..., half:]
        rotated = torch.cat((_rotate_half(x_row), _rotate_half(x_col)), dim=-1)
        return x * cos + rotated * sin
