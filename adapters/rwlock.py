"""A reader/writer lock between processes and threads: ``flock`` on a lock file.

Writers hold it exclusively, readers shared. ``flock`` locks belong to an open file, so two
threads of one process exclude each other as two processes do. A waiter sleeps in the
kernel's ``flock`` queue and is woken when the lock is released (no polling), and gives up
after a timeout.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LockTimeout", "flock_wait", "locked"]


class LockTimeout(Exception):
    """The lock stayed taken for the whole timeout (callers translate it to their own error)."""


def flock_wait(fd: int, mode: int, timeout: float) -> bool:
    """Take ``flock`` ``mode`` on ``fd``, waiting up to ``timeout`` s; whether it was taken.

    The wait is a blocking ``flock`` in a helper thread, not a poll: the kernel wakes a
    waiter the moment the lock is released, so a reader gets in between two commits of a
    busy writer instead of probing at random and starving. If the time runs out first,
    the helper gives the lock back as soon as it gets it.
    """
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if timeout <= 0:
            return False
    waiter_fd = os.dup(fd)  # same open file: a lock it takes is held through ``fd`` too
    decided = threading.Lock()
    taken = threading.Event()
    abandoned = False

    def wait() -> None:
        try:
            fcntl.flock(waiter_fd, mode)
            with decided:
                if abandoned:
                    fcntl.flock(waiter_fd, fcntl.LOCK_UN)
                else:
                    taken.set()
        finally:
            os.close(waiter_fd)

    threading.Thread(target=wait, name="rwlock-wait", daemon=True).start()
    taken.wait(timeout)
    with decided:
        if taken.is_set():
            return True
        abandoned = True
        return False


@contextmanager
def locked(path: Path, *, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold the lock on ``path`` (created if missing) exclusively or shared for the block.

    Raises ``LockTimeout`` when it cannot be taken within ``timeout`` seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        if not flock_wait(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout):
            raise LockTimeout(f"{path} stayed locked for {timeout:.1f}s")
        yield
    finally:
        os.close(fd)  # releases the lock
