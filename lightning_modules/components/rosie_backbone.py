"""ROSIE regressor backbone: a ConvNeXt that maps an H&E patch to one value per marker.

The paper (Methods, "Training details") uses ConvNeXt-Small (~50 M parameters) pre-trained on
ImageNet with a 50-output regression head.  This module builds that network with timm (the
project default) or torchvision, loads ImageNet weights only from a file the user points to
(nothing is downloaded), and loads the authors' released checkpoint, which is a torchvision
ConvNeXt-Small saved through ``nn.DataParallel``, by mapping its keys onto the timm layout.

No Lightning here: this is a plain ``nn.Module`` factory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.model_files import ModelFileError, load_torch_file

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: What the authors' inference does to a patch before the network: each 128 px H&E patch (RGB
#: scaled to [0, 1]) is resized to 224 px with bilinear interpolation, then normalised with the
#: ImageNet mean/std.  Feed these to :class:`RosieInputAdapter` to reproduce it.
OFFICIAL_PREPROCESS: dict = {
    "patch_size": 128,
    "resize_to": 224,
    "interpolation": "bilinear",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}

_TORCHVISION_ARCHS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


class RosieInputAdapter(nn.Module):
    """Resize and/or normalise patches in front of the backbone.

    Why a module and not a dataset transform: the official weights were trained on 224 px inputs
    while the project's datasets serve 128 px patches; putting the resize inside the model keeps
    data loading identical for every checkpoint and makes the resize run on the accelerator.

    ``resize_to=None`` keeps the size; ``mean``/``std`` ``None`` means the input is already
    normalised (the project's datamodules normalise), so only the resize is applied.
    ``center_crop`` keeps only the central square of that many pixels (before any resize): a
    CPU-sized option that trades context for 4x less compute at 64 px; the paper's model sees the
    whole 128 px patch.
    """

    def __init__(
        self,
        resize_to: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        center_crop: int | None = None,
    ) -> None:
        super().__init__()
        if center_crop is not None and int(center_crop) <= 0:
            raise ValueError(f"RosieInputAdapter: center_crop must be a positive int, got {center_crop}")
        self.center_crop = None if center_crop is None else int(center_crop)
        if (mean is None) != (std is None):
            raise ValueError("RosieInputAdapter: give both mean and std, or neither")
        if resize_to is not None and int(resize_to) <= 0:
            raise ValueError(f"RosieInputAdapter: resize_to must be a positive int, got {resize_to}")
        self.resize_to = None if resize_to is None else int(resize_to)
        self.normalise = mean is not None
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center_crop is not None and min(x.shape[-2:]) > self.center_crop:
            top = (x.shape[-2] - self.center_crop) // 2
            left = (x.shape[-1] - self.center_crop) // 2
            x = x[..., top : top + self.center_crop, left : left + self.center_crop]
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            # Upsampling 128 -> 224: antialiasing has no effect, align_corners=False matches
            # torchvision.transforms.Resize on tensors.
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        if self.normalise:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"center_crop={self.center_crop}, resize_to={self.resize_to}, normalise={self.normalise}"


class RosieRegressor(nn.Module):
    """``backbone(adapter(x))``: the whole patch -> markers network used for inference."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.adapter = adapter if adapter is not None else nn.Identity()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.adapter(x))


# ----------------------------------------------------------------------------- file loading


def load_weights_file(path: str | Path, trust: bool = False) -> dict:
    """A checkpoint/state-dict file as a dict, read without running code from it (see
    :func:`~lightning_modules.components.model_files.load_torch_file`)."""
    obj = load_torch_file(path, trust=trust, what="weights")
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{path}: expected a dict (state dict or checkpoint), got {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint and strip ``nn.DataParallel``'s ``module.`` prefix."""
    for key in ("model_state_dict", "state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(
            f"no tensors found in checkpoint (top-level keys: {sorted(map(str, obj))[:10]}); expected a "
            f"state dict or a dict with 'model_state_dict'/'state_dict'"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- key mapping

_TV_STEM = re.compile(r"^features\.0\.([01])\.(weight|bias)$")
_TV_BLOCK = re.compile(r"^features\.(\d+)\.(\d+)\.(layer_scale|block\.(\d)\.(weight|bias))$")
_TV_DOWN = re.compile(r"^features\.(\d+)\.([01])\.(weight|bias)$")
_TV_HEAD = re.compile(r"^classifier\.([02])\.(weight|bias)$")
_TV_BLOCK_PARTS = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}


def is_torchvision_convnext(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "features.0.0.weight" in state_dict


def map_torchvision_convnext_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ConvNeXt state dict to timm's ``convnext_*`` layout.

    torchvision stores the network as ``features[0]`` (stem), ``features[2i+1]`` (stage i blocks),
    ``features[2i]`` for i>=1 (downsample before stage i) and ``classifier`` (LayerNorm2d, Flatten,
    Linear); a block is ``Sequential(dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute)``
    with a ``layer_scale`` of shape (C,1,1).  timm has the same maths with named modules and a
    layer scale ``gamma`` of shape (C,).  Both use LayerNorm eps 1e-6, so outputs match exactly.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if m := _TV_STEM.match(key):
            out[f"stem.{m.group(1)}.{m.group(2)}"] = value
        elif m := _TV_BLOCK.match(key):
            feat, blk = int(m.group(1)), m.group(2)
            if feat % 2 == 0:
                raise KeyError(f"unexpected torchvision ConvNeXt key {key!r} (block inside a downsample layer)")
            stage = (feat - 1) // 2
            prefix = f"stages.{stage}.blocks.{blk}"
            if m.group(3) == "layer_scale":
                out[f"{prefix}.gamma"] = value.reshape(-1)
            else:
                part = _TV_BLOCK_PARTS.get(m.group(4))
                if part is None:
                    raise KeyError(f"unexpected torchvision ConvNeXt key {key!r}")
                out[f"{prefix}.{part}.{m.group(5)}"] = value
        elif m := _TV_DOWN.match(key):
            feat = int(m.group(1))
            if feat % 2 != 0 or feat == 0:
                raise KeyError(f"unexpected torchvision ConvNeXt key {key!r}")
            out[f"stages.{feat // 2}.downsample.{m.group(2)}.{m.group(3)}"] = value
        elif m := _TV_HEAD.match(key):
            out[f"head.{'norm' if m.group(1) == '0' else 'fc'}.{m.group(2)}"] = value
        else:
            raise KeyError(f"unexpected key {key!r}: not a torchvision ConvNeXt state dict")
    return out


# ----------------------------------------------------------------------------- builders


def _create(arch: str, num_outputs: int, backbone: str) -> nn.Module:
    if backbone == "timm":
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=num_outputs)
    if backbone == "torchvision":
        import torchvision

        if arch not in _TORCHVISION_ARCHS:
            raise ValueError(f"backbone='torchvision' supports arch in {_TORCHVISION_ARCHS}, got {arch!r} (use backbone='timm')")
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_outputs)
    raise ValueError(f"backbone must be 'timm' or 'torchvision', got {backbone!r}")


def _head_keys(backbone: str) -> tuple[str, ...]:
    return ("head.fc.weight", "head.fc.bias") if backbone == "timm" else ("classifier.2.weight", "classifier.2.bias")


def _load_imagenet(model: nn.Module, path: str | Path, backbone: str) -> None:
    """Load an ImageNet state dict into everything but the regression head (which has a different
    number of outputs)."""
    sd = extract_state_dict(load_weights_file(path))
    if backbone == "timm" and is_torchvision_convnext(sd):
        sd = map_torchvision_convnext_to_timm(sd)
    elif backbone == "torchvision" and not is_torchvision_convnext(sd):
        raise ValueError(f"{path}: not a torchvision ConvNeXt state dict (no 'features.0.0.weight'); use backbone='timm'")
    head = _head_keys(backbone)
    sd = {k: v for k, v in sd.items() if k not in head}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit this {backbone} model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); check that 'arch' matches the file"
        )


def build_rosie_regressor(
    arch: str = "convnext_small",
    num_outputs: int = 50,
    pretrained_path: str | Path | None = None,
    backbone: str = "timm",
) -> nn.Module:
    """ConvNeXt with a ``num_outputs`` linear head: (B,3,H,W) -> (B,num_outputs).

    ``pretrained_path``: a local ImageNet state dict (timm keys, or torchvision keys which are
    mapped, ``.pth``/``.safetensors``); the classification head in the file is dropped.  Without it
    the network is randomly initialised — the paper fine-tunes from ImageNet, so say so loudly.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    model = _create(arch, num_outputs, backbone)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    if pretrained_path is None:
        log.warning("ROSIE backbone %s/%s (%.1fM params): random initialisation (no pretrained_path given)", backbone, arch, n_params)
    else:
        _load_imagenet(model, pretrained_path, backbone)
        log.info("ROSIE backbone %s/%s (%.1fM params): ImageNet weights loaded from %s", backbone, arch, n_params, pretrained_path)
    return model


def load_official_rosie_checkpoint(
    path: str | Path,
    backbone: str = "timm",
    arch: str = "convnext_small",
    with_preprocess: bool = False,
) -> nn.Module:
    """Load the authors' released ROSIE weights.

    The release is a torchvision ConvNeXt-Small with a 50-output head saved from
    ``nn.DataParallel`` (keys ``module.*`` under ``model_state_dict``).  With ``backbone='timm'``
    (default) the keys are mapped onto timm's ``convnext_small``; ``'torchvision'`` loads it as is.
    ``with_preprocess=True`` returns :class:`RosieRegressor` with the official resize-to-224 +
    ImageNet normalisation in front, expecting RGB patches scaled to [0, 1].
    """
    sd = extract_state_dict(load_weights_file(path))
    if not is_torchvision_convnext(sd):
        raise ValueError(f"{path}: not the official ROSIE layout (torchvision ConvNeXt keys 'features.*' expected)")
    num_outputs = int(sd["classifier.2.weight"].shape[0])
    model = _create(arch, num_outputs, backbone)
    if backbone == "timm":
        sd = map_torchvision_convnext_to_timm(sd)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit {backbone}/{arch} ({str(exc).splitlines()[0]}); check 'arch'") from exc
    log.info("ROSIE official checkpoint loaded from %s into %s/%s (%d outputs)", path, backbone, arch, num_outputs)
    if with_preprocess:
        pp = OFFICIAL_PREPROCESS
        return RosieRegressor(model, RosieInputAdapter(pp["resize_to"], pp["mean"], pp["std"]))
    return model
