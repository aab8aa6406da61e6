"""Helpers for the tests that start real clusters on this machine (Ray, SLURM)."""
import os
import socket
import subprocess
from pathlib import Path

# In CI (.ci/run) a cluster that cannot start is a failure, not a skip.
REQUIRED = os.environ.get("NORMLAB_REQUIRE_CLUSTERS") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


READ_ONLY_HERE = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0"'


def read_only_mounts_work(path: Path) -> bool:
    """Can a process get its own mount namespace with `path` read-only (root, CAP_SYS_ADMIN)?
    The tests use one to make a directory that this process can write and a cluster cannot."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_HERE, str(path)],
                           capture_output=True)
    return probe.returncode == 0
