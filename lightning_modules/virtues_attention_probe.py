"""VirTues attention readouts (paper Suppl. Fig. 20; Methods "Model inspection and visualization").

* :func:`marker_attention`: the post-softmax weights of a marker-attention layer of the unmasked
  encoder pass, arranged ``α[b, h, m', m, i, j]`` with the patch-summary token left out (the
  importance scores of :mod:`analysis.virtues_attention` are computed from them).
* :class:`ChannelSummaryVirTues`: "Since the pretrained VirTues inherently does not have a [CLS]
  token, we augment VirTues with learnable channel summary tokens (one for each channel, including
  the patch summary token channel), which are spatially placed at the center of the input image."
  Each channel row (the PS row first) gets one extra token at the grid centre (its RoPE position):
  it takes part in that row's spatial attention and, at marker-attention blocks, the summary tokens
  of all channels attend to each other like the tokens of one more position. The encoded summary
  token of the PS row is classified by a linear head; the attention map is the weight from that
  token to each PS token in the penultimate spatial-attention layer.
* :class:`AttentionProbeModule`: fine-tunes the augmented model on a tissue label per crop
  (``finetune="all"``, as the paper fine-tunes the augmented model; ``"summary"`` trains only the
  summary tokens and the head, for a fixed encoder).

The augmented forward is dense (every crop of a batch shares one panel, nothing is masked), so all
sequences have equal length; it runs the encoder's own blocks and reproduces the packed encoder's
PS grid when the summary tokens are left out (tested).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.virtues import PackedSegments, VirTues, patchify
from lightning_modules.components.virtues.encoder import block_attention_probs


def first_marker_layer(pattern: str) -> int:
    """Index of the first marker-attention (``v``) block: the importance-score layer."""
    if "v" not in pattern:
        raise ValueError(f"encoder pattern {pattern!r} has no marker-attention (v) block")
    return pattern.index("v")


def penultimate_spatial_layer(pattern: str) -> int:
    """Index of the penultimate spatial-attention (``h``) block (the last one if there is only one)."""
    spatial = [i for i, k in enumerate(pattern) if k == "h"]
    if not spatial:
        raise ValueError(f"encoder pattern {pattern!r} has no spatial-attention (h) block")
    return spatial[-2] if len(spatial) > 1 else spatial[0]


@torch.no_grad()
def marker_attention(model: VirTues, crops: Tensor, marker_ids: Tensor, layer: int | None = None) -> Tensor:
    """``(B, C, H, W)`` preprocessed crops of one panel → ``α (B, heads, C, C, h, w)``: ``α[b, k, m', m, i, j]``
    is how much marker ``m'`` attends to marker ``m`` in head ``k`` at position ``(i, j)`` in the
    marker-attention block ``layer`` (default: the first), the PS token's row and column removed."""
    layer = first_marker_layer(model.arch.encoder_pattern) if layer is None else layer
    if model.arch.encoder_pattern[layer] != "v":
        raise ValueError(f"encoder block {layer} is {model.arch.encoder_pattern[layer]!r}, not a marker (v) block")
    B, C, H, W = crops.shape
    p = model.patch_size
    h, w = H // p, W // p
    out = model.encoder(crops.reshape(B * C, H, W), marker_ids.repeat(B), None, [C] * B, (), model.attention_backend,
                        return_attention=[layer])
    probs = out.attention[layer]  # (B * h * w, heads, 1 + C, 1 + C), PS token first
    probs = probs.reshape(B, h, w, probs.shape[1], C + 1, C + 1)[..., 1:, 1:]
    return probs.permute(0, 3, 4, 5, 1, 2)


class ChannelSummaryVirTues(nn.Module):
    """A VirTues encoder with one learnable summary token per channel (PS row included) at the grid
    centre, and a linear head on the encoded summary token of the PS row."""

    def __init__(self, model: VirTues, num_channels: int, num_classes: int) -> None:
        super().__init__()
        self.virtues = model
        d = model.arch.d_model
        self.channel_summary = nn.Parameter(torch.randn(num_channels + 1, d) / d**0.5)
        self.head = nn.Linear(d, num_classes)

    def _grid_pos(self, h: int, w: int, summary: bool, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(h * w, device=device)
        rows, cols = torch.div(pos, w, rounding_mode="floor"), pos % w
        if summary:  # the summary token sits at the centre of the grid
            rows = torch.cat((rows, rows.new_tensor([h // 2])))
            cols = torch.cat((cols, cols.new_tensor([w // 2])))
        return rows, cols

    def forward(self, crops: Tensor, marker_ids: Tensor, attention_layer: int | None = None,
                summary: bool = True) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """``crops (B, C, H, W)`` of the panel ``marker_ids (C,)`` → (logits (B, classes) or None without
        summary tokens, PS grid (B, h, w, d) after the encoder LayerNorm, attention (B, heads, h, w) from
        the PS row's summary token to the PS tokens in block ``attention_layer``, or None)."""
        enc = self.virtues.encoder
        B, C, H, W = crops.shape
        p = enc.patch_size
        h, w = H // p, W // p
        P, d = h * w, enc.d_model
        tokens = enc.patch_encoder(patchify(crops.reshape(B * C, H, W), p)).reshape(B, C, P, d)
        tokens = tokens + enc.marker_projection(marker_ids)[None, :, None, :]
        ps = enc.patch_summary_token.expand(B, 1, P, d)
        x = torch.cat((ps, tokens), dim=1)  # (B, C + 1, P, d), PS row first
        if summary:
            x = torch.cat((x, self.channel_summary[None, :, None, :].expand(B, C + 1, 1, d)), dim=2)
        L_ = x.shape[2]
        rows, cols = self._grid_pos(h, w, summary, crops.device)
        grid_pos = (rows.repeat(B * (C + 1)), cols.repeat(B * (C + 1)))
        spatial = PackedSegments(torch.full((B * (C + 1),), L_, device=crops.device))
        marker = PackedSegments(torch.full((B * L_,), C + 1, device=crops.device))
        backend = self.virtues.attention_backend
        attention = None
        for i, block in enumerate(enc.encoder):
            if block.kind == "h":
                flat = x.reshape(-1, d)
                if i == attention_layer:
                    if not summary:
                        raise ValueError("the attention map needs the summary tokens (summary=True)")
                    probs = block_attention_probs(block, flat, spatial, grid_pos)  # (B*(C+1), heads, L, L)
                    attention = probs.reshape(B, C + 1, -1, L_, L_)[:, 0, :, P, :P].reshape(B, -1, h, w)
                x = block(flat, spatial, grid_pos, backend).reshape(B, C + 1, L_, d)
            elif block.kind == "v":
                flat = x.transpose(1, 2).reshape(-1, d)  # (B, L, C + 1, d) packed: one sequence per position
                x = block(flat, marker, None, backend).reshape(B, L_, C + 1, d).transpose(1, 2)
            else:
                raise ValueError("the channel-summary probe supports spatial (h) and marker (v) blocks only")
        x = enc.layer_norm(x)
        logits = self.head(x[:, 0, P]) if summary else None
        return logits, x[:, 0, :P].reshape(B, h, w, d), attention


class AttentionProbeModule(L.LightningModule):
    """Fine-tunes :class:`ChannelSummaryVirTues` on a per-crop tissue label (cross-entropy, AdamW)."""

    def __init__(self, net: ChannelSummaryVirTues, marker_ids: Tensor, lr: float = 1e-4, weight_decay: float = 0.0,
                 finetune: str = "all"):
        super().__init__()
        if finetune not in ("all", "summary"):
            raise ValueError(f"finetune must be 'all' or 'summary', got {finetune!r}")
        self.save_hyperparameters(ignore=["net", "marker_ids"])
        self.net = net
        self.register_buffer("marker_ids", marker_ids.long(), persistent=False)
        for param in net.virtues.parameters():
            param.requires_grad_(finetune == "all")
        self.train_history: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        crops, labels = batch
        logits, _, _ = self.net(crops, self.marker_ids)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, batch_size=len(labels), on_epoch=True, on_step=False, prog_bar=True)
        self.train_history.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
