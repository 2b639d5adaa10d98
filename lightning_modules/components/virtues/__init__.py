"""VirTues (marker-aware multiplex masked autoencoder) as plain PyTorch modules."""

from .attention import PackedSegments, varlen_attention
from .blocks import MultiHeadAttention, TransformerBlock, VirTuesBlock
from .config import VirTuesArch, read_official_config
from .decoder import VirTuesDecoder
from .encoder import VirTuesEncoder, patchify, unpatchify
from .masking import (
    apply_channel_dropout,
    channel_dropout,
    independent_mask,
    independent_masks_for_batch,
    marker_mask,
    niche_mask,
)
from .model import VirTues, VirTuesEncoding, VirTuesOutput
from .rope import RotaryEmbedding1D, RotaryEmbedding2D

__all__ = [
    "PackedSegments", "varlen_attention", "MultiHeadAttention", "TransformerBlock", "VirTuesBlock",
    "VirTuesArch", "read_official_config",
    "VirTuesDecoder", "VirTuesEncoder", "patchify", "unpatchify", "apply_channel_dropout",
    "channel_dropout", "independent_mask", "independent_masks_for_batch", "marker_mask",
    "niche_mask", "VirTues", "VirTuesEncoding", "VirTuesOutput", "RotaryEmbedding1D",
    "RotaryEmbedding2D",
]
