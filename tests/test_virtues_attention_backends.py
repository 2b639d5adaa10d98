"""Every packed-attention backend this machine can run, against one SDPA call per sequence.

CPU backends run everywhere; ``varlen`` (torch's native FlashAttention varlen kernels) and ``flash``
(flash-attn package) run only where CUDA (and the package) exist, and skip with the reason otherwise,
so the same file is the parity check on a GPU machine. Forward and gradients are compared.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.components.virtues import attention as attn
from lightning_modules.components.virtues.attention import PackedSegments, resolve_backend, varlen_attention

CUDA = torch.cuda.is_available()
CPU_BACKENDS = ["sdpa_padded", "sdpa_bucketed", "nested", "loop"]


def _inputs(device: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 17, 0, 9, 32, 3])
    n = int(lengths.sum())
    q, k, v = (torch.randn(n, 4, 16, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    return q, k, v, PackedSegments(lengths.to(device))


def _reference(q, k, v, seg):  # noqa: ANN001
    """One full-precision SDPA call per sequence."""
    outs = []
    b = seg.cu_seqlens.tolist()
    for s, e in zip(b[:-1], b[1:]):
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(outs)


def _available(backend: str) -> tuple[bool, str]:
    if backend in CPU_BACKENDS:
        return True, ""
    if not CUDA:
        return False, f"backend {backend!r} needs CUDA; none on this machine"
    if backend == "flash" and not attn.flash_available():
        return False, "flash-attn is not installed (optional extra)"
    if backend == "varlen" and not attn.torch_varlen_available():
        return False, "this torch has no torch.nn.attention.varlen"
    return True, ""


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["varlen", "flash"])
def test_backend_matches_per_sequence_sdpa(backend):
    ok, why = _available(backend)
    if not ok:
        pytest.skip(why)
    gpu = backend in ("varlen", "flash")
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if gpu else dict(rtol=1e-5, atol=1e-5)
    q, k, v, seg = _inputs(device, dtype)
    out = varlen_attention(q, k, v, seg, backend=backend)
    ref = _reference(q, k, v, seg)
    torch.testing.assert_close(out.float(), ref, **tol)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_auto_picks_a_runnable_backend():
    q = torch.zeros(3, 2, 8)
    assert resolve_backend("auto", q) == attn.DEFAULT_TORCH_BACKEND  # CPU fp32: never a CUDA kernel
    if attn.torch_varlen_available():
        qh = q.to("cuda", torch.bfloat16)
        assert resolve_backend("auto", qh) == "varlen"
        assert resolve_backend("auto", qh, dropout_p=0.1) != "varlen"  # no dropout in torch's varlen


def test_varlen_refuses_cpu_tensors_with_a_reason():
    q, k, v, seg = _inputs("cpu", torch.float32)
    with pytest.raises((ValueError, ImportError), match="varlen"):
        varlen_attention(q, k, v, seg, backend="varlen")
