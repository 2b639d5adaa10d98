"""VirTues: marker-aware masked autoencoder for multiplexed images (plain ``nn.Module``).

Forward semantics follow the official ``MultiplexVirtues`` (bunnelab/virtues, c5b9eaa), see
``docs/virtues-official-layout.md``: a list of ``(C_b, H, W)`` images, a list of ``(C_b,)``
marker indices into the ESM table, an optional list of ``(C_b, H/8, W/8)`` bool masks (True =
masked) -> decoded images, patch-summary grids ``(H/8, W/8, d)`` and channel tokens
``(C_b, H/8, W/8, d)``. Channel counts may differ between samples; H and W must be shared.

State-dict keys equal the official ones, so released ``model.safetensors`` files load strictly.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..model_files import ModelFileError, load_torch_file
from ..marker_embeddings import load_marker_embeddings
from .config import VirTuesArch, read_official_config
from .decoder import VirTuesDecoder
from .encoder import VirTuesEncoder, unpatchify


class VirTuesOutput(NamedTuple):
    decoded: list[Tensor]  # (C_b, H, W) per sample
    patch_summary: list[Tensor]  # (h, w, d) per sample, after the encoder LayerNorm
    channel_tokens: list[Tensor]  # (C_b, h, w, d) per sample, after the encoder LayerNorm


class VirTuesEncoding(NamedTuple):
    patch_summary: list[Tensor]  # (h, w, d) per sample
    channel_tokens: list[Tensor]  # (C_b, h, w, d) per sample
    intermediate_patch_summary: dict[int, Tensor]  # block index -> (B, h, w, d), before final LN


class _Packed(NamedTuple):
    images: Tensor  # (sum C, H, W)
    marker_ids: Tensor  # (sum C,)
    masks: Tensor | None  # (sum C, h, w)
    counts: list[int]


class VirTues(nn.Module):
    """Encoder (factorized h/v attention over visible tokens) + per-channel decoder.

    Args:
        arch: every size and layout setting (:class:`VirTuesArch`, defaults = the released model).
            Kept as ``self.arch``; ``attention_backend`` may be switched after construction
            (benchmarks, parity tests) because it never changes the weights.
    """

    def __init__(self, arch: VirTuesArch = VirTuesArch()) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = VirTuesEncoder(arch)
        self.decoder = VirTuesDecoder(arch)
        self.marker_uniprot_ids: list[str] = []

    @property
    def patch_size(self) -> int:
        """Pixels per patch side (``arch.patch_size``); callers unpatchify with it."""
        return self.arch.patch_size

    @property
    def attention_backend(self) -> str:
        """The encoder's packed-attention kernel (``arch.attention_backend``); settable."""
        return self.arch.attention_backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        self.arch = dataclasses.replace(self.arch, attention_backend=backend)  # validated like any arch

    # ---- marker table ------------------------------------------------------------------------
    @property
    def marker_table(self) -> Tensor:
        return self.encoder.prior_bias_embeddings

    def set_marker_table(self, embeddings: Tensor, uniprot_ids: Sequence[str]) -> None:
        """Install the frozen ``(N, esm_dim)`` ESM table; row i is marker index i = ``uniprot_ids[i]``."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.encoder.esm_dim:
            raise ValueError(
                f"marker table must be (N, {self.encoder.esm_dim}), got {tuple(embeddings.shape)}"
            )
        ids = [str(u) for u in uniprot_ids]
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} table rows but {len(ids)} UniProt ids")
        dup = sorted({u for u in ids if ids.count(u) > 1})
        if dup:
            raise ValueError(f"duplicate UniProt ids in the marker table: {dup}")
        ref = self.encoder.patch_encoder.weight
        device = ref.device if ref.device.type != "meta" else "cpu"
        self.encoder.prior_bias_embeddings = embeddings.detach().to(device=device, dtype=torch.float32)
        self.marker_uniprot_ids = ids

    def load_marker_table(self, folder: str | os.PathLike, uniprot_ids: Sequence[str] | None = None) -> list[str]:
        """Load ``<folder>/<UniProtID>.pt`` files (sorted file-name order unless ``uniprot_ids``)."""
        table, ids = load_marker_embeddings(folder, uniprot_ids, expected_dim=self.encoder.esm_dim)
        self.set_marker_table(table, ids)
        return ids

    def marker_index(self, uniprot_ids: Sequence[str]) -> Tensor:
        """Marker indices (rows of the table) of the given UniProt ids; error lists unknown ids."""
        lookup = {u: i for i, u in enumerate(self.marker_uniprot_ids)}
        unknown = [u for u in uniprot_ids if u not in lookup]
        if unknown:
            raise KeyError(f"UniProt ids not in the marker table: {unknown}")
        return torch.tensor([lookup[u] for u in uniprot_ids], dtype=torch.long)

    # ---- forward -----------------------------------------------------------------------------
    def _pack(
        self, images: Sequence[Tensor], marker_ids: Sequence[Tensor], masks: Sequence[Tensor] | None
    ) -> _Packed:
        images, marker_ids = list(images), list(marker_ids)
        if len(images) == 0:
            raise ValueError("empty batch")
        if len(images) != len(marker_ids):
            raise ValueError(f"{len(images)} images but {len(marker_ids)} marker id tensors")
        H, W = images[0].shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        if max(h, w) > self.arch.rope_table_positions:
            raise ValueError(f"grid {h}x{w} exceeds the RoPE table ({self.arch.rope_table_positions} positions)")
        counts = []
        for b, (img, ids) in enumerate(zip(images, marker_ids)):
            if img.dim() != 3 or tuple(img.shape[-2:]) != (H, W):
                raise ValueError(f"image {b}: expected (C, {H}, {W}) like image 0, got {tuple(img.shape)}")
            if ids.dim() != 1 or ids.shape[0] != img.shape[0]:
                raise ValueError(f"sample {b}: {img.shape[0]} channels but marker ids of shape {tuple(ids.shape)}")
            counts.append(int(img.shape[0]))
        packed_masks = None
        if masks is not None:
            masks = list(masks)
            if len(masks) != len(images):
                raise ValueError(f"{len(images)} images but {len(masks)} masks")
            for b, (m, c) in enumerate(zip(masks, counts)):
                if tuple(m.shape) != (c, h, w):
                    raise ValueError(f"mask {b}: expected ({c}, {h}, {w}), got {tuple(m.shape)}")
            packed_masks = torch.cat(masks).to(torch.bool)
        return _Packed(torch.cat(images), torch.cat(marker_ids).long(), packed_masks, counts)

    def encode(
        self,
        images: Sequence[Tensor],
        marker_ids: Sequence[Tensor],
        masks: Sequence[Tensor] | None = None,
        return_intermediate: Sequence[int] = (),
    ) -> VirTuesEncoding:
        """Encoder only. Without masks this is the unmasked pass used for cell/niche tokens."""
        pk = self._pack(images, marker_ids, masks)
        out = self.encoder(pk.images, pk.marker_ids, pk.masks, pk.counts, return_intermediate, self.attention_backend)
        return VirTuesEncoding(
            list(out.patch_summary.unbind(0)), list(out.channel_tokens.split(pk.counts)),
            out.intermediate_patch_summary,
        )

    def forward(
        self,
        images: Sequence[Tensor],
        marker_ids: Sequence[Tensor],
        masks: Sequence[Tensor] | None = None,
    ) -> VirTuesOutput:
        """Masked autoencoding pass: returns (decoded, patch_summary, channel_tokens) lists."""
        pk = self._pack(images, marker_ids, masks)
        enc = self.encoder(pk.images, pk.marker_ids, pk.masks, pk.counts, (), self.attention_backend)
        SC, H, W = pk.images.shape
        h, w = H // self.patch_size, W // self.patch_size
        sample_of_channel = torch.repeat_interleave(
            torch.arange(len(pk.counts), device=pk.images.device),
            torch.as_tensor(pk.counts, device=pk.images.device),
        )
        patches = self.decoder(enc.patch_summary, enc.channel_tokens, sample_of_channel)
        decoded = unpatchify(patches, h, w, self.patch_size)
        return VirTuesOutput(
            list(decoded.split(pk.counts)),
            list(enc.patch_summary.unbind(0)),
            list(enc.channel_tokens.split(pk.counts)),
        )

    # ---- construction from files ---------------------------------------------------------------
    @classmethod
    def from_official_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> "VirTues":
        """Build from a ``config.json`` (dict or path) such as ``virtues_parity_small/config.json``.

        A stated ``n_parameters`` is checked against the model built, so a file that describes
        another architecture fails here rather than at the weights."""
        source = None
        if isinstance(config, (str, os.PathLike)):
            source, config = str(config), read_official_config(config)
        try:
            model = cls(VirTuesArch.from_official_config(config))
            expected = config.get("n_parameters")
            n = sum(p.numel() for p in model.parameters())
            if expected is not None and n != expected:
                raise ValueError(f"config says n_parameters={expected} but the model built from it has {n}")
        except (ValueError, NotImplementedError) as e:
            if source is None:
                raise
            raise type(e)(f"{source}: {e}") from None
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: VirTuesArch | Mapping[str, Any] | str | os.PathLike | None = None,
    ) -> "VirTues":
        """Load official-layout weights strictly.

        Args:
            path: a ``.safetensors`` file, or a folder holding ``model.safetensors`` (and
                optionally ``config.json``).
            config: the architecture (a :class:`VirTuesArch`), or a ``config.json`` dict or path;
                default = ``config.json`` next to the weights if present, else the released model.

        Raises:
            ValueError: listing missing keys, unexpected keys and shape mismatches.
        """
        path = Path(path)
        if path.is_dir():
            weights = path / "model.safetensors"
            if not weights.is_file():
                found = sorted(p.name for p in path.glob("*.safetensors"))
                if len(found) != 1:
                    raise FileNotFoundError(f"no model.safetensors in {path} (found {found})")
                weights = path / found[0]
        else:
            weights = path
        if not weights.is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")
        if config is None:
            candidate = weights.parent / "config.json"
            config = candidate if candidate.is_file() else VirTuesArch()
        model = cls(config) if isinstance(config, VirTuesArch) else cls.from_official_config(config)
        state = load_torch_file(weights, what="VirTues weights")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
            raise ModelFileError(f"{weights}: this is a Lightning checkpoint, not official-layout weights; "
                                 "pass it as --ckpt (commands) or --ckpt_path (training)")
        model.load_official_state_dict(state, source=str(weights))
        return model

    def load_official_state_dict(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Strict load with one readable error for every kind of mismatch."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or shapes:
            def show(xs: list[str]) -> str:
                return f"{len(xs)} " + (str(xs[:12]) + (" ..." if len(xs) > 12 else "") if xs else "")

            raise ValueError(
                f"{source} does not match this VirTues configuration "
                f"(d_model={self.arch.d_model}, encoder={self.arch.encoder_pattern!r}, "
                f"decoder={self.arch.decoder_pattern!r}):\n"
                f"  missing keys: {show(missing)}\n  unexpected keys: {show(unexpected)}\n"
                f"  shape mismatches: {show(shapes)}\n"
                "Pass the matching config (config.json next to the weights, or config=...)."
            )
        self.load_state_dict(state, strict=True)
