"""The VirTues architecture as one value: :class:`VirTuesArch`.

Why one frozen dataclass: the model, its encoder and decoder, the LightningModule and the
LightningCLI (``model.arch.*`` keys) all need the same dozen sizes. Passing one validated value
keeps them from drifting apart, and checks every size once, with an error that names the setting,
before any layer is built.

Field names are the plain names of the official-layout ``config.json`` (the parity fixture's, see
``docs/virtues-official-layout.md``), so reading and writing that file is a filter, not a
translation. The official ``MultiplexVirtues`` keyword names (``model_dim``, ...) are accepted as
aliases when reading.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .attention import BACKENDS
from .blocks import BLOCK_KINDS

#: Block letters each half of the model may use (``h`` spatial, ``v`` marker, ``f`` full attention).
ENCODER_LETTERS = "hvf"
DECODER_LETTERS = "f"

#: plain ``config.json`` name -> official ``MultiplexVirtues`` keyword (written to ``config.json``
#: as ``official_constructor_names``; a file may extend it with its own map of the same name).
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

#: ``config.json`` settings this implementation does not vary: name -> (value written, values read).
#: Every accepted value builds the same modules as the released model (official code: the three
#: marker priors are one frozen table + Linear; ``num_hidden_layers`` <= 1 is a single Linear head).
FIXED_SETTINGS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "activation": ("gelu_exact_erf", ("gelu_exact_erf", "gelu")),
    "marker_prior": ("esm", ("esm", "esm_learnable", "one_hot")),
    "marker_fusion": ("add", ("add",)),
    "positional_embedding": ("rope", ("rope",)),
    "decoder_output_hidden_layers": (0, (0, 1)),
    "norm_after_encoder_and_decoder": (True, (True,)),
    "num_registers": (0, (0,)),
    "group_layers": (False, (False,)),
}

#: ``config.json`` keys that describe a file or a run, not the modules (``head_dim`` is checked).
DESCRIPTIVE_KEYS = frozenset({"head_dim", "n_markers", "mask_ratio_range", "n_parameters",
                              "n_state_dict_entries", "tolerance", "official_constructor_names"})


@dataclass(frozen=True)
class VirTuesArch:
    """Sizes and layout of a VirTues model; defaults = the released model (bunnelab/virtues).

    Attributes:
        d_model: token width (512).
        encoder_heads, decoder_heads: attention heads (8 / 8); ``d_model`` must divide by both.
        ffn_dim: feed-forward hidden width (1024).
        encoder_pattern: one letter per encoder block: ``h`` spatial (RoPE), ``v`` marker,
            ``f`` full attention over a sample.
        decoder_pattern: one letter per decoder block (only ``f``).
        patch_size: pixels per patch side (8); crops must be multiples of it.
        esm_dim: width of the frozen marker (ESM-2) embeddings (640 for esm2_t30_150M).
        dropout: attention-probability and feed-forward dropout (0.0 released).
        layernorm_eps: LayerNorm epsilon (1e-5).
        rope_base: RoPE frequency base (10000).
        rope_table_positions: length of the RoPE sin/cos tables in grid positions (1200); the
            tables are weights of the state dict, so this must match the file loaded.
        attention_backend: packed-attention kernel of the encoder (``attention.BACKENDS``); changes
            speed and rounding only, never the weights.
    """

    d_model: int = 512
    encoder_heads: int = 8
    decoder_heads: int = 8
    ffn_dim: int = 1024
    encoder_pattern: str = "hvhvhvhvhvhvhvhv"
    decoder_pattern: str = "ffff"
    patch_size: int = 8
    esm_dim: int = 640
    dropout: float = 0.0
    layernorm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_table_positions: int = 1200
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"VirTues arch: {f.name} must be an integer, got {value!r}")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"VirTues arch: {f.name} must be a number, got {value!r}")
                object.__setattr__(self, f.name, float(value))  # 10000 and 10000.0: one value, one dump
            if f.type == "str" and not isinstance(value, str):
                raise ValueError(f"VirTues arch: {f.name} must be a string, got {value!r}")
        for name in ("d_model", "encoder_heads", "decoder_heads", "ffn_dim", "patch_size", "esm_dim",
                     "rope_table_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"VirTues arch: {name} must be at least 1, got {getattr(self, name)}")
        check_pattern(self.encoder_pattern, ENCODER_LETTERS, "VirTues arch: encoder")
        check_pattern(self.decoder_pattern, DECODER_LETTERS, "VirTues arch: decoder")
        for half, heads, pattern in (("encoder", self.encoder_heads, self.encoder_pattern),
                                     ("decoder", self.decoder_heads, self.decoder_pattern)):
            if self.d_model % heads:
                raise ValueError(f"VirTues arch: d_model {self.d_model} is not divisible by {half}_heads {heads}")
            uses_rope = any(BLOCK_KINDS[letter] for letter in pattern)
            if uses_rope and (self.d_model // heads) % 4:
                raise ValueError(f"VirTues arch: 2D RoPE needs a head width divisible by 4; d_model {self.d_model} "
                                 f"/ {half}_heads {heads} = {self.d_model // heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VirTues arch: dropout must be in [0, 1), got {self.dropout}")
        if self.layernorm_eps <= 0.0 or self.rope_base <= 0.0:
            raise ValueError(f"VirTues arch: layernorm_eps and rope_base must be positive, got "
                             f"{self.layernorm_eps} and {self.rope_base}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"VirTues arch: attention_backend {self.attention_backend!r} is not one of {BACKENDS}")

    # ---- plain values (hyper-parameters, YAML) ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings: what checkpoints store (``torch.load(weights_only=True)``
        cannot rebuild a dataclass, but reads a dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VirTuesArch":
        """The inverse of :meth:`to_dict`; unknown names are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VirTues arch settings {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    # ---- official config.json -----------------------------------------------------------------
    @classmethod
    def from_official_config(cls, config: Mapping[str, Any]) -> "VirTuesArch":
        """The architecture a ``config.json`` describes (plain names, or official keyword names).

        Settings missing from the file keep the released defaults. Unknown keys and settings
        this implementation does not build (e.g. sinusoidal positions) raise a clear error.
        """
        aliases = {**OFFICIAL_CONSTRUCTOR_NAMES, **dict(config.get("official_constructor_names") or {})}
        to_plain = {official: plain for plain, official in aliases.items()}
        own = {f.name for f in fields(cls)}
        plain: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            known = key in own or key in FIXED_SETTINGS or key in DESCRIPTIVE_KEYS
            name = key if known else to_plain.get(key)
            if name is None:
                unknown.append(key)
            else:
                plain[name] = value
        if unknown:
            listed = sorted(own | set(FIXED_SETTINGS) | DESCRIPTIVE_KEYS | set(to_plain))
            raise ValueError(f"unknown VirTues config keys {unknown}; known: {listed}")
        for key, (_, accepted) in FIXED_SETTINGS.items():
            if key in plain and plain[key] not in accepted:
                raise NotImplementedError(
                    f"config {key}={plain[key]!r} is not supported (supported: {list(accepted)})")
        arch = cls(**{k: v for k, v in plain.items() if k in own})
        if "head_dim" in plain:
            for half, heads in (("encoder_heads", arch.encoder_heads), ("decoder_heads", arch.decoder_heads)):
                if arch.d_model // heads != plain["head_dim"]:
                    raise ValueError(f"config: d_model {arch.d_model} / {half} {heads} != head_dim {plain['head_dim']}")
        return arch

    def to_official_config(self) -> dict[str, Any]:
        """A ``config.json`` dict (plain names) that :meth:`from_official_config` reads back equal.

        ``attention_backend`` is left out: it is a choice of kernel, not part of the weights."""
        out: dict[str, Any] = {k: v for k, v in self.to_dict().items() if k != "attention_backend"}
        if self.d_model // self.encoder_heads == self.d_model // self.decoder_heads:
            out["head_dim"] = self.d_model // self.encoder_heads
        out.update({key: written for key, (written, _) in FIXED_SETTINGS.items()})
        out["official_constructor_names"] = dict(OFFICIAL_CONSTRUCTOR_NAMES)
        return out


def check_pattern(pattern: str, allowed: str, what: str) -> None:
    """Refuse an empty block-letter pattern or one with a letter outside ``allowed``, by name."""
    if not pattern:
        raise ValueError(f"{what} pattern is empty")
    bad = sorted(set(pattern) - set(allowed))
    if bad:
        raise ValueError(f"{what} pattern {pattern!r} has unsupported letters {bad}; allowed: {sorted(allowed)}")


def read_official_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a ``config.json``, with errors that name the file."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"VirTues config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a VirTues config must be a JSON object, got {type(config).__name__}")
    return config


__all__ = ["VirTuesArch", "read_official_config", "check_pattern", "OFFICIAL_CONSTRUCTOR_NAMES", "FIXED_SETTINGS",
           "DESCRIPTIVE_KEYS", "ENCODER_LETTERS", "DECODER_LETTERS"]
