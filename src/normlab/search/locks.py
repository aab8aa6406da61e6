"""A file lock that a killed process never leaves behind."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .. import rundir


class FileLock:
    """An exclusive flock on `path`. The kernel drops it when its holder dies (kill -9 included),
    so the next process takes it at once: no stale lock file, no grace period to wait out.

    Also serves as the lock object of Optuna's JournalFileBackend (acquire/release), whose own
    lock files outlive a killed holder and make the next process wait 30 s."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        fd = rundir.open_lock_file(self.path)  # never through a link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
