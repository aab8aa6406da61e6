"""The run directory: the only interface between training and everything else.

    config.json     the run config, effective groups per layer, versions, device, data
    metrics.csv     one row per finished epoch
    checkpoint.pt   everything needed to resume exactly
    status.json     running / done / diverged / failed / interrupted, with a summary
    .lock           held (flock) by the process training the run

Every file is written atomically (temporary file, fsync, rename): after a crash at any
moment each file is either complete or absent.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

from .errors import NormlabError

CONFIG, METRICS, CHECKPOINT, STATUS, LOCK = (
    "config.json", "metrics.csv", "checkpoint.pt", "status.json", ".lock")
FINISHED = ("done", "diverged")
_HOST = socket.gethostname().replace(".", "_") or "host"


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path so that readers see the old file or the new one, never a mix."""
    commit(stage(path, data), path)


def stage(path: Path, data: bytes) -> Path:
    """Write data, fsynced, to a temporary file beside path (named after this host and process,
    so that remove_stale_temps knows whose it is); commit() puts it in place."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)
    except OSError as err:
        raise _write_error(path, err) from None


def commit(tmp: Path, path: Path) -> None:
    """Rename a staged file over path and make the rename durable (fsync of the directory)."""
    path = Path(path)
    try:
        try:
            _fault_point(path)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise _write_error(path, err) from None


def _write_error(path: Path, err: OSError) -> NormlabError:
    if err.errno == errno.ENOSPC:
        return NormlabError(f"no space left to write {path}; free disk space or choose another "
                            f"--out, then run the same command again to resume")
    return NormlabError(f"cannot write {path} ({err.strerror}); choose a writable --out")


def _fault_point(path: Path) -> None:
    """For the soak test (scripts/soak.py) only: NORMLAB_FAULT_WRITE_DELAY=S holds every write
    S seconds between its temporary file and the rename, so that random kills land there."""
    delay = os.environ.get("NORMLAB_FAULT_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))


def remove_stale_temps(directory: Path) -> int:
    """Delete temporary files that a killed process of this host left in directory (a live
    process's, or another host's, are kept). Returns how many were removed."""
    removed = 0
    for tmp in Path(directory).glob(f".*.{_HOST}.*.tmp"):
        pid = tmp.name[:-len(".tmp")].split(f".{_HOST}.", 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_metrics(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode())


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.csv with numbers as floats (epoch as int)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for row in rows:
        parsed = {k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()}
        parsed["epoch"] = int(parsed["epoch"])
        out.append(parsed)
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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
    """Run directories under root (any depth), identified by their config.json."""
    root = Path(root)
    if (root / CONFIG).exists():
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG) if ".old-" not in p.parent.name)
