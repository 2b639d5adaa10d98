"""VirTues: marker-aware masked autoencoder for multiplexed images (plain ``nn.Module``).

Forward semantics follow the official ``MultiplexVirtues`` (bunnelab/virtues, c5b9eaa), see
``shared/docs/virtues-official-layout.md``: a list of ``(C_b, H, W)`` images, a list of ``(C_b,)``
marker indices into the ESM table, an optional list of ``(C_b, H/8, W/8)`` bool masks (True =
masked) -> decoded images, patch-summary grids ``(H/8, W/8, d)`` and channel tokens
``(C_b, H/8, W/8, d)``. Channel counts may differ between samples; H and W must be shared.

State-dict keys equal the official ones, so released ``model.safetensors`` files load strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..model_files import ModelFileError, load_torch_file
from ..marker_embeddings import load_marker_embeddings
from .attention import BACKENDS
from .decoder import VirTuesDecoder
from .encoder import VirTuesEncoder, unpatchify

#: plain config name -> official ``MultiplexVirtues`` keyword (same map as the parity fixture's).
OFFICIAL_CONSTRUCTOR_NAMES = {
    "d_model": "model_dim",
    "encoder_heads": "num_encoder_heads",
    "decoder_heads": "num_decoder_heads",
    "ffn_dim": "feedforward_dim",
    "encoder_pattern": "encoder_pattern",
    "decoder_pattern": "decoder_pattern",
    "patch_size": "patch_size",
    "marker_prior": "prior_bias_embedding_type",
    "marker_fusion": "prior_bias_embedding_fusion_type",
    "positional_embedding": "positional_embedding_type",
    "decoder_output_hidden_layers": "num_hidden_layers",
    "dropout": "dropout",
    "norm_after_encoder_and_decoder": "norm_after_encoder_decoder",
    "group_layers": "group_layers",
    "num_registers": "num_registers",
}

# config name -> VirTues constructor argument
_CONFIG_TO_ARG = {
    "d_model": "d_model",
    "encoder_heads": "encoder_heads",
    "decoder_heads": "decoder_heads",
    "ffn_dim": "ffn_dim",
    "encoder_pattern": "encoder_pattern",
    "decoder_pattern": "decoder_pattern",
    "patch_size": "patch_size",
    "esm_dim": "esm_dim",
    "dropout": "dropout",
    "layernorm_eps": "layernorm_eps",
    "rope_base": "rope_base",
    "rope_table_positions": "rope_max_positions",
}
# config name -> the only value(s) this implementation supports (the released configuration)
_CONFIG_REQUIRED = {
    "activation": ("gelu_exact_erf", "gelu"),
    "marker_prior": ("esm", "esm_learnable", "one_hot"),  # all three = frozen table + Linear (official)
    "marker_fusion": ("add",),
    "positional_embedding": ("rope",),
    "decoder_output_hidden_layers": (0, 1),  # official: n <= 1 -> a single Linear head
    "norm_after_encoder_and_decoder": (True,),
    "num_registers": (0,),
    "group_layers": (False,),
}
# descriptive keys that carry no constructor information
_CONFIG_INFO = {"head_dim", "n_markers", "mask_ratio_range", "n_parameters", "n_state_dict_entries",
                "tolerance", "official_constructor_names"}


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
        d_model: token width (512 released).
        encoder_heads, decoder_heads: attention heads (8 / 8).
        ffn_dim: feed-forward hidden width (1024).
        encoder_pattern: block letters, ``h`` spatial (RoPE), ``v`` marker, ``f`` full per sample.
        decoder_pattern: decoder block letters (only ``f``).
        patch_size: pixels per patch side (8).
        esm_dim: marker embedding size (640, ESM-2 150M).
        dropout: attention-probability and FFN dropout (0.0 released).
        layernorm_eps: LayerNorm epsilon.
        rope_base, rope_max_positions: RoPE frequency base and table length (grid positions).
        attention_backend: packed-attention backend for the encoder (see ``attention.py``).
    """

    def __init__(
        self,
        d_model: int = 512,
        encoder_heads: int = 8,
        decoder_heads: int = 8,
        ffn_dim: int = 1024,
        encoder_pattern: str = "hvhvhvhvhvhvhvhv",
        decoder_pattern: str = "ffff",
        patch_size: int = 8,
        esm_dim: int = 640,
        dropout: float = 0.0,
        layernorm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        rope_max_positions: int = 1200,
        attention_backend: str = "auto",
    ) -> None:
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend {attention_backend!r} not in {BACKENDS}")
        self.config = dict(
            d_model=d_model, encoder_heads=encoder_heads, decoder_heads=decoder_heads, ffn_dim=ffn_dim,
            encoder_pattern=encoder_pattern, decoder_pattern=decoder_pattern, patch_size=patch_size,
            esm_dim=esm_dim, dropout=dropout, layernorm_eps=layernorm_eps, rope_base=rope_base,
            rope_max_positions=rope_max_positions,
        )
        self.patch_size = patch_size
        self.rope_max_positions = rope_max_positions
        self.attention_backend = attention_backend
        self.encoder = VirTuesEncoder(
            d_model, encoder_heads, ffn_dim, encoder_pattern, patch_size, esm_dim, dropout,
            layernorm_eps, rope_max_positions, rope_base,
        )
        self.decoder = VirTuesDecoder(
            d_model, decoder_heads, ffn_dim, decoder_pattern, patch_size, dropout, layernorm_eps,
            rope_max_positions, rope_base,
        )
        self.marker_uniprot_ids: list[str] = []

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
        if max(h, w) > self.rope_max_positions:
            raise ValueError(f"grid {h}x{w} exceeds the RoPE table ({self.rope_max_positions} positions)")
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
    @staticmethod
    def config_from_dict(cfg: dict[str, Any]) -> dict[str, Any]:
        """Constructor kwargs from a plain-name config (the parity fixture's ``config.json``);
        official ``MultiplexVirtues`` keyword names are accepted too (via
        ``official_constructor_names``). Unsupported settings raise a clear error."""
        official = dict(OFFICIAL_CONSTRUCTOR_NAMES)
        official.update(cfg.get("official_constructor_names", {}) or {})
        to_plain = {v: k for k, v in official.items()}
        plain: dict[str, Any] = {}
        unknown = []
        for key, value in cfg.items():
            known = key in _CONFIG_TO_ARG or key in _CONFIG_REQUIRED or key in _CONFIG_INFO
            name = key if known else to_plain.get(key)
            if name is None:
                unknown.append(key)
            else:
                plain[name] = value
        if unknown:
            raise ValueError(
                f"unknown VirTues config keys {unknown}; known: "
                f"{sorted(set(_CONFIG_TO_ARG) | set(_CONFIG_REQUIRED) | set(_CONFIG_INFO) | set(to_plain))}"
            )
        for key, allowed in _CONFIG_REQUIRED.items():
            if key in plain and plain[key] not in allowed:
                raise NotImplementedError(
                    f"config {key}={plain[key]!r} is not supported (supported: {list(allowed)})"
                )
        kwargs = {_CONFIG_TO_ARG[k]: v for k, v in plain.items() if k in _CONFIG_TO_ARG}
        if "head_dim" in plain:
            d = kwargs.get("d_model", 512)
            for k in ("encoder_heads", "decoder_heads"):
                heads = kwargs.get(k, 8)
                if d // heads != plain["head_dim"] or d % heads:
                    raise ValueError(f"config: d_model {d} / {k} {heads} != head_dim {plain['head_dim']}")
        return kwargs

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> "VirTues":
        model = cls(**{**cls.config_from_dict(cfg), **overrides})
        expected = cfg.get("n_parameters")
        if expected is not None:
            n = sum(p.numel() for p in model.parameters())
            if n != expected:
                raise ValueError(f"config says n_parameters={expected} but the model built from it has {n}")
        return model

    @classmethod
    def from_config_json(cls, path: str | os.PathLike, **overrides: Any) -> "VirTues":
        """Build from a JSON config such as ``virtues_parity_small/config.json``."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"VirTues config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_config(cfg, **overrides)
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        config: str | os.PathLike | dict[str, Any] | None = None,
        **overrides: Any,
    ) -> "VirTues":
        """Load official-layout weights strictly.

        Args:
            path: a ``.safetensors`` file, or a folder holding ``model.safetensors`` (and
                optionally ``config.json``).
            config: a config dict or JSON path; default = ``config.json`` next to the weights if
                present, else the released architecture.

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
            config = candidate if candidate.is_file() else {}
        model = (
            cls.from_config_json(config, **overrides)
            if isinstance(config, (str, os.PathLike))
            else cls.from_config(config, **overrides)
        )
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
                f"(d_model={self.config['d_model']}, encoder={self.config['encoder_pattern']!r}, "
                f"decoder={self.config['decoder_pattern']!r}):\n"
                f"  missing keys: {show(missing)}\n  unexpected keys: {show(unexpected)}\n"
                f"  shape mismatches: {show(shapes)}\n"
                "Pass the matching config (config.json next to the weights, or config=...)."
            )
        self.load_state_dict(state, strict=True)
