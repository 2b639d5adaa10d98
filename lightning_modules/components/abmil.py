"""Gated attention-based multiple-instance learning (Ilse et al. 2018), multi-head, for tissue labels.

VirTues (Methods, "Tissue-level tasks") classifies a tissue from the set of all its patch-summary
tokens with a gated ABMIL: attention computed over eight heads, each with a hidden dimension of 256,
the heads' attention-weighted averages concatenated and projected to class logits. A bag is a
padded (N, d) set; padding never receives attention, so a tissue's prediction does not depend on
how many other tissues share its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedAttentionMIL(nn.Module):
    """Bags of instances ``(B, N, in_dim)`` (+ a validity mask) → class logits ``(B, num_classes)``."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_heads = num_heads
        self.attention_v = nn.Linear(in_dim, hidden_dim * num_heads)  # tanh branch
        self.attention_u = nn.Linear(in_dim, hidden_dim * num_heads)  # sigmoid gate
        self.attention_w = nn.Parameter(torch.empty(num_heads, hidden_dim))  # one scoring vector per head
        nn.init.xavier_uniform_(self.attention_w)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim * num_heads, num_classes)

    def attention(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, heads, N) attention weights, zero on padding, summing to 1 over each bag's instances."""
        b, n, _ = x.shape
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))  # (B, N, heads*hidden)
        scores = torch.einsum("bnhk,hk->bhn", gated.view(b, n, self.num_heads, -1), self.attention_w)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (logits (B, C), attention (B, heads, N))."""
        weights = self.attention(x, mask)
        pooled = torch.einsum("bhn,bnd->bhd", weights, x).flatten(1)  # heads concatenated
        return self.classifier(self.dropout(pooled)), weights
