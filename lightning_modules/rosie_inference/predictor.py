"""The ROSIE network behind one call: uint8 RGB patches on the device -> per-marker predictions.

Loading a checkpoint (the project's Lightning :class:`~lightning_modules.rosie.RosieModule` or the
authors' released weights) and the input convention of each are settled here, so the tiling loop
never needs to know which network it is running.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from datamodules.markers import ROSIE_PANEL
from lightning_modules.components.model_files import ModelFileError, load_torch_file, require_kind
from lightning_modules.components import rosie_backbone
from lightning_modules.components.rosie_backbone import IMAGENET_MEAN, IMAGENET_STD
from lightning_modules.rosie import load_rosie_checkpoint
from lightning_modules.rosie_inference.geometry import PATCH_SIZE

#: The authors' released weights: 40× scans at 0.3775 µm/px (ROSIE paper, Methods, stride 1 output).
OFFICIAL_MPP = 0.3775


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of a checkpoint file, read in 4 MB blocks (every output names the model that made it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` -> CUDA when present, else CPU; an explicit ``cuda`` without a GPU is refused, not downgraded."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return device


class PatchPredictor:
    """uint8 RGB patches ``(B,3,P,P)`` on the device -> ``(B,M)`` float32 predictions.

    Hides the input convention of the network: project checkpoints take ImageNet-normalised
    patches (``input_scale='imagenet'``), the official wrapper takes RGB in [0, 1] and normalises
    (and resizes to 224) itself (``'unit'``). ``scales`` multiplies the outputs back into measured
    units when the checkpoint trained on scaled targets.
    """

    def __init__(self, model: nn.Module, marker_names: Sequence[str], input_scale: str = "imagenet",
                 device: str | torch.device = "auto", amp: bool = True, scales: Sequence[float] | None = None,
                 patch_size: int = PATCH_SIZE, meta: dict | None = None, channels_last: bool = True):
        if input_scale not in ("imagenet", "unit"):
            raise ValueError(f"input_scale must be 'imagenet' or 'unit', got {input_scale!r}")
        self.device = resolve_device(device)
        # channels-last: ConvNeXt's depthwise convs run ~3x faster on CPU and use tensor cores on GPU
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.marker_names = [str(m) for m in marker_names]
        self.input_scale = input_scale
        self._amp_requested = amp
        self.amp = amp and self.device.type == "cuda"
        self.patch_size = patch_size
        self.meta = dict(meta or {})
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        self.scales = None
        if scales is not None:
            if len(scales) != len(self.marker_names):
                raise ValueError(f"{len(scales)} marker scales for {len(self.marker_names)} markers")
            self.scales = torch.tensor(list(scales), dtype=torch.float32, device=self.device)

    @property
    def num_markers(self) -> int:
        return len(self.marker_names)

    def to(self, device: str | torch.device) -> "PatchPredictor":
        """Move the network and its constants (a Lightning run decides each rank's device)."""
        self.device = torch.device(device)
        self.model.to(self.device)
        self._scale, self._shift = self._scale.to(self.device), self._shift.to(self.device)
        if self.scales is not None:
            self.scales = self.scales.to(self.device)
        self.amp = self._amp_requested and self.device.type == "cuda"
        return self

    def prepare(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 -> float network input in one multiply-add, laid out in the model's memory format.

        Same values as :func:`datamodules.rosie.normalize_he` (training), up to float rounding:
        ``(x/255 - mean)/std = x·(1/(255·std)) - mean/std``.
        """
        x = patches.contiguous(memory_format=self.memory_format).float()  # layout change on 1-byte data
        if self.input_scale == "imagenet":
            return x.mul_(self._scale).sub_(self._shift)
        return x.mul_(1.0 / 255.0)

    @torch.inference_mode()
    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.prepare(patches.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x)
        out = out.float()
        if out.ndim != 2 or out.shape[1] != self.num_markers:
            raise ValueError(f"model returned shape {tuple(out.shape)}, expected (B, {self.num_markers})")
        return out * self.scales if self.scales is not None else out

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, official: bool | None = None, device: str = "auto",
                        amp: bool = True, trust_checkpoint: bool = False, rescale: bool = True,
                        marker_names: Sequence[str] | None = None) -> "PatchPredictor":
        """A project Lightning checkpoint of :class:`RosieModule`, or the authors' released weights.

        ``official=None`` tells them apart by content (Lightning writes ``pytorch-lightning_version``;
        the official file is a torchvision ConvNeXt state dict). Files are read with
        ``weights_only=True``; ``trust_checkpoint`` allows full unpickling for old files that need
        it (only for files you trust).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = _peek_checkpoint(path, trust_checkpoint)
        is_lightning = isinstance(ckpt, dict) and "pytorch-lightning_version" in ckpt
        if official is None:
            official = not is_lightning
        if official:
            # looked up at call time on the module, so a test can stand a tiny network in for the release
            model = rosie_backbone.load_official_rosie_checkpoint(path, with_preprocess=True)
            names = list(marker_names or ROSIE_PANEL)
            n_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
            if len(names) != n_out:
                raise ValueError(f"{path}: official checkpoint predicts {n_out} markers but {len(names)} marker names given")
            return cls(model, names, "unit", device, amp, meta={"checkpoint": str(path), "kind": "official",
                                                               "sha256": file_sha256(path), "model_mpp": OFFICIAL_MPP})
        if not is_lightning:
            raise ValueError(f"{path}: not a Lightning checkpoint of RosieModule (no 'pytorch-lightning_version'); "
                             "pass --official for the authors' released weights")
        module = load_rosie_checkpoint(str(path), trust_checkpoint)
        hp = dict(module.hparams)
        names = list(marker_names or hp.get("marker_names") or getattr(module, "marker_names", None) or ROSIE_PANEL)
        scales = None
        for key in ("marker_scales", "target_scales"):
            if rescale and hp.get(key) is not None:
                scales = [float(v) for v in hp[key]]
        model_mpp = hp.get("he_mpp")
        meta = {"checkpoint": str(path), "kind": "lightning", "arch": hp.get("arch"), "sha256": file_sha256(path),
                "model_mpp": float(model_mpp) if model_mpp else None,
                "reference_he_histograms": ckpt.get("reference_he_histograms", hp.get("reference_he_histograms")),
                "rescaled": scales is not None}
        return cls(module, names, "imagenet", device, amp, scales=scales, meta=meta)


def _peek_checkpoint(path: Path, trust: bool) -> dict:
    """The checkpoint's top level, tensors memory-mapped (not read) where the format allows; a
    VirTues checkpoint is refused by name."""
    if path.suffix == ".safetensors":
        obj = {"state_dict": load_torch_file(path)}
        require_kind(path, obj, ("rosie-official", "rosie"), "rosie_predict")
        return {}
    obj = load_torch_file(path, trust=trust, mmap=True)
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dictionary")
    require_kind(path, obj, ("rosie-official", "rosie"), "rosie_predict")
    return obj
