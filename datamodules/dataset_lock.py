"""One writer at a time per dataset: a file lock beside the dataset folder.

Why: a dataset's tables (``tissues.parquet``, ``channels_per_tissue.parquet``, ``cells.parquet``,
standardization statistics) are updated by read-modify-rename. Two ingests into one dataset at the
same time would each read the old table and the second rename would drop the first one's row. The
lock serialises those updates across processes (and machines sharing a POSIX file system that
honours ``flock``); images themselves are written atomically and need no lock.

The lock file is ``<parent>/.<dataset>.lock``, outside the dataset, so that creating a new
dataset (assembled in a temporary folder and renamed into place) is serialised too. The
``filelock`` package (a dependency of torch) provides the lock; one lock object per path and
process makes it re-entrant, so a command holding it can call library code that takes it again.
Object stores (``s3://`` ...) have no such lock: there the caller must not run writers in parallel
(warned once).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import fsspec
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

#: How long a writer waits for another one before giving up (seconds); VIRTUPLEX_LOCK_TIMEOUT overrides.
DEFAULT_TIMEOUT_S = 3600.0
_warned_remote: set[str] = set()


def lock_path(local_root: str) -> str:
    root = os.path.normpath(os.path.abspath(local_root))
    parent, name = os.path.split(root)
    return os.path.join(parent, f".{name}.lock")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@contextlib.contextmanager
def dataset_lock(root: str | os.PathLike, fs: fsspec.AbstractFileSystem | None = None,
                 timeout: float | None = None) -> Iterator[None]:
    """Hold the dataset's write lock (re-entrant within a process) while the block runs."""
    if fs is None:
        fs, root = fsspec.core.url_to_fs(str(root))
    root = str(root)
    if os.path.basename(root.rstrip("/")).startswith(".") and ".tmp-" in root:
        yield  # a dataset being assembled in its private temporary folder: nobody else sees it
        return
    if not _is_local(fs):
        if root not in _warned_remote:
            _warned_remote.add(root)
            log.warning("%s: remote datasets have no write lock; do not run several writers into it at once", root)
        yield
        return
    path = lock_path(root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    wait = float(os.environ.get("VIRTUPLEX_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout is None else timeout
    lock = FileLock(path, is_singleton=True)
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise TimeoutError(f"{root}: another process has been writing to this dataset for {wait:.0f} s (lock {path}); "
                           "wait for it to finish, or remove the lock file if no writer is running") from None
    try:
        yield
    finally:
        lock.release()
