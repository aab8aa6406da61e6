"""The run directory: the only interface between training and everything else.

    config.json     the run config, effective groups per layer, versions, device, data
    metrics.csv     one row per finished epoch
    checkpoint.pt   everything needed to resume exactly
    status.json     running / done / diverged / failed / interrupted, with a summary
    .lock           held (flock) by the process training the run

Every file is written and read through files.py (re-exported here): atomically, with the
user's umask, never through a symbolic link below the results directory, within bounds.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import statistics
from pathlib import Path

from .files import (DEFAULT_LIMIT, LIMITS, MiB, Unreadable, _HOST, append_line, atomic_write,  # noqa: F401
                    commit, confine, hard_link, load_json, make_dir, open_lock_file, parse_json,
                    read_bytes, read_json, read_text, remove, remove_stale_temps, rename_aside,
                    size_text, stage)

CONFIG, METRICS, CHECKPOINT, STATUS, LOCK = (
    "config.json", "metrics.csv", "checkpoint.pt", "status.json", ".lock")
FINISHED = ("done", "diverged")


def read_status(path: Path) -> dict | None:
    """status.json with the fields normlab uses checked (a wrong one is dropped), or None when
    it is absent, unreadable or has no state: a status written by someone else never crashes
    a line that prints it."""
    status = read_json(path)
    if status is None or not isinstance(status.get("state"), str) or len(status["state"]) > 40:
        return None
    summary = status.get("summary")
    status["summary"] = {k: v for k, v in summary.items() if type(v) in (int, float) and math.isfinite(v)} \
        if isinstance(summary, dict) else {}
    for key, kind in (("epoch", int), ("epochs", int), ("diverged_in_epoch", int), ("error", str)):
        if key in status and type(status[key]) is not kind:
            del status[key]
    return status


def write_json(path: Path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


# -- metrics.csv ------------------------------------------------------------------------------
def write_metrics(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode())


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.csv with numbers as floats (epoch as int); [] when absent. A file that
    is not normlab's (unreadable, a row that is not numbers, epochs out of order) is
    Unreadable."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        return []
    out, line = [], 1
    try:
        for line, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):
            if None in row or None in row.values() or "epoch" not in row:
                raise ValueError("the wrong number of fields")
            parsed = {k: float(v) if v != "" else math.nan for k, v in row.items()}
            if not math.isfinite(parsed["epoch"]) or parsed["epoch"] != len(out) + 1:
                raise ValueError(f"epoch {row['epoch']} where {len(out) + 1} belongs")
            parsed["epoch"] = len(out) + 1
            out.append(parsed)
    except (ValueError, csv.Error) as err:
        raise Unreadable(f"{path} line {line} is damaged "
                         f"({str(err).splitlines()[0][:100]})") from None
    return out


def final_epochs(epochs: int) -> int:
    """How many final epochs the reported median takes: the GN paper's 5 of 100, but never more
    than half the run (at least one), so that a short run's early, far-from-converged epochs do
    not count (3 epochs: the last one; 7: the final 3; 10 or more: the final 5)."""
    return max(1, min(5, epochs // 2))


def summarize(rows: list[dict], epochs: int | None = None) -> dict:
    """The GN paper's number: the median error of the final `final_epochs(epochs)` epochs
    (epochs: the run's planned length, default the rows it has). The keys keep their historical
    names (median_final5_*); `final_epochs` says how many epochs the medians took."""
    if not rows:
        return {}
    last = final_epochs(epochs if epochs is not None else len(rows))
    tail = rows[-last:]
    summary = {"epochs_done": rows[-1]["epoch"],
               "final_epochs": len(tail),
               "final_test_error": rows[-1]["test_error"],
               "median_final5_test_error": statistics.median(r["test_error"] for r in tail),
               "median_final5_train_error": statistics.median(r["train_error"] for r in tail)}
    if "val_error" in rows[-1]:
        summary["median_final5_val_error"] = statistics.median(r["val_error"] for r in tail)
    return summary


class RunLock:
    """An exclusive flock on <run>/.lock. The kernel drops it when the holder dies, so a lock
    left by a killed process is simply taken over by the next one."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.fd = open_lock_file(self.path)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def list_runs(root: Path) -> list[Path]:
    """Run directories under root (any depth), identified by their config.json; directories
    that are links are not entered."""
    root = Path(root)
    if (root / CONFIG).exists():
        return [root]
    found = []
    for here, dirs, files in os.walk(root):  # followlinks=False
        dirs[:] = sorted(d for d in dirs if ".old-" not in d)
        if CONFIG in files:
            found.append(Path(here))
    return sorted(found)
