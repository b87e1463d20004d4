"""Durable file writes: fsync a file or a folder, write a file atomically.

A write survives a crash of the process once it is renamed into place, and a power cut once
the file was fsynced before the rename and its folder after it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["atomic_write", "create_new", "fsync_dir", "fsync_file"]


def fsync_file(path: Path) -> None:
    """Make the contents of the file at ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a new or removed file) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = None, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (fsynced unless ``durable=False``).

    The rename makes the write atomic for readers and against a crash of the process;
    the fsync of the file before the rename, and of its folder after it, make it survive
    a power cut too. The file gets ``mode`` (0600 when None).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def create_new(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless it exists, crash-safe; whether this call created it.

    The data is written and fsynced under a temporary name, then hard-linked into place
    (``link`` fails when the name exists): a reader, or a process that lost the race, never
    sees half a file, a crash never leaves an empty one, and of processes racing to create
    it exactly one does.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True
