"""The store's exceptions, apart so that every store module can raise them without importing the others."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A dataset folder is missing a piece or holds an inconsistent one."""


class MissingChunkError(StoreError):
    """An image's chunk file is absent: reading it would silently return zeros."""
