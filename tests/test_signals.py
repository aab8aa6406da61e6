"""SIGINT and SIGTERM end every command promptly: exit 75 after a checkpoint while runs train,
130 or 143 at once where nothing was in progress (a long --dry-run, an expansion, a report),
one line, no traceback, nothing half-written (issue 18)."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_cifar_fixture

# 10,000 runs (the most a study may have): expanding and listing them takes seconds
BIG = "studies:\n  s:\n    - {" + ", ".join(f"{k}: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]" for k in (
    "epochs", "step_size", "base_batch", "seed")) + "}\n"


def normlab(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "normlab", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def handling(pid: int) -> bool:
    """Has normlab installed its signal handlers (past Python's and torch's start-up, where a
    signal ends the process as Python would)? It catches SIGTERM from then on."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def stop(proc, sig, wait: float = 0.5):
    """Send `sig` once the process handles it and has run `wait` seconds more; (exit code,
    stderr, seconds from the signal to the exit)."""
    deadline = time.monotonic() + 120
    while not handling(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(wait)
    assert proc.poll() is None, f"it ended before the signal: {proc.stderr.read()}"
    sent = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    return code, proc.stderr.read(), time.monotonic() - sent


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_long_dry_run_ends_at_once(tmp_path, sig, code):
    preset = tmp_path / "big.yaml"
    preset.write_text(BIG)
    proc = normlab("reproduce", "--preset", preset, "--dry-run", "--out", tmp_path / "results")
    got, err, _ = stop(proc, sig)
    assert got == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "stopped" in err
    assert not (tmp_path / "results").exists()


def test_training_checkpoints_and_exits_75(tmp_path):
    data = write_cifar_fixture(tmp_path / "data", n_per_file=200)
    out = tmp_path / "runs"
    proc = normlab("train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "10", "--epochs", "30",
                   "--data", "cifar10", "--data-dir", data, "--out", out, "--quiet", "--threads", "1")
    deadline = time.monotonic() + 300
    while not list(out.glob("*/metrics.csv")) and time.monotonic() < deadline:
        time.sleep(0.2)  # training is under way once an epoch is written
    got, err, _ = stop(proc, signal.SIGTERM, wait=0)
    assert got == 75, err
    assert "Traceback" not in err and "checkpoint saved" in err
    (run,) = out.iterdir()
    assert (run / "checkpoint.pt").exists() and "interrupted" in (run / "status.json").read_text()
