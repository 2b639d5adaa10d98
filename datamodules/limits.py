"""How much a single in-memory read may allocate, checked against a file's header before reading.

Image headers are untrusted: a TIFF or Zarr can claim 200,000 × 200,000 px in a few bytes (a
sparse or truncated file), and `asarray()` would then try to allocate 120 GB and take the node
down with it. Every whole-array read in the project asks :func:`check_in_memory` first, with the
shape and dtype from the header, and refuses with a message that names the file and the way
round it (tiled readers: `rosie_predict` streams H&E by tiles; the store reads crops).

The limit is half the machine's physical memory, or ``VIRTUPLEX_MAX_IMAGE_GB`` when set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

ENV_LIMIT = "VIRTUPLEX_MAX_IMAGE_GB"


class ImageTooLargeError(ValueError):
    """A read whose header-declared size exceeds the in-memory limit (fields for callers' messages)."""

    def __init__(self, source: str, shape: tuple[int, ...], dtype: np.dtype, need: int, limit: int, fix: str = ""):
        self.shape, self.dtype, self.need, self.limit = shape, dtype, need, limit
        super().__init__(f"{source}: {self.describe()}. {fix}".rstrip())

    def describe(self) -> str:
        """'header declares (shape) dtype = X GB, more than the in-memory limit of Y GB (...)'."""
        return (f"header declares {self.shape} {self.dtype} = {self.need / 2**30:.1f} GB, more than the in-memory "
                f"limit of {self.limit / 2**30:.1f} GB ({ENV_LIMIT} or half the RAM)")


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest workstation
        return 16 * 2**30


def in_memory_limit_bytes() -> int:
    value = os.environ.get(ENV_LIMIT)
    if value:
        try:
            gb = float(value)
        except ValueError:
            raise ValueError(f"{ENV_LIMIT}={value!r} is not a number of GB") from None
        if not gb > 0:
            raise ValueError(f"{ENV_LIMIT}={value!r} must be a positive number of GB")
        return int(gb * 2**30)
    return physical_memory_bytes() // 2


def nbytes_of(shape: Sequence[int], dtype: np.dtype | str | type) -> int:
    return int(math.prod(int(s) for s in shape)) * np.dtype(dtype).itemsize


def check_in_memory(shape: Sequence[int], dtype: np.dtype | str | type, source: str, fix: str = "") -> None:
    """Raise :class:`ImageTooLargeError` if an array of ``shape``/``dtype`` would exceed the limit."""
    need, limit = nbytes_of(shape, dtype), in_memory_limit_bytes()
    if need > limit:
        raise ImageTooLargeError(source, tuple(int(v) for v in shape), np.dtype(dtype), need, limit, fix)
