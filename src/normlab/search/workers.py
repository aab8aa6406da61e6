"""Run a search with W worker processes in this command; other commands may join the same search."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from ..config import RuntimeOptions
from ..train import EXIT_INTERRUPTED, STOP, Interrupted
from ..errors import NormlabError
from .plan import SearchSpec
from .trials import Search


def printer(quiet: bool, prefix: str = ""):
    def say(line: str) -> None:
        if not quiet:
            print(f"{prefix}{line}", flush=True)
    return say


def _worker(out: Path, spec: SearchSpec, opts: RuntimeOptions, force: bool, quiet: bool, index: int) -> None:
    """A spawned worker: stops cleanly (checkpoint, trial left to be adopted) on a signal."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: STOP.set())
    try:
        state = Search(out, spec).work(opts, force, printer(quiet, f"[worker {index}] "))
    except Interrupted:
        state = "interrupted"
    except NormlabError as err:
        print(f"normlab: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(0 if state == "done" else EXIT_INTERRUPTED)


def run_workers(out: Path, spec: SearchSpec, opts: RuntimeOptions, workers: int, force: bool,
                quiet: bool) -> tuple[str, Search]:
    """Work on the search in this process and workers - 1 spawned ones (CPU threads split
    between them, GPUs shared out in turn); ('done' when every trial is finished, else 'interrupted', the search)."""
    gpus = 0
    if opts.device in ("auto", "cuda"):
        import torch
        gpus = torch.cuda.device_count()
    threads = opts.threads or (None if gpus else max(1, (os.cpu_count() or 1) // workers))

    def options(i: int) -> RuntimeOptions:  # one GPU each, in turn, when there are several
        device = f"cuda:{(i - 1) % gpus}" if gpus > 1 else opts.device
        return dataclasses.replace(opts, device=device, threads=threads, progress=False)

    search = Search(out, spec)  # creates the search once, before the workers start
    context = multiprocessing.get_context("spawn")
    others = [context.Process(target=_worker, args=(out, spec, options(i), force, quiet, i))
              for i in range(2, workers + 1)]
    for process in others:
        process.start()
    try:
        state = search.work(options(1), force, printer(quiet, "[worker 1] " if others else ""))
    finally:
        if STOP.is_set():  # forward a stop (SIGTERM to this process only) to the workers
            for process in others:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGTERM)
        for process in others:
            process.join()
    codes = [p.exitcode for p in others]
    if any(code == 2 for code in codes):
        raise NormlabError("a worker stopped on an error (above); fix it and run the same command "
                           "again to resume")
    return (state if all(code == 0 for code in codes) else "interrupted"), search
