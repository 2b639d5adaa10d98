"""bf16 autocast training steps on CPU for ROSIE and VirTues, so a GPU's first bf16 run is not the first.

Each test runs one real step (forward, loss, backward, optimiser update) twice from the same
weights and batch, once in fp32 and once under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
and checks: the bf16 step really ran in bf16 (some activation is bf16), the loss is finite and within
5 % of fp32 (bf16 keeps 8 mantissa bits: ~0.4 % per rounding, a few % after a network), every
parameter that gets a gradient in fp32 gets a finite one in bf16, the gradients point the same way
(cosine > 0.95 over all parameters) and the update lowers the loss on the same batch in both.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from analysis.rosie_training_metrics import masked_mse
from lightning_modules.components.virtues import VirTues, VirTuesArch
from lightning_modules.components.virtues.masking import independent_masks_for_batch
from lightning_modules.rosie import RosieModule

LOSS_RTOL = 0.05
GRAD_COSINE = 0.95


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _step(model: torch.nn.Module, loss_fn, bf16: bool, lr: float) -> tuple[float, dict, float, set]:  # noqa: ANN001
    """One SGD step: ``(loss, grads, loss after the step, dtypes seen in forward)``."""
    dtypes: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, o: dtypes.add(o.dtype) if torch.is_tensor(o) else None)
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model)
    for h in hooks:
        h.remove()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            after = float(loss_fn(model))
    return float(loss.detach()), grads, after, dtypes


def _compare(model: torch.nn.Module, loss_fn, lr: float) -> None:  # noqa: ANN001
    loss32, g32, after32, _ = _step(copy.deepcopy(model), loss_fn, False, lr)
    loss16, g16, after16, dtypes = _step(copy.deepcopy(model), loss_fn, True, lr)
    assert torch.bfloat16 in dtypes, "autocast did not run the linear layers in bf16"
    assert torch.isfinite(torch.tensor(loss16)) and abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss16, loss32)
    assert set(g16) == set(g32) and g32, "a parameter lost its gradient under bf16"
    flat32 = torch.cat([g32[n].flatten().float() for n in sorted(g32)])
    flat16 = torch.cat([g16[n].flatten().float() for n in sorted(g32)])
    assert torch.isfinite(flat16).all() and flat16.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)
    assert cos > GRAD_COSINE, float(cos)
    assert after32 < loss32 and after16 < loss16, (loss32, after32, loss16, after16)


def test_rosie_training_step_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    module = RosieModule("convnext_atto", num_markers=6).train()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 64, 64, generator=g)
    target = torch.randn(4, 6, generator=g)
    present = torch.rand(4, 6, generator=g) > 0.2

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:  # RosieModule.training_step's loss, without self.log
        return masked_mse(m(image).float(), target, present)

    _compare(module, loss_fn, lr=1e-2)


def test_virtues_training_step_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    arch = dataclasses.replace(VirTuesArch(), d_model=32, encoder_heads=2, decoder_heads=2, ffn_dim=64,
                               encoder_pattern="hvhv", decoder_pattern="f")
    model = VirTues(arch)
    model.set_marker_table(torch.randn(7, 640, generator=torch.Generator().manual_seed(1)), [f"P{i:05d}" for i in range(7)])
    model.train()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(c, 32, 32, generator=g) for c in (5, 3)]
    ids = [torch.randperm(7, generator=g)[:c] for c in (5, 3)]
    masks = independent_masks_for_batch([5, 3], 4, 4, generator=g)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:  # VirTuesModule._loss: all-pixel MSE of the decoded crops
        out = m(images, ids, masks)
        pred = torch.cat([d.reshape(-1) for d in out.decoded]).float()
        return torch.nn.functional.mse_loss(pred, torch.cat([x.reshape(-1) for x in images]))

    _compare(model, loss_fn, lr=1e-2)
