"""The one way this project reads a model file (checkpoint, weights, marker embedding).

Why one path: ``torch.load`` with full unpickling runs whatever code the file names, so a
checkpoint downloaded from a colleague or a forum can run a shell command on load. Every loader
goes through :func:`load_torch_file`, which reads ``.safetensors`` with safetensors and anything
else with ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings and numpy
scalars only). Full unpickling happens only when the caller passes ``trust=True``, which commands
expose as ``--trust-checkpoint``.

It also tells apart the files users mix up: a truncated download, an empty file, a folder, a ROSIE
checkpoint given to a VirTues command and the other way round (:func:`checkpoint_kind`).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SAFE_ALTERNATIVE = ("re-save only the weights (torch.save(model.state_dict(), path)) or convert to .safetensors; "
                    "pass --trust-checkpoint only for a file you made yourself")


class ModelFileError(ValueError):
    """A model file that cannot be used: missing, damaged, unsafe, or of the wrong kind."""


class UnsafeModelFileError(ModelFileError):
    """A file whose unpickling would run code; refused unless the caller trusts it."""


def numpy_safe_globals() -> list:
    """Numpy scalar/dtype types that training scripts often leave in checkpoints (a best metric as
    ``np.float64``). Allow-listing them lets ``weights_only=True`` read such files; reconstructing
    a numpy scalar runs no user code."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out: list = [np.dtype, scalar]
    out.extend(type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "uint8", "bool"))
    return out


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelFileError(f"{path}: no such {what} file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a {what} file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the {what} file is empty (0 bytes); copy it again")


def load_torch_file(path: str | os.PathLike, *, trust: bool = False, what: str = "checkpoint", mmap: bool = False,
                    extra_globals: Sequence[Any] = ()) -> Any:
    """The object stored in ``path``, never running code from it unless ``trust``.

    ``extra_globals``: further classes the file may rebuild, for formats that pickle a plain data
    holder (fair-esm's ``argparse.Namespace``); they must not run code when reconstructed.

    Raises :class:`UnsafeModelFileError` (naming the file and the safe alternative) for a pickle
    that needs code, and :class:`ModelFileError` for a missing, empty, truncated or foreign file.
    """
    path = Path(path)
    _check_file(path, what)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, what)
    if trust:
        log.warning("%s: loading with full unpickling (--trust-checkpoint): only do this for files you made", path)
    try:
        if trust:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([*numpy_safe_globals(), *extra_globals]):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as exc:
        if _is_damaged(path):
            raise ModelFileError(f"{path}: the {what} file is truncated or damaged; copy it again") from None
        calls = unsafe_globals(path)
        if calls:
            raise UnsafeModelFileError(
                f"{path}: refusing to load this {what}: unpickling it would run code from the file (it calls "
                f"{', '.join(calls[:3])}); {SAFE_ALTERNATIVE}") from None
        raise ModelFileError(f"{path}: this {what} uses pickle features the safe loader cannot read ({_reason(exc)}); "
                             "re-save it with torch.save(state_dict, path) (default protocol) or as .safetensors; "
                             "--trust-checkpoint only for a file you made yourself") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"{path}: the {what} file is truncated, damaged or not a PyTorch file ({first}); "
                             "copy it again") from None


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: the {what} file is truncated or not a safetensors file ({exc})") from None


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _is_damaged(path: Path) -> bool:
    """A zip-format torch file whose central directory is gone (a cut-off download)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _reason(exc: BaseException) -> str:
    """The informative line of torch's long weights-only message (e.g. 'Unsupported operand 149')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith("Unsupported")]
    return (useful or lines or [type(exc).__name__])[0][:160]


#: Modules whose globals a tensor checkpoint legitimately names (rebuilding tensors, dicts, numpy scalars).
_DATA_MODULES = ("torch", "collections", "numpy", "_codecs", "argparse")
_DATA_BUILTINS = {"builtins.set", "builtins.frozenset", "builtins.slice", "builtins.bytearray", "builtins.complex"}


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Functions and classes outside tensor/container rebuilding that the file's pickle would call
    (``posix.system``, ``builtins.eval``, ...), found by reading its opcodes without executing them."""
    found: list[str] = []
    for name in _pickle_globals(_pickle_bytes(Path(path))):
        module = name.split(".", 1)[0]
        if module not in _DATA_MODULES and name not in _DATA_BUILTINS and name not in found:
            found.append(name)
    return found


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    return path.read_bytes()  # legacy format: several pickles back to back


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL, tracking the memo for STACK_GLOBAL's strings."""
    import pickletools

    names: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        recent: list[object] = []
        memo: dict[int, object] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
                    names.append(f"{recent[-2]}.{recent[-1]}")
                if op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    recent.append(memo.get(int(arg)))
                elif isinstance(arg, str) and "UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                    recent.append(arg)
                if op.name == "STOP":
                    break
        except (ValueError, EOFError, KeyError):
            break
    return names


def load_torch_bytes(data: bytes, name: str, what: str = "marker embedding") -> Any:
    """``torch.load(weights_only=True)`` of a file's bytes (remote stores), with the same errors."""
    if not data:
        raise ModelFileError(f"{name}: the {what} file is empty (0 bytes); copy it again")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeModelFileError(f"{name}: refusing to load this {what}: the safe loader cannot read it "
                                   f"({_reason(exc)}); {SAFE_ALTERNATIVE}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{name}: the {what} file is truncated, damaged or not a PyTorch file "
                             f"({(str(exc).splitlines() or [''])[0]}); copy it again") from None


def load_tensor_file(path: str | os.PathLike, expected_dim: int | None = None, what: str = "marker embedding",
                     data: bytes | None = None) -> torch.Tensor:
    """A 1-d float32 tensor from ``path`` (an ESM-2 marker embedding), checked for size and values.

    ``data``: the file's bytes, already read (object stores); ``path`` then only names it."""
    path = Path(path)
    obj = load_torch_file(path, what=what) if data is None else load_torch_bytes(data, str(path), what)
    if isinstance(obj, Mapping) and len(obj) == 1:  # safetensors: {name: tensor}
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise ModelFileError(f"{path}: expected a tensor, found a {type(obj).__name__}; save it with torch.save(tensor, path)")
    flat = obj.detach().to(torch.float32).reshape(-1)
    if obj.dim() != 1 and not (obj.dim() == 2 and 1 in obj.shape):
        raise ModelFileError(f"{path}: expected a 1-d embedding, got shape {tuple(obj.shape)}")
    if expected_dim is not None and flat.numel() != expected_dim:
        raise ModelFileError(f"{path}: embedding has {flat.numel()} values, expected {expected_dim} "
                             "(ESM-2 esm2_t30_150M gives 640); recompute it with the model the others came from")
    if not torch.isfinite(flat).all():
        raise ModelFileError(f"{path}: embedding holds NaN or inf values; recompute it")
    return flat


def checkpoint_kind(obj: Any) -> str | None:
    """``'rosie'``, ``'virtues'``, ``'camae'``, ``'rosie-official'``, ``'virtues-official'`` or None (unknown)."""
    if not isinstance(obj, Mapping):
        return None
    hp = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), Mapping) else {}
    if "pytorch-lightning_version" in obj or hp:
        if isinstance(hp.get("arch"), Mapping) and "fourier_weight" in hp:  # the CA-MAE baseline (VirTues' CLI)
            return "camae"
        if "virtues_marker_uniprot_ids" in obj or "encoder_pattern" in hp or isinstance(hp.get("arch"), Mapping) \
                or "marker_uniprot_ids" in hp:
            return "virtues"
        if "marker_names" in hp or isinstance(hp.get("arch"), str) or "num_markers" in hp:
            return "rosie"
        keys = list(obj.get("state_dict", {}) or {})
        return _kind_from_keys(keys, official=False)
    inner = obj.get("model_state_dict", obj.get("state_dict", obj))
    return _kind_from_keys(list(inner) if isinstance(inner, Mapping) else [], official=True)


def _kind_from_keys(keys: list[str], official: bool) -> str | None:
    if any("patch_summary_token" in k or "multi_head_attention.W_q" in k for k in keys):
        return "virtues-official" if official else "virtues"
    if any(k.split("module.")[-1].startswith("features.0.0.") or ".stages." in k or k.startswith("stages.") for k in keys):
        return "rosie-official" if official else "rosie"
    return None


KIND_NAMES = {"rosie": "a ROSIE checkpoint", "virtues": "a VirTues checkpoint", "camae": "a CA-MAE baseline checkpoint",
              "rosie-official": "the ROSIE authors' weights", "virtues-official": "the VirTues authors' weights"}


def require_kind(path: str | os.PathLike, obj: Any, wanted: tuple[str, ...], command: str) -> str | None:
    """Refuse a checkpoint of the other model with a message that names both."""
    kind = checkpoint_kind(obj)
    if kind is not None and kind not in wanted:
        need = " or ".join(KIND_NAMES[w] for w in wanted)
        raise ModelFileError(f"{path}: this is {KIND_NAMES[kind]}; {command} needs {need}")
    return kind
