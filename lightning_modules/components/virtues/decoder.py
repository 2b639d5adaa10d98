"""VirTues decoder: one independent full-attention sequence per channel.

Why dense: every decoder sequence is ``[the sample's h*w encoded PS tokens | h*w tokens of one
channel]`` (masked positions hold LN(mask token + marker projection)), so all sequences of a batch
have the same length ``2 * h * w`` (H, W are shared by the batch). No packing is needed: the
channels become the batch axis of a plain SDPA call. Channels never see each other, which forces
the reconstruction to go through the patch-summary tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import VirTuesBlock, init_linear_xavier
from .config import VirTuesArch


class VirTuesDecoder(nn.Module):
    """Names follow the official ``MultiplexVirtuesDecoder`` (``decoder.*`` keys).

    Reads the ``decoder_*`` settings and the shared sizes of ``arch`` (validated there)."""

    def __init__(self, arch: VirTuesArch = VirTuesArch()) -> None:
        super().__init__()
        self.patch_size = arch.patch_size
        self.pattern = arch.decoder_pattern
        d = arch.d_model
        # registration order = official state_dict order
        self.multiplex_decoder_mlp = nn.Sequential(nn.Linear(d, arch.patch_size * arch.patch_size))
        self.decoder = nn.ModuleList(
            VirTuesBlock(k, d, arch.decoder_heads, arch.ffn_dim, arch.dropout, arch.layernorm_eps,
                         arch.rope_table_positions, arch.rope_base)
            for k in self.pattern
        )
        self.layer_norm = nn.LayerNorm(d, eps=arch.layernorm_eps)
        init_linear_xavier(self)

    def forward(self, patch_summary: Tensor, channel_tokens: Tensor, sample_of_channel: Tensor) -> Tensor:
        """Reconstruct every channel's patches.

        Args:
            patch_summary: (B, h, w, d) encoded PS grids.
            channel_tokens: (sum C, h, w, d) encoded channel tokens (after the encoder LN).
            sample_of_channel: (sum C,) sample index of each channel row.

        Returns:
            (sum C, h*w, patch_size**2) predicted pixels per patch.
        """
        SC, h, w, d = channel_tokens.shape
        P = h * w
        ps = patch_summary.reshape(-1, P, d).index_select(0, sample_of_channel)
        x = torch.cat((ps, channel_tokens.reshape(SC, P, d).to(ps.dtype)), dim=1)  # (SC, 2P, d)
        idx = torch.arange(P, device=x.device)
        row = torch.div(idx, w, rounding_mode="floor")
        grid_pos = (row.repeat(2), (idx % w).repeat(2))  # both halves carry (row, col)
        for block in self.decoder:
            x = block(x, None, grid_pos)
        return self.multiplex_decoder_mlp(self.layer_norm(x[:, P:]))  # LN is per token: skip PS half
