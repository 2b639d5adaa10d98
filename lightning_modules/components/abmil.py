"""Gated attention-based multiple-instance learning (Ilse et al. 2018), multi-head, for tissue labels.

VirTues (Methods, "Aggregation into ... tissue-level representations" and "Tissue-level tasks")
classifies a tissue from the set of all its patch-summary tokens ``c`` with a gated ABMIL:

    a_ij^h = softmax_ij( w_h^T (tanh(V c_ij) ⊙ σ(U c_ij)) ),    z = concat_h  Σ_ij a_ij^h c_ij

with ``U, V ∈ R^{d_hidden × d_model}`` **shared by all heads** and only the scoring vector ``w_h``
differing per head ("this computation is repeated for each head with a different weight vector
w^h"); 8 heads, ``d_hidden`` 256. U and V carry no bias, as in the formula. The concatenated heads
are projected to class logits. A bag is a padded (N, d) set; padding never receives attention, so a
tissue's prediction does not depend on how many other tissues share its batch.
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
        if num_heads < 1 or hidden_dim < 1:
            raise ValueError(f"num_heads and hidden_dim must be >= 1, got {num_heads} and {hidden_dim}")
        self.num_heads = num_heads
        self.attention_v = nn.Linear(in_dim, hidden_dim, bias=False)  # V: tanh branch, shared by the heads
        self.attention_u = nn.Linear(in_dim, hidden_dim, bias=False)  # U: sigmoid gate, shared by the heads
        self.attention_w = nn.Parameter(torch.empty(num_heads, hidden_dim))  # w^h: one scoring vector per head
        nn.init.xavier_uniform_(self.attention_w)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim * num_heads, num_classes)

    def attention(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, heads, N) attention weights, zero on padding, summing to 1 over each bag's instances."""
        gated = torch.tanh(self.attention_v(x)) * torch.sigmoid(self.attention_u(x))  # (B, N, hidden)
        scores = torch.einsum("bnk,hk->bhn", gated, self.attention_w)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (logits (B, C), attention (B, heads, N))."""
        weights = self.attention(x, mask)
        pooled = torch.einsum("bhn,bnd->bhd", weights, x).flatten(1)  # heads concatenated
        return self.classifier(self.dropout(pooled)), weights
