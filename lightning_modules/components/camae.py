"""CA-MAE: the channel-agnostic masked autoencoder VirTues is compared against (plain ``nn.Module``).

What the VirTues paper says about its baseline (Methods, "Comparisons and baselines"): the model of
Kraus et al. 2024 ("Masked autoencoders for microscopy are scalable learners of cellular biology")
"adopts a multi-channel tokenization strategy and an encoder-decoder framework similar to VirTues,
but with key differences: each channel is assigned a separate decoder, marker identities are not
encoded in the tokenization, and full attention is utilized"; patch size 8; patch-level
representations = "the embedded tokens averaged along the channel dimension". Everything else
follows Kraus et al.'s released CA-MAE (recursionpharma/maes_microscopy, read for behaviour only):

* Tokens: every channel is patchified on its own and projected by ONE shared linear patch embedding
  (Kraus: a 1->d convolution applied per channel, the same maths); fixed 2D sin-cos positional
  embeddings, the same for every channel; a learnable class token. No marker/channel embedding
  enters the encoder, so the encoder is equivariant to permuting the channels.
* Encoder: pre-LN ViT blocks with FULL attention over all visible tokens of a sample (every channel,
  every position, plus the class token), then LayerNorm.
* Decoder (Kraus ``CAMAEDecoder``): Linear encoder->decoder width; mask tokens at the masked spots;
  sin-cos positions plus a learned per-channel ("modality") token; one shared cross-attention of
  each channel's tokens to all tokens of the sample (no residual, as released) and a residual MLP;
  then each channel's OWN stack of transformer blocks; a shared Linear to the patch pixels.
* Loss (:func:`camae_loss`): MSE over the masked patches, mixed with a Fourier-magnitude L1 term
  at weight 0.01 (Kraus's best setting).

Choices of this implementation (documented because the paper does not fix them):

* "A separate decoder per channel" is indexed by the channel's row in the marker table (one row per
  marker of the pretraining panels), so a crop with channel dropout or shuffled channels still
  reaches each channel's own decoder. The ESM vectors are never read: only the number of rows.
  ``num_channels = 0`` builds the decoders when the table is installed (:meth:`CAMAE.set_marker_table`).
* Blocks are the project's pre-LN ``TransformerBlock`` (the same block and attention kernels as
  VirTues), not Kraus's parallel-scaling / QK-norm / LayerScale variant: Fig. 1e compares how cost
  scales with the channel count, which those block details do not change.
* The crops are the VirTues pipeline's preprocessed pixels (no extra self-standardisation) and the
  masks are the batch's (the data pipeline owns masks; the CA-MAE configs set ``mask_ratio`` to
  Kraus's 0.75).
* Defaults = Kraus's ViT-B/8 encoder (768 wide, 12 blocks, 12 heads) and the MAE decoder size
  (512 wide, 8 blocks, 16 heads) per channel. With them the parameter count at 40 markers is 25x
  VirTues' released model, the ratio the paper reports (``benchmarks.virtues_vs_camae``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .virtues.attention import BACKENDS, PackedSegments, varlen_attention
from .virtues.blocks import TransformerBlock
from .virtues.encoder import patchify, unpatchify


@dataclass(frozen=True)
class CAMAEArch:
    """Sizes of a CA-MAE (defaults: Kraus et al.'s ViT-B/8 encoder, MAE-size per-channel decoders).

    Attributes:
        d_model, encoder_depth, encoder_heads, encoder_ffn_dim: the ViT encoder.
        decoder_dim, decoder_depth, decoder_heads, decoder_ffn_dim: each channel's decoder stack.
        cross_attention_heads: heads of the shared channel-to-sample cross-attention (Kraus: 8).
        patch_size: pixels per patch side (paper: 8).
        num_channels: number of per-channel decoders (= marker-table rows); 0 = build them when
            the table is installed.
        class_token: prepend a learnable class token in the encoder (Kraus: yes).
        layernorm_eps, dropout: as named (Kraus decoder norm eps 1e-6).
        attention_backend: packed-attention kernel (speed only, never the weights).
    """

    d_model: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_ffn_dim: int = 2048
    cross_attention_heads: int = 8
    patch_size: int = 8
    num_channels: int = 0
    class_token: bool = True
    layernorm_eps: float = 1e-6
    dropout: float = 0.0
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "encoder_depth", "encoder_heads", "encoder_ffn_dim", "decoder_dim", "decoder_depth",
                     "decoder_heads", "decoder_ffn_dim", "cross_attention_heads", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CA-MAE arch: {name} must be a positive integer, got {value!r}")
        if isinstance(self.num_channels, bool) or not isinstance(self.num_channels, int) or self.num_channels < 0:
            raise ValueError(f"CA-MAE arch: num_channels must be an integer >= 0, got {self.num_channels!r}")
        for width, heads, what in ((self.d_model, self.encoder_heads, "d_model / encoder_heads"),
                                   (self.decoder_dim, self.decoder_heads, "decoder_dim / decoder_heads"),
                                   (self.decoder_dim, self.cross_attention_heads, "decoder_dim / cross_attention_heads")):
            if width % heads:
                raise ValueError(f"CA-MAE arch: {what} = {width} / {heads} is not an integer")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"CA-MAE arch: dropout must be in [0, 1), got {self.dropout}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"CA-MAE arch: attention_backend {self.attention_backend!r} is not one of {BACKENDS}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values: what checkpoints store (readable with ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CAMAEArch":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CA-MAE arch settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


class CAMAEOutput(NamedTuple):
    decoded: list[Tensor]  # (C_b, H, W) per sample
    patch_summary: list[Tensor]  # (h, w, d): encoder tokens averaged over the visible channels
    channel_tokens: list[Tensor]  # (C_b, h, w, d); zero at masked positions


class CAMAEEncoding(NamedTuple):
    patch_summary: list[Tensor]  # (h, w, d) per sample (the paper's CA-MAE patch representation)
    channel_tokens: list[Tensor]  # (C_b, h, w, d) per sample
    class_token: list[Tensor]  # (d,) per sample (zeros when the arch has no class token)


def sincos_2d(h: int, w: int, dim: int, base: float = 10000.0, device: torch.device | None = None) -> Tensor:
    """(h*w, dim) fixed positional embedding: [sin(row), cos(row), sin(col), cos(col)] blocks of
    dim/4 frequencies ``base ** (-i / (dim/4))`` (Kraus's layout); zero-padded when dim % 4."""
    quarter = dim // 4
    freq = base ** (-torch.arange(quarter, dtype=torch.float32, device=device) / max(1, quarter))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    a, b = rows.reshape(-1, 1) * freq, cols.reshape(-1, 1) * freq
    emb = torch.cat((a.sin(), a.cos(), b.sin(), b.cos()), dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class SampleCrossAttention(nn.Module):
    """Each token attends to every token of its own sample: queries from ``query_norm``-ed tokens,
    keys/values from ``context_norm``-ed ones (Kraus ``CrossAttention``: q and kv without bias).

    Kraus runs it once per channel with that channel's tokens as queries and all tokens as context;
    the weights are shared across channels, so one call with all of a sample's tokens as queries
    is the same computation."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor, segments: PackedSegments, backend: str = "auto") -> Tensor:
        n, d = queries.shape
        hd = d // self.num_heads
        q = self.q(queries).view(n, self.num_heads, hd)
        k, v = self.kv(context).view(n, 2, self.num_heads, hd).unbind(1)
        return self.proj(varlen_attention(q, k, v, segments, backend=backend).reshape(n, d))


class _Packed(NamedTuple):
    images: Tensor  # (sum C, H, W)
    marker_ids: Tensor  # (sum C,)
    masks: Tensor | None  # (sum C, h, w)
    counts: list[int]


def _block(dim: int, heads: int, ffn: int, arch: CAMAEArch) -> TransformerBlock:
    return TransformerBlock(dim, heads, ffn, arch.dropout, use_rope=False, layernorm_eps=arch.layernorm_eps)


class CAMAE(nn.Module):
    """Channel-agnostic MAE over ragged multiplex batches (same inputs and outputs as ``VirTues``)."""

    def __init__(self, arch: CAMAEArch = CAMAEArch()) -> None:
        super().__init__()
        self.arch = arch
        d, dd, eps = arch.d_model, arch.decoder_dim, arch.layernorm_eps
        self.patch_embed = nn.Linear(arch.patch_size * arch.patch_size, d)  # shared by every channel
        self.cls_token = nn.Parameter(torch.zeros(d)) if arch.class_token else None
        self.blocks = nn.ModuleList(_block(d, arch.encoder_heads, arch.encoder_ffn_dim, arch)
                                    for _ in range(arch.encoder_depth))
        self.norm = nn.LayerNorm(d, eps=eps)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(dd))
        self.query_norm = nn.LayerNorm(dd, eps=eps)
        self.context_norm = nn.LayerNorm(dd, eps=eps)
        self.out_norm = nn.LayerNorm(dd, eps=eps)
        self.cross_attention = SampleCrossAttention(dd, arch.cross_attention_heads)
        self.cross_mlp = nn.Sequential(nn.Linear(dd, 4 * dd), nn.GELU(), nn.Linear(4 * dd, dd))
        self.channel_embed = nn.Parameter(torch.zeros(0, dd))  # Kraus "modality tokens", one per decoder
        self.channel_decoders = nn.ModuleList()
        self.decoder_pred = nn.Linear(dd, arch.patch_size * arch.patch_size)
        self.marker_uniprot_ids: list[str] = []
        self._init_weights(self)
        if arch.num_channels:
            self._build_decoders(arch.num_channels)

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """MAE init: xavier-uniform Linear weights, zero biases; tokens N(0, 0.02)."""
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name in ("cls_token", "mask_token"):
            token = getattr(module, name, None)
            if isinstance(token, nn.Parameter):
                nn.init.normal_(token, std=0.02)

    def _build_decoders(self, n: int) -> None:
        a = self.arch
        device = self.decoder_pred.weight.device
        decoders = nn.ModuleList(
            nn.ModuleList(_block(a.decoder_dim, a.decoder_heads, a.decoder_ffn_dim, a) for _ in range(a.decoder_depth))
            for _ in range(n))
        self._init_weights(decoders)
        self.channel_decoders = decoders.to(device)
        self.channel_embed = nn.Parameter(torch.randn(n, a.decoder_dim, device=device) * 0.02)
        self.arch = dataclasses.replace(a, num_channels=n)

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    @property
    def num_channels(self) -> int:
        return len(self.channel_decoders)

    def set_marker_table(self, embeddings: Tensor, uniprot_ids: Sequence[str]) -> None:
        """Same call as ``VirTues.set_marker_table``; only the row count and order are used (one
        decoder per row): CA-MAE has no marker identity in its tokens."""
        ids = [str(u) for u in uniprot_ids]
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} table rows but {len(ids)} UniProt ids")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate UniProt ids in the marker table")
        if self.num_channels == 0:
            self._build_decoders(len(ids))
        elif self.num_channels != len(ids):
            raise ValueError(f"this CA-MAE has {self.num_channels} per-channel decoders but the marker table has "
                             f"{len(ids)} rows; a CA-MAE is trained for one fixed channel set")
        if self.marker_uniprot_ids and self.marker_uniprot_ids != ids:
            raise ValueError("the marker table's UniProt ids differ from the ones this CA-MAE's decoders were built for")
        self.marker_uniprot_ids = ids

    # ---- forward -----------------------------------------------------------------------------
    def _pack(self, images: Sequence[Tensor], marker_ids: Sequence[Tensor], masks: Sequence[Tensor] | None) -> _Packed:
        images, marker_ids = list(images), list(marker_ids)
        if not images or len(images) != len(marker_ids):
            raise ValueError(f"{len(images)} images but {len(marker_ids)} marker id tensors (need >= 1 of each)")
        H, W = images[0].shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        counts = []
        for b, (img, ids) in enumerate(zip(images, marker_ids)):
            if img.dim() != 3 or tuple(img.shape[-2:]) != (H, W) or ids.dim() != 1 or ids.shape[0] != img.shape[0]:
                raise ValueError(f"sample {b}: image {tuple(img.shape)} with marker ids {tuple(ids.shape)}")
            counts.append(int(img.shape[0]))
        packed_masks = None
        if masks is not None:
            masks = list(masks)
            for b, (m, c) in enumerate(zip(masks, counts)):
                if tuple(m.shape) != (c, H // p, W // p):
                    raise ValueError(f"mask {b}: expected ({c}, {H // p}, {W // p}), got {tuple(m.shape)}")
            packed_masks = torch.cat(masks).to(torch.bool)
        ids = torch.cat(marker_ids).long()
        if self.num_channels and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_channels):
            raise IndexError(f"marker index out of range [0, {self.num_channels}): one decoder per table row")
        return _Packed(torch.cat(images), ids, packed_masks, counts)

    def _encode_packed(self, pk: _Packed) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (encoded visible tokens (N, d) in [cls, tokens] order per sample, their flat index in
        the (sum C * P) token grid (-1 for cls), visible (sum C, P), segments lengths)."""
        SC, H, W = pk.images.shape
        p = self.patch_size
        h, w = H // p, W // p
        P, B, d = h * w, len(pk.counts), self.arch.d_model
        device = pk.images.device
        tokens = self.patch_embed(patchify(pk.images, p)) + sincos_2d(h, w, d, device=device).to(pk.images.dtype)
        visible = ~pk.masks.reshape(SC, P) if pk.masks is not None else torch.ones(SC, P, dtype=torch.bool, device=device)
        flat = torch.nonzero(visible.flatten()).flatten()  # row-major: sample by sample
        sample_of_row = torch.repeat_interleave(torch.arange(B, device=device), torch.as_tensor(pk.counts, device=device))
        tok_sample = sample_of_row[torch.div(flat, P, rounding_mode="floor")]
        x = tokens.reshape(SC * P, d).index_select(0, flat)
        index = flat
        if self.cls_token is not None:  # one class token per sample, first in its sequence (stable sort)
            x = torch.cat((self.cls_token.to(x.dtype).expand(B, d), x))
            index = torch.cat((flat.new_full((B,), -1), flat))
            tok_sample = torch.cat((torch.arange(B, device=device), tok_sample))
        order = torch.argsort(tok_sample, stable=True)
        x, index = x[order], index[order]
        lengths = torch.bincount(tok_sample, minlength=B)
        segments = PackedSegments(lengths)
        for block in self.blocks:
            x = block(x, segments, None, self.arch.attention_backend)
        return self.norm(x), index, visible, lengths

    def _unpack(self, x: Tensor, index: Tensor, visible: Tensor, pk: _Packed) -> tuple[Tensor, Tensor, Tensor]:
        """Encoded tokens -> (channel tokens (sum C, P, d) zero where masked, patch summary (B, P, d)
        = mean over visible channels, class tokens (B, d))."""
        SC, P = visible.shape
        B, d = len(pk.counts), x.shape[-1]
        is_tok = index >= 0
        grid = x.new_zeros(SC * P, d).index_copy(0, index[is_tok], x[is_tok]).reshape(SC, P, d)
        cls = x[~is_tok] if self.cls_token is not None else x.new_zeros(B, d)
        counts = torch.as_tensor(pk.counts, device=x.device)
        sample_of_row = torch.repeat_interleave(torch.arange(B, device=x.device), counts)
        summed = x.new_zeros(B, P, d).index_add(0, sample_of_row, grid)
        n_vis = torch.zeros(B, P, device=x.device).index_add(0, sample_of_row, visible.float())
        return grid, summed / n_vis.clamp(min=1).unsqueeze(-1).to(x.dtype), cls

    def encode(self, images: Sequence[Tensor], marker_ids: Sequence[Tensor],
               masks: Sequence[Tensor] | None = None) -> CAMAEEncoding:
        """Encoder only (no masks = the pass used for cell/niche tokens). ``marker_ids`` are only
        checked: the encoder never reads them."""
        pk = self._pack(images, marker_ids, masks)
        x, index, visible, _ = self._encode_packed(pk)
        grid, summary, cls = self._unpack(x, index, visible, pk)
        h, w = (s // self.patch_size for s in pk.images.shape[-2:])
        return CAMAEEncoding(list(summary.reshape(-1, h, w, summary.shape[-1]).unbind(0)),
                             list(grid.reshape(-1, h, w, grid.shape[-1]).split(pk.counts)), list(cls.unbind(0)))

    def forward(self, images: Sequence[Tensor], marker_ids: Sequence[Tensor],
                masks: Sequence[Tensor] | None = None) -> CAMAEOutput:
        """Masked autoencoding pass: (decoded, patch_summary, channel_tokens) lists like ``VirTues``."""
        if self.num_channels == 0:
            raise RuntimeError("CA-MAE has no per-channel decoders yet: set the marker table (or arch.num_channels)")
        pk = self._pack(images, marker_ids, masks)
        x, index, visible, _ = self._encode_packed(pk)
        grid, summary, _ = self._unpack(x, index, visible, pk)
        SC, P = visible.shape
        h, w = (s // self.patch_size for s in pk.images.shape[-2:])
        dd = self.arch.decoder_dim
        # decoder input: projected visible tokens, mask tokens elsewhere (Kraus drops the class token here)
        is_tok = index >= 0
        z = self.mask_token.to(x.dtype).expand(SC * P, dd).index_copy(0, index[is_tok], self.decoder_embed(x[is_tok]))
        z = z.reshape(SC, P, dd) + sincos_2d(h, w, dd, device=z.device).to(z.dtype) \
            + self.channel_embed[pk.marker_ids][:, None, :].to(z.dtype)
        z = z.reshape(SC * P, dd)  # rows sample by sample: one full-attention segment per sample
        segments = PackedSegments(torch.as_tensor(pk.counts, device=z.device) * P)
        z = self.cross_attention(self.query_norm(z), self.context_norm(z), segments, self.arch.attention_backend)
        z = (z + self.cross_mlp(self.out_norm(z))).reshape(SC, P, dd)
        out = torch.empty_like(z)
        for m in torch.unique(pk.marker_ids).tolist():  # each channel through its own decoder
            rows = torch.nonzero(pk.marker_ids == m).flatten()
            y = z.index_select(0, rows)
            for block in self.channel_decoders[m]:
                y = block(y)
            out.index_copy_(0, rows, y)
        decoded = unpatchify(self.decoder_pred(out), h, w, self.patch_size)
        d = self.arch.d_model
        return CAMAEOutput(list(decoded.split(pk.counts)), list(summary.reshape(-1, h, w, d).unbind(0)),
                           list(grid.reshape(SC, h, w, d).split(pk.counts)))


def camae_loss(decoded: Sequence[Tensor], images: Sequence[Tensor], masks: Sequence[Tensor], patch_size: int,
               fourier_weight: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """Kraus et al.'s objective: ``(1 - w) * MSE(masked patches) + w * Fourier L1``.

    MSE: per patch the mean squared pixel error, averaged over the masked patches of the batch
    (all patches when nothing is masked). Fourier term: L1 between the magnitudes of the 2D FFT
    (``norm="ortho"``, so its scale matches the pixels') of each reconstructed and original channel,
    averaged over all frequencies of all channels (a frequency is not local to a patch).
    (Kraus's released code takes the FFT of the patch-flattened token tensor; the per-channel image
    FFT is the loss the paper describes.) Returns (total, mse, fourier).
    """
    if not 0.0 <= fourier_weight < 1.0:
        raise ValueError(f"fourier_weight must be in [0, 1) (a mixing factor), got {fourier_weight}")
    pred = torch.cat([x.float() for x in decoded])
    target = torch.cat([x.float() for x in images])
    mask = torch.cat(list(masks)).reshape(pred.shape[0], -1).float()
    per_patch = patchify(pred - target, patch_size).square().mean(-1)  # (sum C, P)
    mse = (per_patch * mask).sum() / mask.sum() if bool(mask.sum() > 0) else per_patch.mean()
    fourier = pred.new_zeros(())
    if fourier_weight > 0:
        fourier = (torch.fft.fft2(pred, norm="ortho").abs() - torch.fft.fft2(target, norm="ortho").abs()).abs().mean()
    return (1.0 - fourier_weight) * mse + fourier_weight * fourier, mse, fourier


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoder_parameters_per_channel(arch: CAMAEArch) -> int:
    """Parameters one more channel adds: its decoder stack plus its channel token (closed form)."""
    dd, f = arch.decoder_dim, arch.decoder_ffn_dim
    attention = 4 * (dd * dd + dd)
    ffn = dd * f + f + f * dd + dd
    norms = 2 * 2 * dd
    return arch.decoder_depth * (attention + ffn + norms) + dd


__all__ = ["CAMAE", "CAMAEArch", "CAMAEEncoding", "CAMAEOutput", "SampleCrossAttention", "camae_loss",
           "count_parameters", "decoder_parameters_per_channel", "sincos_2d"]
