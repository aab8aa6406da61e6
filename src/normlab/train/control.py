"""How a training stops: the stop flag that signal handlers set, and what a stopped run says."""
from __future__ import annotations

import threading

# Set by the CLI's signal handlers (and by backends' workers): finish the current step,
# checkpoint, stop.
STOP = threading.Event()
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped cleanly, run the same command again to resume


class Interrupted(Exception):
    """Training stopped on request after writing a checkpoint."""


class RunBusy(Exception):
    """Another live process holds the run's lock."""
