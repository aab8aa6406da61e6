"""Optuna's journal file (OUT/optuna.journal), read as data from a directory that someone else
may have written: never through a link, at most MAX_BYTES, and any line Optuna cannot replay
refused in one line instead of a traceback (Optuna reads the journal again before most of its
operations, so the check sits where it reads)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from .. import rundir
from ..errors import NormlabError

MAX_BYTES = 256 * rundir.MiB  # a search of 100 candidates x 10 seeds x 1,000 epochs writes ~50 MiB


def damaged(path: Path, why: str) -> NormlabError:
    return NormlabError(f"{path} {why}: it was not written by normlab's search (or was damaged); "
                        f"move it away to start the search afresh, or use another --out")


class CheckedJournal(JournalFileBackend):
    """The journal file, created (O_NOFOLLOW) if absent; a link, a FIFO or a file larger than
    MAX_BYTES in its place is refused before Optuna opens it."""

    def __init__(self, path: Path, lock_obj) -> None:
        self.path = Path(path)
        rundir.append_line(self.path, "")  # creates it without following a link
        super().__init__(str(self.path), lock_obj=lock_obj)

    def read_logs(self, log_number_from: int):
        info = os.lstat(self.path)
        if not stat.S_ISREG(info.st_mode):
            raise damaged(self.path, "is not a regular file")
        if info.st_size > MAX_BYTES:
            raise damaged(self.path, f"is {rundir.size_text(info.st_size)}, more than the "
                                     f"{rundir.size_text(MAX_BYTES)} normlab reads")
        try:
            for log in super().read_logs(log_number_from):
                if not isinstance(log, dict) or type(log.get("op_code")) is not int:
                    raise damaged(self.path, "holds a line that is not an Optuna operation")
                yield log
        except ValueError as err:  # a line that is not JSON (the last one may be half-written)
            raise damaged(self.path, f"holds a line that is not JSON ({str(err)[:80]})") from None


class CheckedStorage(JournalStorage):
    """Optuna's JournalStorage whose replay of the journal fails in one line."""

    def _sync_with_backend(self) -> None:
        try:
            super()._sync_with_backend()
        except NormlabError:
            raise
        except Exception as err:  # replaying a hostile entry raises KeyError, TypeError, ...
            raise damaged(self._backend.path, f"holds an entry Optuna cannot replay ({type(err).__name__})") \
                from None
