"""How a training stops: the stop flag that signal handlers set, and what a stopped run says."""
from __future__ import annotations

import contextlib
import threading

# Set by the CLI's signal handlers (and by backends' workers): finish the current step,
# checkpoint, stop.
STOP = threading.Event()
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped cleanly, run the same command again to resume


class Interrupted(Exception):
    """Training stopped on request after writing a checkpoint."""


class RunBusy(Exception):
    """Another live process holds the run's lock."""


# Set while this process trains (or waits for runs it handed to workers or a cluster): a signal
# then stops the work at a step and checkpoints (exit 75). Outside it there is nothing to save,
# and a signal ends the command at once (Stopped: exit 128 + the signal's number, 130 or 143).
WORKING = threading.Event()


class Stopped(BaseException):
    """A signal arrived while nothing was training: the command ends now (every write is atomic,
    so nothing is left half-written). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` along the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def working():
    """Mark training (or waiting for runs elsewhere) as in progress: signals checkpoint it."""
    WORKING.set()
    try:
        yield
    finally:
        WORKING.clear()
