"""Packed variable-length self-attention (block-diagonal softmax attention).

Why: VirTues' factorized attention splits the visible tokens of a batch into many independent
sequences of different lengths (one per channel row for spatial blocks, one per grid position for
marker blocks). Padding every sequence to a common length wastes compute, so the tokens stay
*packed* as ``(total_tokens, heads, head_dim)`` and ``cu_seqlens`` (cumulative lengths, like
FlashAttention-2's varlen API) says where each sequence starts.

Backends (``backend=``):

- ``"varlen"``: PyTorch's native ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels
  shipped inside torch; CUDA, fp16/bf16, no attention dropout): packed attention on a GPU without a
  flash-attn build.
- ``"flash"``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16 only) -- what the official
  code uses; an optional extra.
- ``"sdpa_padded"``: scatter the packed tokens into a zero-padded ``(S, L_max, ...)`` batch, run
  :func:`torch.nn.functional.scaled_dot_product_attention` with a key-padding mask, gather back.
- ``"sdpa_bucketed"``: the same, but sequences are first grouped by length (power-of-two buckets)
  so a few long sequences (the always-visible patch-summary rows) do not force padding of the
  many short ones; at most ~log2(L_max) SDPA calls.
- ``"nested"``: jagged nested tensors + SDPA (no padding materialised by us).
- ``"flex"``: FlexAttention with a document mask (eager mode; meant for comparison only).
- ``"loop"``: one SDPA call per sequence; slow reference used by tests.
- ``"auto"``: on CUDA fp16/bf16 tensors, ``varlen`` (when this torch has it and no attention
  dropout is asked for), else ``flash`` when importable; otherwise the backend that was fastest in ``benchmarks/virtues_attention.py`` (see :data:`DEFAULT_TORCH_BACKEND`).

All index tensors a backend needs are computed once per :class:`PackedSegments` object and cached
on it, so a forward pass that builds one ``PackedSegments`` per layout pays for them once, not once
per block.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional dependency: only present on CUDA installs (`pip install virtuplex[gpu]`)
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # ImportError, or a broken CUDA build: fall back to the PyTorch paths
    _flash_attn_varlen_func = None

try:  # torch >= 2.9 ships FlashAttention's varlen kernels (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:
    _torch_varlen_attn = None

BACKENDS = ("auto", "varlen", "flash", "sdpa_padded", "sdpa_bucketed", "nested", "flex", "loop")

#: PyTorch backend used by ``"auto"`` when flash-attn cannot run. Chosen from measurements with
#: ``python -m benchmarks.virtues_attention`` (CPU, 40 markers: encoder fwd+bwd 0.65x the time of
#: ``sdpa_padded``; spatial-attention call 0.22x; nested 1.3-2x slower; eager flex 30x slower and
#: no CPU backward). The masked spatial layout pads ~4.5x with one global maximum length, because
#: the always-visible patch-summary rows are 256 long while channel rows keep ~20 % of positions.
DEFAULT_TORCH_BACKEND = "sdpa_bucketed"


def flash_available() -> bool:
    """True when the flash-attn package imported successfully."""
    return _flash_attn_varlen_func is not None


def torch_varlen_available() -> bool:
    """True when this torch has ``torch.nn.attention.varlen`` and a CUDA device to run it on."""
    return _torch_varlen_attn is not None and torch.cuda.is_available()


class PackedSegments:
    """Boundaries of the independent sequences inside a packed token tensor.

    Built once per forward pass and layout; caches the index tensors each backend needs.
    Zero-length sequences (e.g. a fully masked channel) are dropped: they have no queries.
    """

    def __init__(self, lengths: Tensor) -> None:
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be 1-d, got shape {tuple(lengths.shape)}")
        lengths = lengths.to(torch.int64)
        lengths = lengths[lengths > 0]
        self.lengths = lengths
        self.device = lengths.device
        self.num_segments = int(lengths.numel())
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        # One host sync per layout (not per block): kernels need the maximum as a Python int.
        self.max_seqlen = int(lengths.max()) if self.num_segments else 0
        self.total = int(self.cu_seqlens[-1]) if self.num_segments else 0
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor) -> "PackedSegments":
        return cls(cu_seqlens[1:].to(torch.int64) - cu_seqlens[:-1].to(torch.int64))

    # ---- cached index tensors -------------------------------------------------------------
    def token_segment_and_offset(self) -> tuple[Tensor, Tensor]:
        """(segment id, position inside its segment) of every packed token."""
        if "seg_pos" not in self._cache:
            seg = torch.repeat_interleave(
                torch.arange(self.num_segments, device=self.device), self.lengths
            )
            pos = torch.arange(self.total, device=self.device) - self.cu_seqlens[:-1].long()[seg]
            self._cache["seg_pos"] = (seg, pos)
        return self._cache["seg_pos"]

    def padding_mask(self) -> Tensor:
        """``(S, 1, 1, L_max)`` key mask: True where a real token sits in the padded batch."""
        if "padded" not in self._cache:
            keep = torch.arange(self.max_seqlen, device=self.device)[None, :] < self.lengths[:, None]
            self._cache["padded"] = keep[:, None, None, :]
        return self._cache["padded"]

    def buckets(self) -> list[tuple[Tensor, Tensor, Tensor, int, int, Tensor | None]]:
        """Power-of-two length buckets (lengths in ``(2^(b-1), 2^b]``).

        Each item is ``(token_ids, local_segment, position, n_seq, L, key_mask_or_None)``; the
        mask is ``None`` when every sequence of the bucket has length ``L``.
        """
        if "buckets" not in self._cache:
            seg, pos = self.token_segment_and_offset()
            bucket_of_seg = torch.ceil(torch.log2(self.lengths.double())).long()
            bucket_of_tok = bucket_of_seg[seg]
            local = torch.empty_like(bucket_of_seg)
            parts = []
            for b in torch.unique(bucket_of_seg).tolist():  # <= log2(L_max)+1 iterations
                seg_ids = torch.nonzero(bucket_of_seg == b).flatten()
                lens = self.lengths[seg_ids]
                L = int(lens.max())
                local[seg_ids] = torch.arange(seg_ids.numel(), device=self.device)
                tok = torch.nonzero(bucket_of_tok == b).flatten()
                keep = None
                if not bool((lens == L).all()):
                    keep = (torch.arange(L, device=self.device)[None, :] < lens[:, None])[:, None, None, :]
                parts.append((tok, local[seg[tok]], pos[tok], int(seg_ids.numel()), L, keep))
            self._cache["buckets"] = parts
        return self._cache["buckets"]

    def block_mask(self, heads: int) -> Any:
        """FlexAttention document mask (built for the full packed length)."""
        key = f"block_mask_{heads}"
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            seg, _ = self.token_segment_and_offset()

            def same_segment(b, h, q_idx, kv_idx):  # noqa: ANN001 - flex mask_mod signature
                return seg[q_idx] == seg[kv_idx]

            self._cache[key] = create_block_mask(
                same_segment, None, None, self.total, self.total, device=str(self.device)
            )
        return self._cache[key]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _to_padded(
    q: Tensor, k: Tensor, v: Tensor, seg_id: Tensor, pos: Tensor, n_seq: int, L: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter packed (N, H, D) tokens into zero-padded contiguous (S, H, L, D) batches.

    Zeros (not garbage) in the padding: masked keys get probability 0, and 0 * NaN would be NaN.
    """
    H, D = q.shape[1], q.shape[2]
    buf = q.new_zeros(3, n_seq, H, L, D)
    for i, t in enumerate((q, k, v)):
        buf[i][seg_id, :, pos] = t  # advanced indices on dims 0 and 2 -> value shape (N, H, D)
    return buf[0], buf[1], buf[2]


def _padded(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    seg_id, pos = seg.token_segment_and_offset()
    qp, kp, vp = _to_padded(q, k, v, seg_id, pos, seg.num_segments, seg.max_seqlen)
    out = _sdpa(qp, kp, vp, seg.padding_mask(), dropout_p, scale)  # (S, H, L, D)
    return out[seg_id, :, pos]  # (N, H, D)


def _bucketed(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    out = torch.empty_like(q)  # every row is written by exactly one bucket
    for tok, seg_id, pos, n_seq, L, keep in seg.buckets():
        qp, kp, vp = _to_padded(q[tok], k[tok], v[tok], seg_id, pos, n_seq, L)
        # keep is None for full buckets: lets SDPA pick its fastest mask-free kernel
        out.index_put_((tok,), _sdpa(qp, kp, vp, keep, dropout_p, scale)[seg_id, :, pos])
    return out


def _uniform(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    """All sequences have the same length: the packed tokens already are a dense (S, L) batch.

    The unmasked encoder pass (cell / niche tokens, reconstruction inputs of one panel) is this
    case: every channel has all h·w tokens and every position all C markers. A view replaces the
    scatter into padded buffers and the gather back that the bucketed path pays for.
    """
    n, h, d = q.shape
    s, length = seg.num_segments, seg.max_seqlen

    def dense(t: Tensor) -> Tensor:
        return t.reshape(s, length, h, d).transpose(1, 2)  # (S, H, L, D)

    out = _sdpa(dense(q), dense(k), dense(v), None, dropout_p, scale)
    return out.transpose(1, 2).reshape(n, h, d)


def _nested(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    offsets = seg.cu_seqlens.long()

    def njt(x: Tensor) -> Tensor:
        return torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2)  # (S, H, j, D)

    with warnings.catch_warnings():  # "nested tensors are a prototype" on every call
        warnings.simplefilter("ignore", UserWarning)
        out = _sdpa(njt(q), njt(k), njt(v), None, dropout_p, scale)
        return out.transpose(1, 2).values()


def _flex(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if dropout_p:
        raise NotImplementedError("flex backend: attention dropout is not supported")
    bm = seg.block_mask(q.shape[1])
    with warnings.catch_warnings():  # eager flex warns that it is slow: that is what we measure
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            block_mask=bm, scale=scale,
        )
    return out[0].transpose(0, 1)


def _loop(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    outs = []
    bounds = seg.cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        outs.append(_sdpa(qs, ks, vs, None, dropout_p, scale).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _flash(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    if _flash_attn_varlen_func is None:
        raise ImportError("backend='flash' needs the flash-attn package (pip install virtuplex[gpu])")
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"backend='flash' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
            "use autocast or backend='auto'"
        )
    return _flash_attn_varlen_func(
        q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_seqlen, seg.max_seqlen,
        dropout_p=dropout_p, softmax_scale=scale, causal=False,
    )


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, seg: PackedSegments, dropout_p: float, scale: float | None) -> Tensor:
    if _torch_varlen_attn is None:
        raise ImportError("backend='varlen' needs torch.nn.attention.varlen (torch >= 2.9)")
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='varlen' needs CUDA fp16/bf16 tensors, got {q.device.type} {q.dtype}; "
                         "use autocast or backend='auto'")
    if dropout_p:
        raise NotImplementedError("backend='varlen': torch's varlen_attn has no attention dropout; use 'auto'")
    cu = seg.cu_seqlens.to(q.device)
    return _torch_varlen_attn(q, k, v, cu, cu, seg.max_seqlen, seg.max_seqlen, scale=scale)


_IMPLS = {
    "varlen": _torch_varlen,
    "flash": _flash,
    "sdpa_padded": _padded,
    "sdpa_bucketed": _bucketed,
    "nested": _nested,
    "flex": _flex,
    "loop": _loop,
}


def resolve_backend(backend: str, q: Tensor, dropout_p: float = 0.0) -> str:
    """Turn ``"auto"`` into a concrete backend for these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if _torch_varlen_attn is not None and not dropout_p:
            return "varlen"
        if flash_available():
            return "flash"
    return DEFAULT_TORCH_BACKEND


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segments: PackedSegments | Tensor,
    *,
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention restricted to each packed sequence.

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``; token ``t`` belongs to the sequence ``s``
            with ``cu_seqlens[s] <= t < cu_seqlens[s + 1]``.
        segments: a :class:`PackedSegments` (reuse it across blocks) or a ``cu_seqlens`` tensor.
        backend: see the module docstring.
        dropout_p: attention-probability dropout (pass 0 in eval).
        scale: softmax scale, default ``head_dim ** -0.5``.

    Returns:
        ``(total_tokens, heads, head_dim)`` in the packed order of ``q``.
    """
    if not isinstance(segments, PackedSegments):
        segments = PackedSegments.from_cu_seqlens(segments)
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share shape (tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != segments.total:
        raise ValueError(f"{q.shape[0]} packed tokens but cu_seqlens covers {segments.total}")
    if segments.total == 0:
        return q.new_zeros(q.shape)
    resolved = resolve_backend(backend, q, dropout_p)
    if resolved in ("sdpa_bucketed", "sdpa_padded") and segments.total == segments.num_segments * segments.max_seqlen:
        return _uniform(q, k, v, segments, dropout_p, scale)  # equal lengths: no padding needed
    return _IMPLS[resolved](q, k, v, segments, dropout_p, scale)


def segment_attention_probs(q: Tensor, k: Tensor, segments: PackedSegments, scale: float | None = None) -> Tensor:
    """Post-softmax attention probabilities of every packed sequence, for inspection (not the forward).

    Why separate from :func:`varlen_attention`: the fused kernels never materialise the
    probabilities; interpretability (paper Methods, "Model inspection and visualization") needs them.
    Computed in float32 from the same ``q``, ``k`` and scale as the forward.

    Returns:
        ``(S, heads, L_max, L_max)``: entry ``[s, h, a, b]`` is how much the ``a``-th token of
        sequence ``s`` attends to its ``b``-th token; zero wherever ``a`` or ``b`` lies past the
        sequence's length. Sequences in ``segments`` order.
    """
    seg_id, pos = segments.token_segment_and_offset()
    n_seq, length = segments.num_segments, segments.max_seqlen
    heads, dim = q.shape[1], q.shape[2]
    qp = q.new_zeros(n_seq, heads, length, dim, dtype=torch.float32)
    kp = torch.zeros_like(qp)
    qp[seg_id, :, pos] = q.float()
    kp[seg_id, :, pos] = k.float()
    scores = qp @ kp.transpose(-1, -2) * (dim**-0.5 if scale is None else scale)
    keep = segments.padding_mask()  # (S, 1, 1, L) real keys
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return probs * keep.transpose(-1, -2)  # padded query rows -> 0

