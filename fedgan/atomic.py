"""Atomic file writes.

Everything FedGAN keeps (certificates, keys, checkpoints, ledgers, metrics) is
written through here so that a crash or a full disk leaves either the old file
or the new one, never a torn mix of both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class FileExistsRefused(FileExistsError):
    """Raised instead of silently replacing a file the caller asked to keep."""


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode``.

    The temporary file is created with ``mode`` already applied, so a private
    key is never readable by others, not even for an instant.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsRefused(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str, *, mode: int = 0o644, overwrite: bool = True) -> None:
    write_atomic(path, text.encode("utf-8"), mode=mode, overwrite=overwrite)


def append_line_durable(path: Path, line: str) -> None:
    """Append one line and fsync it: for logs that must survive a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
