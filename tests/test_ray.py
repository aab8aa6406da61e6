"""Studies on a real Ray cluster started here: results equal the local runner's, a worker
killed mid-run costs only the time since the run's checkpoint, and bad input is one line."""
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from normlab import rundir
from normlab.cli import main
from normlab.config import RuntimeOptions
from normlab.study import expand, run_study

from clusters import READ_ONLY_HERE, REQUIRED, free_port, read_only_mounts_work
from conftest import same_metrics

if not REQUIRED:
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster (4 logical CPUs, 1 logical GPU) in its own process group. Where
    possible it runs in a mount namespace in which `readonly` is read-only: a directory this
    process can write and the cluster's workers cannot."""
    root = Path(tempfile.mkdtemp(prefix="nlray", dir="/tmp"))  # short: Ray's socket paths are limited
    readonly = root / "readonly"
    readonly.mkdir()
    port = free_port()
    command = [str(RAY), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
               "--num-cpus", "4", "--num-gpus", "1", "--include-dashboard", "false", "--disable-usage-stats",
               "--temp-dir", str(root / "ray"), "--object-store-memory", str(80 * 2**20)]
    for flag in ("--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
                 "--object-manager-port"):
        command += [flag, str(free_port())]
    isolated = read_only_mounts_work(readonly)
    if isolated:
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_HERE + ' && exec "$@"',
                   str(readonly), *command]
    log = open(root / "ray-start.log", "w")
    proc = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in (root / "ray-start.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray start failed:\n{(root / 'ray-start.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"address": f"127.0.0.1:{port}", "readonly": readonly if isolated else None}
    end_session(proc)
    log.close()
    shutil.rmtree(root, ignore_errors=True)


def end_session(proc: subprocess.Popen) -> None:
    """Stop the cluster: every process of the session that `ray start` leads (its workers have
    process groups of their own)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    proc.wait()


def session_members(sid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            members.append(int(stat.parent.name))
    return members


class Recorder:
    """A display that records what the backend tells it."""

    def __init__(self):
        self.progress_items, self.ended = [], []

    def start(self, study, results, pending):
        pass

    def begin(self, run_id):
        pass

    def progress(self, run_id, epoch, step, steps):
        self.progress_items.append((run_id, epoch, step, steps))

    def defer(self, run_id):
        pass

    def end(self, run_id, status):
        self.ended.append(run_id)


def held_lock_pid(run: Path) -> int | None:
    """The pid training `run` if its lock is held now (RunLock writes the holder's pid)."""
    try:
        fd = os.open(run / rundir.LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it
    except BlockingIOError:
        text = os.read(fd, 32).decode().strip()
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)


def watch_and_kill(out: Path, killed: dict, trainers: list, stop: threading.Event) -> None:
    """Count the runs being trained at once (their locks are held), and kill -9 the Ray worker
    training the first run that has finished an epoch but not its last."""
    while not stop.is_set():
        held = {run: held_lock_pid(run) for run in sorted(out.glob("resnet8-*"))}
        trainers.append(sum(pid is not None for pid in held.values()))
        for run, pid in held.items():
            status = rundir.read_json(run / rundir.STATUS) or {}
            if not killed and status.get("state") == "running" and 1 <= status.get("epoch", 0) < 3 and pid:
                killed.update(run=run.name, pid=pid, first_row=rundir.read_metrics(run / rundir.METRICS)[0])
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def test_ray_study_equals_local_and_a_killed_worker_resumes(cluster, tiny_reference, tmp_path, monkeypatch):
    preset, data, reference = tiny_reference
    out = tmp_path / "ray"
    from normlab.backends.ray import RayBackend

    opts = RuntimeOptions(data_dir=str(data), progress=False, checkpoint_minutes=0.005)
    display, killed, trainers, stop = Recorder(), {}, [], threading.Event()
    killer = threading.Thread(target=watch_and_kill, args=(out, killed, trainers, stop))
    killer.start()
    try:
        with RayBackend(opts, address=cluster["address"], cpus_per_run=1, gpus_per_run=0.5) as backend:
            results = run_study(expand(str(preset)), out, opts, display=display, backend=backend)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed mid-run"
    assert all(r["state"] == "done" for r in results.values()), results
    same_metrics(out, reference)
    # resumed, not restarted: the first epoch's row (with its timing) is the one from before the kill
    assert rundir.read_metrics(out / killed["run"] / rundir.METRICS)[0] == killed["first_row"]
    # live progress came from the tasks; half a GPU each: two runs at once on the cluster's one GPU
    assert {item[0] for item in display.progress_items} == set(results)
    assert max(trainers) == 2
    info = rundir.read_json(out / killed["run"] / rundir.CONFIG)
    assert info["threads"] == 1  # --cpus-per-run sets the run's threads, as --threads does locally
    # the same command again (--address auto: the cluster in $RAY_ADDRESS): finished runs are skipped
    monkeypatch.setenv("RAY_ADDRESS", cluster["address"])
    before = {run: (out / run / rundir.METRICS).read_bytes() for run in results}
    code = main(["reproduce", "--preset", str(preset), "--out", str(out), "--data-dir", str(data), "--quiet",
                 "--backend", "ray", "--cpus-per-run", "1"])
    assert code == 0 and (out / "report.md").exists()
    assert {run: (out / run / rundir.METRICS).read_bytes() for run in results} == before


def cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra,message", [
    (["--gpus-per-run", "0"], "--gpus-per-run must be positive"),
    (["--gpus-per-run", "-1"], "--gpus-per-run must be positive"),
    (["--cpus-per-run", "0"], "--cpus-per-run must be positive"),
    (["--gpus-per-run", "2"], "more than the largest node of the Ray cluster has (1 GPUs)"),
    (["--gpus-per-run", "1.5"], "above 1 it takes whole GPUs"),
    (["--cpus-per-run", "64"], "more than the largest node of the Ray cluster has (4 CPUs)"),
    (["--device", "cuda:1"], "names a GPU of this machine"),
    (["--partition", "debug"], "--partition is for --backend slurm"),
    (["--address", "127.0.0.1:{free}"], "no Ray cluster answers at 127.0.0.1:"),
    (["--address", "nonsense"], "--address must be auto or HOST:PORT"),
])
def test_ray_bad_input(capsys, cluster, tiny_reference, tmp_path, extra, message):
    preset, data, _ = tiny_reference
    extra = [e.replace("{free}", str(free_port())) for e in extra]
    address = [] if "--address" in extra else ["--address", cluster["address"]]
    out = tmp_path / "o"
    code, _, err = cli(capsys, "reproduce", "--preset", str(preset), "--out", str(out), "--data-dir", str(data),
                       "--quiet", "--backend", "ray", *address, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.rglob("*.json"))


def test_ray_workers_that_cannot_write_the_results(capsys, cluster, tiny_reference):
    if cluster["readonly"] is None:
        pytest.skip("no mount namespaces here (needs root): cannot make a directory read-only for the workers")
    preset, data, _ = tiny_reference
    out = cluster["readonly"] / "results"
    code, _, err = cli(capsys, "reproduce", "--preset", str(preset), "--out", str(out), "--data-dir", str(data),
                       "--quiet", "--backend", "ray", "--address", cluster["address"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the Ray workers cannot use the results directory" in err and "Read-only file system" in err
    assert not any(out.iterdir())  # the driver could write here, and left nothing


def test_ray_without_the_extra(tiny_reference, tmp_path):
    preset, data, _ = tiny_reference
    code = ("import sys; sys.modules['ray'] = None; from normlab.cli import main; "
            f"sys.exit(main(['reproduce', '--preset', {str(preset)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--backend', 'ray']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == \
        "normlab: error: --backend ray needs Ray, an extra of normlab: pip install 'normlab[ray]'"
    assert not (tmp_path / "o").exists()


def test_ctrl_c_checkpoints_the_running_runs_and_the_same_command_resumes(cluster, tiny_reference, tmp_path):
    preset, data, reference = tiny_reference
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "normlab", "reproduce", "--preset", str(preset), "--out", str(out),
               "--data-dir", str(data), "--quiet", "--backend", "ray", "--address", cluster["address"],
               "--cpus-per-run", "1", "--gpus-per-run", "0.5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any((rundir.read_json(run / rundir.STATUS) or {}).get("epoch", 0) >= 1
                  for run in out.glob("resnet8-*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    states = [rundir.read_json(run / rundir.STATUS)["state"] for run in out.glob("resnet8-*")]
    assert "interrupted" in states and "running" not in states  # each running run checkpointed
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    same_metrics(out, reference)
