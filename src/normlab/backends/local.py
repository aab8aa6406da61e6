"""This machine: one run at a time in this process, or a pool of worker processes.

With several GPUs each worker trains on its own GPU; on CPU the cores are split between the
workers. A stop (SIGINT, SIGTERM) is forwarded to the workers, whose runs checkpoint.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Iterator

from ..config import RuntimeOptions
from .base import Backend, Job, train_job

_progress_queue = None  # in a worker process: where its runs report progress


def _worker_init(progress_queue, threads: int | None) -> None:
    """In each worker process: report progress to the parent; checkpoint on signals."""
    global _progress_queue
    _progress_queue = progress_queue
    if threads:
        import torch
        torch.set_num_threads(threads)
    from ..train import STOP
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: STOP.set())


def _train_in_worker(job: Job, opts: RuntimeOptions) -> dict[str, dict]:
    return train_job(job, opts, lambda *item: _progress_queue.put(item))


class LocalBackend(Backend):
    name = "local"

    def __init__(self, opts: RuntimeOptions, workers: int):
        self.opts, self.workers = opts, workers
        self.pool = self.progress_queue = None
        self.gpus = 0
        if opts.device in ("auto", "cuda"):
            import torch
            self.gpus = torch.cuda.device_count()
        self.threads = opts.threads
        if not self.threads and not self.gpus:
            self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.slot = 0

    def train(self, jobs: list[Job], display=None) -> Iterator[tuple[str, dict]]:
        if self.workers == 1:
            yield from self._train_here(jobs, display)
        else:
            yield from self._train_in_pool(jobs, display)

    def _train_here(self, jobs, display):
        """In this process: the CLI's signal handlers stay in charge."""
        from ..train import STOP

        opts = dataclasses.replace(self.opts, threads=self.threads, progress=False)
        for job in jobs:
            if STOP.is_set():
                return
            if display:
                for run in job:
                    display.begin(run.run_id)
            yield from train_job(job, opts, display.progress if display else None).items()

    def _train_in_pool(self, jobs, display):
        from ..train import STOP

        if self.pool is None:  # kept across calls: starting workers costs seconds
            context = multiprocessing.get_context("spawn")
            self.progress_queue = context.Queue()
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init,
                                            initargs=(self.progress_queue, self.threads))
        todo, futures, stopping = list(jobs), {}, False
        while todo or futures:
            while todo and len(futures) < self.workers and not STOP.is_set():
                job = todo.pop(0)
                device = f"cuda:{self.slot % self.gpus}" if self.gpus else self.opts.device
                self.slot += 1
                opts = dataclasses.replace(self.opts, device=device, threads=self.threads, progress=False)
                futures[self.pool.submit(_train_in_worker, job, opts)] = job
                if display:
                    for run in job:
                        display.begin(run.run_id)
            if STOP.is_set() and not stopping:  # forward the stop to the workers once
                stopping = True
                todo.clear()
                for process in list(getattr(self.pool, "_processes", {}).values()):
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGTERM)
            done, _ = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
            self._drain(display)
            for future in done:
                futures.pop(future)
                yield from future.result().items()

    def _drain(self, display) -> None:
        while True:
            try:
                item = self.progress_queue.get_nowait()
            except (queue.Empty, OSError, EOFError):
                return
            if display:
                display.progress(*item)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
