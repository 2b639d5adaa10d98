"""ROSIE regressor: backbone, masked loss, optimisation, Lightning loop, official weights."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from analysis.rosie_metrics import pearson_per_marker
from analysis.rosie_training_metrics import MaskedPearson, masked_mse, stitched_ssim
from lightning_modules.components.rosie_backbone import (
    OFFICIAL_PREPROCESS,
    RosieInputAdapter,
    build_rosie_regressor,
    load_official_rosie_checkpoint,
    map_torchvision_convnext_to_timm,
)
from lightning_modules.rosie import RosieModule


def test_tiny_backbone_forward_shape():
    model = build_rosie_regressor("convnext_atto", num_outputs=7)
    out = model(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_random_init_and_imagenet_file_are_logged(tmp_path, caplog):
    import timm
    from safetensors.torch import save_file

    with caplog.at_level(logging.INFO):
        build_rosie_regressor("convnext_atto", num_outputs=3)
    assert "random initialisation" in caplog.text

    ref = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    path = tmp_path / "atto_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        model = build_rosie_regressor("convnext_atto", num_outputs=3, pretrained_path=str(path))
    assert "ImageNet weights loaded" in caplog.text
    sd, rsd = model.state_dict(), ref.state_dict()
    for k in sd:
        if k.startswith("head.fc"):
            assert sd[k].shape[0] == 3
        else:
            torch.testing.assert_close(sd[k], rsd[k], rtol=0, atol=0)


def test_masked_loss_ignores_absent_markers():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 5, generator=g, requires_grad=True)
    target = torch.randn(6, 5, generator=g)
    present = torch.rand(6, 5, generator=g) > 0.4
    loss = masked_mse(pred, target, present)
    expected = ((pred - target)[present] ** 2).mean()
    torch.testing.assert_close(loss, expected)
    (grad_a,) = torch.autograd.grad(loss, pred)

    target2 = target.clone()
    target2[~present] = torch.tensor([1e6, float("nan"), float("inf")]).repeat(100)[: int((~present).sum())]
    loss2 = masked_mse(pred, target2, present)
    (grad_b,) = torch.autograd.grad(loss2, pred)
    assert loss2.item() == loss.item()
    assert torch.equal(grad_a, grad_b)
    assert torch.all(grad_a[~present] == 0)


def _batch(n=8, m=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, size, size, generator=g)
    # Markers depend on the image so the model has something to learn.
    target = torch.stack([image[:, c % 3, size // 2 - 4 : size // 2 + 4, size // 2 - 4 : size // 2 + 4].mean((1, 2)) for c in range(m)], 1)
    present = torch.ones(n, m, dtype=torch.bool)
    present[::2, -1] = False
    return {"image": image, "target": target, "present": present}


def test_optimisation_step_reduces_loss():
    torch.manual_seed(0)
    module = RosieModule(arch="convnext_atto", num_markers=4, marker_names=list("abcd"))
    opt = module.configure_optimizers()["optimizer"]
    batch = _batch(n=8, size=32)
    module.train()
    losses = []
    for _ in range(8):
        loss = masked_mse(module(batch["image"]), batch["target"], batch["present"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and min(losses[1:]) < losses[0], losses


def test_optimizer_schedule_matches_paper():
    module = RosieModule(arch="convnext_atto", num_markers=2, marker_names=["x", "y"])
    cfg = module.configure_optimizers()
    assert isinstance(cfg["optimizer"], torch.optim.Adam)
    assert cfg["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-4)
    sched = cfg["lr_scheduler"]
    assert sched["interval"] == "step"
    assert sched["scheduler"].step_size == 30_000 and sched["scheduler"].gamma == 0.5


def test_marker_names_length_checked():
    with pytest.raises(ValueError, match="marker_names"):
        RosieModule(arch="convnext_atto", num_markers=3, marker_names=["a", "b"])


def test_masked_pearson_metric_matches_numpy():
    g = torch.Generator().manual_seed(1)
    metric = MaskedPearson(3)
    preds, targets, presents = [], [], []
    for _ in range(3):
        t = torch.randn(20, 3, generator=g)
        p = t * torch.tensor([1.0, -0.5, 0.0]) + torch.randn(20, 3, generator=g)
        pr = torch.rand(20, 3, generator=g) > 0.3
        metric.update(p, t, pr)
        preds.append(p), targets.append(t), presents.append(pr)
    r = metric.compute().numpy()
    ref = pearson_per_marker(torch.cat(targets).numpy(), torch.cat(preds).numpy(), torch.cat(presents).numpy())
    np.testing.assert_allclose(r, ref, atol=1e-10)


def test_stitched_ssim_identity_is_one_and_noise_lower():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 16, 16, generator=g)
    assert stitched_ssim(target.clone(), target).item() == pytest.approx(1.0, abs=1e-5)
    noisy = target + 0.5 * torch.randn(3, 16, 16, generator=g)
    assert stitched_ssim(noisy, target).item() < 0.8


def test_lightning_fit_logs_pearson_and_ssim(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    m, size, h, w = 3, 32, 4, 5

    class Patches(torch.utils.data.Dataset):
        def __init__(self, seed):
            b = _batch(n=16, m=m, size=size, seed=seed)
            self.items = [{k: v[i] for k, v in b.items()} for i in range(16)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    stitched = [
        {
            "tissue_id": "t0",
            "patches": torch.randn(h * w, 3, size, size),
            "grid_shape": (h, w),
            "target_image": torch.rand(m, h, w),
        }
    ]
    module = RosieModule(arch="convnext_atto", num_markers=m, marker_names=["A", "B", "C"], lr=1e-3)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        module,
        train_dataloaders=DataLoader(Patches(0), batch_size=8),
        val_dataloaders=[DataLoader(Patches(1), batch_size=8), DataLoader(stitched, batch_size=None)],
    )
    metrics = trainer.callback_metrics
    assert "val/pearson_r" in metrics and "val/ssim" in metrics
    assert -1.0 <= float(metrics["val/pearson_r"]) <= 1.0
    assert -1.0 <= float(metrics["val/ssim"]) <= 1.0
    preds = trainer.predict(module, DataLoader(Patches(2), batch_size=8))
    assert preds[0].shape == (8, m)


def test_input_adapter_resizes_and_normalises():
    pp = OFFICIAL_PREPROCESS
    adapter = RosieInputAdapter(pp["resize_to"], pp["mean"], pp["std"])
    x = torch.rand(2, 3, 128, 128)
    y = adapter(x)
    assert y.shape == (2, 3, 224, 224)
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)
    ref = (torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False) - mean) / std
    torch.testing.assert_close(y, ref)


def _official_like_checkpoint(path):
    """A torchvision ConvNeXt-Small with random weights, saved as the authors' release is."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.convnext_small(num_classes=50).eval()
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.1, 1.0)  # the 1e-6 init would hide block mapping errors
    torch.save({"model_state_dict": {"module." + k: v for k, v in tv.state_dict().items()}, "epoch": 7}, path)
    return tv


def test_official_checkpoint_loads_into_timm_and_torchvision(tmp_path):
    path = tmp_path / "rosie_official.pth"
    tv = _official_like_checkpoint(path)
    wrapped = load_official_rosie_checkpoint(path, with_preprocess=True).eval()
    timm_model = wrapped.backbone
    tv_model = load_official_rosie_checkpoint(path, backbone="torchvision").eval()
    assert type(timm_model).__module__.startswith("timm")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv(x)
        out_timm = timm_model(x)
        out_tv = tv_model(x)
    assert ref.abs().mean() > 1e-2  # the check would be vacuous on near-zero outputs
    torch.testing.assert_close(out_timm, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(out_tv, ref, rtol=0, atol=1e-4)
    # Official inference = resize 128 -> 224 bilinear + ImageNet normalisation in front.
    assert wrapped.adapter.resize_to == 224 and wrapped.adapter.normalise


def test_key_mapping_rejects_foreign_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        map_torchvision_convnext_to_timm({"fc.weight": torch.zeros(1)})


def _write_marker(path):  # called only if unpickling were allowed to run code
    open(path, "w").write("pwned")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"module.x": torch.zeros(1)}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(ValueError, match="refusing"):
        load_official_rosie_checkpoint(path)
    assert not marker.exists()


def test_input_adapter_center_crop_keeps_the_centre() -> None:
    from lightning_modules.components.rosie_backbone import RosieInputAdapter

    x = torch.randn(2, 3, 128, 128)
    out = RosieInputAdapter(center_crop=64)(x)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out, x[..., 32:96, 32:96])
    with pytest.raises(ValueError):
        RosieInputAdapter(center_crop=0)
