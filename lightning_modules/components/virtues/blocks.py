"""Pre-LN transformer blocks of VirTues, with the official module/state_dict names.

Key names (``multi_head_attention.W_q`` ..., ``feedforward.0``/``.3``, ``layernorm1``/``2``, and the
``encoder_layer`` wrapper level) are kept exactly so released weights load strictly.

A block works on either
- a *packed* token tensor ``(N, d)`` plus :class:`PackedSegments` (variable-length sequences:
  the encoder's spatial ``h``, marker ``v`` and per-sample ``f`` attention), or
- a *dense* batch ``(S, L, d)`` with ``segments=None`` (the decoder, whose sequences all have the
  same length ``2 * h * w``), which goes straight to PyTorch SDPA.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PackedSegments, varlen_attention
from .rope import RotaryEmbedding2D

#: Block letters: h = spatial (within one channel row, RoPE), v = marker (across channels at one
#: position, no RoPE), f = full attention over a whole sequence (RoPE).
BLOCK_KINDS = {"h": True, "v": False, "f": True}  # letter -> uses RoPE


class MultiHeadAttention(nn.Module):
    """Four separate biased projections (W_q, W_k, W_v, W_o), optional 2D RoPE on q and k."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dropout: float = 0.0,
        use_rope: bool = False,
        rope_max_positions: int = 1200,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.W_q = nn.Linear(dim, dim)
        self.W_k = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.W_o = nn.Linear(dim, dim)
        self.pos_emb = (
            RotaryEmbedding2D(self.head_dim, rope_max_positions, rope_base) if use_rope else None
        )

    def forward(
        self,
        x: Tensor,
        segments: PackedSegments | None = None,
        grid_pos: tuple[Tensor, Tensor] | None = None,
        backend: str = "auto",
    ) -> Tensor:
        """``x``: packed ``(N, d)`` with ``segments``, or dense ``(S, L, d)`` without.

        ``grid_pos``: (row, col) patch-grid indices, shape ``(N,)`` (packed) or ``(L,)`` (dense).
        """
        shape = x.shape[:-1]
        q = self.W_q(x).view(*shape, self.num_heads, self.head_dim)
        k = self.W_k(x).view(*shape, self.num_heads, self.head_dim)
        v = self.W_v(x).view(*shape, self.num_heads, self.head_dim)
        if self.pos_emb is not None:
            if grid_pos is None:
                raise ValueError("this attention layer uses RoPE: grid positions are required")
            cos, sin = self.pos_emb.angles(grid_pos[0], grid_pos[1], q.dtype)
            q = self.pos_emb(q, cos, sin)
            k = self.pos_emb(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if segments is not None:
            out = varlen_attention(q, k, v, segments, backend=backend, dropout_p=p)
        else:  # dense (S, L, H, D) -> SDPA picks flash / memory-efficient / math itself
            out = F.scaled_dot_product_attention(
                q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), dropout_p=p
            ).transpose(-3, -2)
        return self.W_o(out.reshape(*shape, -1))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x += Attn(LN1 x); x += FFN(LN2 x)`` (exact-erf GELU)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        use_rope: bool = False,
        layernorm_eps: float = 1e-5,
        rope_max_positions: int = 1200,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        # registration order = official state_dict order
        self.multi_head_attention = MultiHeadAttention(
            dim, num_heads, dropout, use_rope, rope_max_positions, rope_base
        )
        self.feedforward = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.layernorm1 = nn.LayerNorm(dim, eps=layernorm_eps)
        self.layernorm2 = nn.LayerNorm(dim, eps=layernorm_eps)

    def forward(
        self,
        x: Tensor,
        segments: PackedSegments | None = None,
        grid_pos: tuple[Tensor, Tensor] | None = None,
        backend: str = "auto",
    ) -> Tensor:
        x = x + self.multi_head_attention(self.layernorm1(x), segments, grid_pos, backend)
        return x + self.feedforward(self.layernorm2(x))


class VirTuesBlock(nn.Module):
    """One encoder/decoder block of a given kind; the extra ``encoder_layer`` level mirrors the
    official ``*AttentionEncoderBlock`` wrappers so state_dict keys match."""

    def __init__(
        self,
        kind: str,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float = 0.0,
        layernorm_eps: float = 1e-5,
        rope_max_positions: int = 1200,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block letter {kind!r}; VirTues blocks are one of 'h', 'v', 'f'")
        self.kind = kind
        self.encoder_layer = TransformerBlock(
            dim, num_heads, ffn_dim, dropout, BLOCK_KINDS[kind], layernorm_eps,
            rope_max_positions, rope_base,
        )

    @property
    def uses_rope(self) -> bool:
        return BLOCK_KINDS[self.kind]

    def forward(
        self,
        x: Tensor,
        segments: PackedSegments | None = None,
        grid_pos: tuple[Tensor, Tensor] | None = None,
        backend: str = "auto",
    ) -> Tensor:
        return self.encoder_layer(x, segments, grid_pos if self.uses_rope else None, backend)


def init_linear_xavier(module: nn.Module) -> None:
    """Official init: xavier-normal Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "BLOCK_KINDS", "MultiHeadAttention", "TransformerBlock", "VirTuesBlock", "init_linear_xavier",
]
