"""What every command shares: the error contract and the logging setup.

A user's mistake ends in one line on stderr and exit code 2.

Why: a traceback from deep inside zarr or torch tells a biologist nothing, and a half-finished
command that exits 0 is worse. Library code raises exceptions whose message already names the
file, the field and the fix (``ValueError`` and its subclasses, ``OSError`` for files and disks,
:class:`~datamodules.store.StoreError`); :func:`run_command` turns them into ``error: <message>``.
Anything else (``KeyError``, ``TypeError``, ...) is a bug in this project and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from datamodules.store import StoreError

#: Exceptions that describe bad input or a full/unwritable disk, never a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, StoreError, ImportError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, with what to do for the common OS errors."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or "the output folder"
        text = (f"{where}: the disk is full ({os.strerror(exc.errno)}); nothing partial was kept: free space and run "
                "the same command again")
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = exc.filename or "a file"
        text = f"{where}: {os.strerror(exc.errno)}; choose a folder you can write to (or fix its permissions)"
    elif isinstance(exc, FileNotFoundError) and exc.filename and not str(exc).startswith(str(exc.filename)):
        text = f"{exc.filename}: no such file or folder"
    elif isinstance(exc, ImportError):
        text = f"{exc}; install the optional dependency (README, 'Install')"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def report(exc: BaseException) -> int:
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return 2


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """One format and level for every command's log lines (a no-op when logging is already set up,
    e.g. under pytest or when a command runs another)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def run_command(body: Callable[[], Any]) -> int:
    """Run ``body`` with the project's logging; a user error becomes ``error: ...`` on stderr and exit code 2.

    ``body`` returns an exit code (None = 0). Ctrl-C exits 130 without a traceback.
    """
    configure_logging()
    try:
        code = body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        return report(exc)
    return 0 if code is None else int(code)
