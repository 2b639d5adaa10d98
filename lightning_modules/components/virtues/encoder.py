"""VirTues encoder: marker-aware tokens + patch-summary row, factorized attention on visible tokens.

Why packed: masking (60-100 % per channel) and channel dropout make every attention sequence a
different length. Only the *visible* tokens (plus the always-visible patch-summary row) enter the
blocks, MAE style; masked tokens skip every block and are only layer-normed at the end, exactly as
in the official code. All gather/scatter indices are built once per forward in
:class:`EncoderLayout`; blocks then only permute the packed tensor when the layout changes
(spatial ``h`` order <-> marker ``v`` order).

Token rows: the packed grid has ``R = B + sum(C_b)`` rows of ``P = h * w`` positions: first the B
patch-summary (PS) rows, then every channel of every sample. Row order is irrelevant to the maths
(each sequence is attended independently); putting PS rows first makes the PS grid the first
``B * P`` packed tokens in ``h`` order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .attention import PackedSegments, segment_attention_probs
from .blocks import VirTuesBlock, init_linear_xavier
from .config import VirTuesArch


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(C, H, W) -> (C, h*w, p*p); grid row-major, pixels row-in-patch then column."""
    C, H, W = images.shape
    p = patch_size
    x = images.reshape(C, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(C, (H // p) * (W // p), p * p)


def unpatchify(patches: Tensor, h: int, w: int, patch_size: int) -> Tensor:
    """Inverse of :func:`patchify`: (C, h*w, p*p) -> (C, h*p, w*p)."""
    C = patches.shape[0]
    p = patch_size
    x = patches.reshape(C, h, w, p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(C, h * p, w * p)


@dataclass
class EncoderLayout:
    """Every index tensor the encoder blocks need, computed once per forward.

    Packed tokens are stored in ``h`` order (row-major over rows x positions, visible only).
    ``perm[kind]`` maps ``h`` order to that kind's order (``None`` = identity); ``inv_perm`` undoes it.
    """

    num_samples: int
    grid: tuple[int, int]
    visible_index: Tensor  # (N,) flat index into the (R * P) row grid
    segments: dict[str, PackedSegments] = field(default_factory=dict)
    perm: dict[str, Tensor | None] = field(default_factory=dict)
    inv_perm: dict[str, Tensor | None] = field(default_factory=dict)
    grid_pos: dict[str, tuple[Tensor, Tensor] | None] = field(default_factory=dict)

    @classmethod
    def build(
        cls, visible: Tensor, channel_counts: Sequence[int], grid: tuple[int, int], kinds: set[str]
    ) -> "EncoderLayout":
        """``visible``: (sum C, P) bool, True = token enters the encoder blocks."""
        device = visible.device
        B = len(channel_counts)
        h, w = grid
        P = h * w
        counts = torch.as_tensor(list(channel_counts), device=device)
        # sample id of every row: B PS rows, then the channel rows sample by sample
        row_sample = torch.cat(
            (torch.arange(B, device=device), torch.repeat_interleave(torch.arange(B, device=device), counts))
        )
        rows_visible = torch.cat((visible.new_ones(B, P), visible), dim=0)  # (R, P)
        vis = torch.nonzero(rows_visible.flatten()).flatten()  # sorted: row-major = h order
        tok_row = torch.div(vis, P, rounding_mode="floor")
        tok_pos = vis - tok_row * P
        pos = (torch.div(tok_pos, w, rounding_mode="floor"), tok_pos % w)
        layout = cls(num_samples=B, grid=grid, visible_index=vis)
        layout.perm["h"] = layout.inv_perm["h"] = None  # storage order, also without h blocks
        layout.grid_pos["h"] = pos

        if "h" in kinds:  # one sequence per row (PS row or channel) of its visible positions
            layout.segments["h"] = PackedSegments(rows_visible.sum(1))
        if "v" in kinds:  # one sequence per (sample, position): PS token first, then channels
            key = row_sample[tok_row] * P + tok_pos
            perm = torch.argsort(key, stable=True)
            layout.segments["v"] = PackedSegments(torch.bincount(key, minlength=B * P))
            layout.perm["v"], layout.inv_perm["v"] = perm, _inverse(perm)
            layout.grid_pos["v"] = None
        if "f" in kinds:  # one sequence per sample (full attention over its visible tokens)
            key = row_sample[tok_row]
            perm = torch.argsort(key, stable=True)
            layout.segments["f"] = PackedSegments(torch.bincount(key, minlength=B))
            layout.perm["f"], layout.inv_perm["f"] = perm, _inverse(perm)
            layout.grid_pos["f"] = (pos[0][perm], pos[1][perm])
        return layout


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


@dataclass
class EncoderOutput:
    """Packed encoder results (the model splits them per sample)."""

    patch_summary: Tensor  # (B, h, w, d), after the encoder LayerNorm
    channel_tokens: Tensor  # (sum C, h, w, d), after the encoder LayerNorm (masked ones included)
    intermediate_patch_summary: dict[int, Tensor]  # block index -> (B, h, w, d), before the final LN
    #: block index -> (S, heads, L, L) post-softmax attention of that block (``return_attention``);
    #: sequences in the block's layout order, see :meth:`VirTuesEncoder.forward`.
    attention: dict[int, Tensor] = field(default_factory=dict)


def block_attention_probs(
    block: VirTuesBlock, x: Tensor, segments: PackedSegments, grid_pos: tuple[Tensor, Tensor] | None
) -> Tensor:
    """The post-softmax attention a block computes on its packed input ``x`` (pre-LN, RoPE as the
    block applies them), ``(S, heads, L, L)``; a side computation that never changes ``x``."""
    attn = block.encoder_layer.multi_head_attention
    h = block.encoder_layer.layernorm1(x)
    shape = h.shape[:-1]
    q = attn.W_q(h).view(*shape, attn.num_heads, attn.head_dim)
    k = attn.W_k(h).view(*shape, attn.num_heads, attn.head_dim)
    if attn.pos_emb is not None and block.uses_rope:
        if grid_pos is None:
            raise ValueError("this attention layer uses RoPE: grid positions are required")
        cos, sin = attn.pos_emb.angles(grid_pos[0], grid_pos[1], q.dtype)
        q, k = attn.pos_emb(q, cos, sin), attn.pos_emb(k, cos, sin)
    return segment_attention_probs(q, k, segments)


class VirTuesEncoder(nn.Module):
    """Names follow the official ``MultiplexVirtuesEncoder`` (``encoder.*`` keys).

    Reads the ``encoder_*`` settings and the shared sizes of ``arch`` (validated there)."""

    def __init__(self, arch: VirTuesArch = VirTuesArch()) -> None:
        super().__init__()
        self.d_model = arch.d_model
        self.patch_size = arch.patch_size
        self.esm_dim = arch.esm_dim
        self.pattern = arch.encoder_pattern
        d = arch.d_model
        self.patch_summary_token = nn.Parameter(torch.randn(d) / d**0.5)
        self.masked_token = nn.Parameter(torch.randn(d) / d**0.5)
        self.patch_encoder = nn.Linear(arch.patch_size * arch.patch_size, d)
        self.prior_embedding_encoder = nn.Linear(arch.esm_dim, d)
        self.layer_norm = nn.LayerNorm(d, eps=arch.layernorm_eps)
        self.encoder = nn.ModuleList(
            VirTuesBlock(k, d, arch.encoder_heads, arch.ffn_dim, arch.dropout, arch.layernorm_eps,
                         arch.rope_table_positions, arch.rope_base)
            for k in self.pattern
        )
        # Frozen ESM-2 table (N_markers, esm_dim): a fixed input, not a weight -> not saved.
        self.register_buffer("prior_bias_embeddings", torch.zeros(0, arch.esm_dim), persistent=False)
        init_linear_xavier(self)

    def marker_projection(self, marker_ids: Tensor) -> Tensor:
        """(sum C,) marker indices -> (sum C, d) projected ESM embeddings."""
        table = self.prior_bias_embeddings
        if table.shape[0] == 0:
            raise RuntimeError(
                "the marker (ESM) table is empty: call VirTues.set_marker_table(...) or "
                "VirTues.load_marker_table(folder) before running the model"
            )
        if marker_ids.numel() and (int(marker_ids.min()) < 0 or int(marker_ids.max()) >= table.shape[0]):
            raise IndexError(
                f"marker index out of range [0, {table.shape[0]}): got min {int(marker_ids.min())}, "
                f"max {int(marker_ids.max())}; marker ids must index the loaded marker table"
            )
        return self.prior_embedding_encoder(table[marker_ids])

    def forward(
        self,
        images: Tensor,
        marker_ids: Tensor,
        masks: Tensor | None,
        channel_counts: Sequence[int],
        return_intermediate: Sequence[int] = (),
        backend: str = "auto",
        return_attention: Sequence[int] = (),
    ) -> EncoderOutput:
        """Encode a packed batch.

        Args:
            images: (sum C, H, W), channels of all samples concatenated.
            marker_ids: (sum C,) int64 rows of the marker table.
            masks: (sum C, h, w) bool, True = masked; ``None`` = nothing masked.
            channel_counts: C_b per sample (sum = images.shape[0]).
            return_intermediate: block indices (0-based) after which the PS grid (before the
                final LayerNorm) is also returned (e.g. for a UNETR-style segmentation head).
            return_attention: block indices (0-based) whose post-softmax attention is returned in
                ``attention`` (opt-in inspection; the other outputs are bit-identical either way).
                Unmasked input (``masks=None``) lays the sequences out simply: a marker block
                (``v``) has ``B * h * w`` sequences, index ``b * h * w + position``, each
                ``[PS token, channel 0, ..., channel C_b - 1]`` (zero-padded to the largest C_b + 1);
                a spatial block (``h``) has one sequence per row, the B PS rows first then every
                channel of every sample, each over the ``h * w`` positions row-major.
        """
        SC, H, W = images.shape
        h, w = H // self.patch_size, W // self.patch_size
        P = h * w
        B = len(channel_counts)
        d = self.d_model

        tokens = self.patch_encoder(patchify(images, self.patch_size))  # (SC, P, d)
        if masks is not None:
            masks = masks.reshape(SC, P)
            tokens = torch.where(masks[..., None], self.masked_token.to(tokens.dtype), tokens)
        tokens = tokens + self.marker_projection(marker_ids)[:, None, :].to(tokens.dtype)
        ps = self.patch_summary_token.to(tokens.dtype).expand(B, P, d)
        rows = torch.cat((ps, tokens), dim=0).reshape((B + SC) * P, d)  # (R*P, d)

        visible = ~masks if masks is not None else torch.ones(SC, P, dtype=torch.bool, device=images.device)
        layout = EncoderLayout.build(visible, channel_counts, (h, w), set(self.pattern))
        x = rows.index_select(0, layout.visible_index)  # packed, h order

        intermediates: dict[int, Tensor] = {}
        attention: dict[int, Tensor] = {}
        order = "h"  # current order of x
        for i, block in enumerate(self.encoder):
            if block.kind != order:
                if layout.inv_perm[order] is not None:
                    x = x.index_select(0, layout.inv_perm[order])
                if layout.perm[block.kind] is not None:
                    x = x.index_select(0, layout.perm[block.kind])
                order = block.kind
            if i in return_attention:
                attention[i] = block_attention_probs(block, x, layout.segments[block.kind], layout.grid_pos[block.kind])
            x = block(x, layout.segments[block.kind], layout.grid_pos[block.kind], backend)
            if i in return_intermediate:
                x_h = x if layout.inv_perm[order] is None else x.index_select(0, layout.inv_perm[order])
                intermediates[i] = x_h[: B * P].reshape(B, h, w, d)  # PS rows come first
        if layout.inv_perm[order] is not None:
            x = x.index_select(0, layout.inv_perm[order])

        rows = rows.index_copy(0, layout.visible_index, x.to(rows.dtype))
        rows = self.layer_norm(rows).reshape(B + SC, h, w, d)
        return EncoderOutput(rows[:B], rows[B:], intermediates, attention)
