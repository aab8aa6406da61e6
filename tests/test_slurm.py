"""Studies on a real one-node SLURM cluster started here (scripts/slurm-local.sh): a preempted
and a requeued run resume from their checkpoints, --no-wait hands over to a later command, the
results equal the local runner's, and bad input is one line."""
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from normlab import rundir
from normlab.cli import main

from clusters import REQUIRED, read_only_mounts_work
from conftest import same_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"
if not REQUIRED:
    pytest.importorskip("submitit", reason="submitit is not installed: pip install -e '.[slurm]'")


@pytest.fixture(scope="module")
def slurm():
    """A one-node cluster; jobs see `readonly` read-only where mount namespaces allow it."""
    root = Path(tempfile.mkdtemp(prefix="nlslurm", dir="/tmp"))  # short: munge's socket path is limited
    readonly = root / "readonly"
    readonly.mkdir()
    env = dict(os.environ, NORMLAB_SLURM_DIR=str(root / "cluster"))
    if read_only_mounts_work(readonly):
        env["NORMLAB_SLURM_READONLY"] = str(readonly)
    else:
        readonly = None
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True)
    if started.returncode:
        reason = (started.stderr.strip() or started.stdout.strip() or "no output").splitlines()[-1]
        shutil.rmtree(root, ignore_errors=True)
        if REQUIRED:
            pytest.fail(f"the local SLURM cluster did not start: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(root / "cluster" / "slurm.conf"))
        yield {"readonly": readonly}
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def squeue(task: str) -> tuple[str, str]:
    """(state, reason) of an array task, e.g. ('PENDING', 'BeginTime')."""
    line = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%T %r", "-j", task],
                          capture_output=True, text=True).stdout.strip()
    state, _, reason = line.partition(" ")
    return state, reason


def start_requeued_jobs_now(array: str) -> None:
    """SLURM holds a requeued job back for two minutes (BeginTime); tests need not wait."""
    lines = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %r", "-j", array],
                           capture_output=True, text=True).stdout.splitlines()
    for line in lines:
        task, state, reason = line.split(maxsplit=2)
        if state == "PENDING" and reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], capture_output=True)


def scontrol_show(task: str) -> str:
    return subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout


def reproduce_command(preset, out, data, *extra):
    return [sys.executable, "-m", "normlab", "reproduce", "--preset", str(preset), "--out", str(out),
            "--data-dir", str(data), "--quiet", "--backend", "slurm", "--partition", "debug",
            "--time", "00:30:00", "--cpus-per-run", "1", *extra]


def wait_mid_run(runs: dict[str, str], out: Path, timeout: float = 300) -> dict[str, list[dict]]:
    """Wait until every run (id -> array task) has finished an epoch, not its last, in a running
    task, all at the same moment; their metrics then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = {rid: rundir.read_json(out / rid / rundir.STATUS) or {} for rid in runs}
        if all(s.get("state") == "running" and 1 <= s.get("epoch", 0) < 3 for s in status.values()) and \
                all(squeue(task)[0] == "RUNNING" for task in runs.values()):
            return {rid: rundir.read_metrics(out / rid / rundir.METRICS) for rid in runs}
        time.sleep(0.1)
    pytest.fail(f"{', '.join(runs)} were never mid-run at the same moment")


def wait_for_state(run: Path, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (rundir.read_json(run / rundir.STATUS) or {}).get("state") != state:
        assert time.monotonic() < deadline, f"{run.name} never became {state}"
        time.sleep(0.1)


def test_slurm_study_preempted_and_requeued_equals_local(slurm, tiny_reference, tmp_path):
    preset, data, reference = tiny_reference
    out = tmp_path / "slurm"
    command = reproduce_command(preset, out, data, "--checkpoint-every", "0.005", "--sbatch", "comment=normlab-test")
    submitted = subprocess.run(command + ["--no-wait"], capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    assert "3 runs submitted" in submitted.stdout and not (out / "report.md").exists()
    tasks = rundir.read_json(out / ".slurm" / "jobs.json")["runs"]  # run id -> array task
    array = next(iter(tasks.values())).split("_")[0]
    assert "Comment=normlab-test" in scontrol_show(next(iter(tasks.values())))
    # the first two tasks start at once (the node has 2 CPUs): one gets SLURM's warning signal,
    # as before a time limit or a preemption; the other is killed and requeued outright
    preempted, requeued = [rid for rid, task in sorted(tasks.items(), key=lambda kv: int(kv[1].split("_")[1]))][:2]
    # both at once, so that neither can finish while the other is dealt with, however fast the machine
    before = wait_mid_run({rid: tasks[rid] for rid in (preempted, requeued)}, out)
    subprocess.run(["scancel", "--signal=USR2", tasks[preempted]], check=True)
    subprocess.run(["scontrol", "requeue", tasks[requeued]], check=True)
    wait_for_state(out / preempted, "interrupted")  # it checkpointed at once (SLURM holds it back now)
    assert main(["report", str(out)]) == 0  # what has finished so far, while the runs are away
    (out / "report.md").unlink()
    # a later command picks the queued runs up, waits for them and writes the report
    waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while waiting.poll() is None and time.monotonic() < deadline:
        start_requeued_jobs_now(array)
        time.sleep(1)
    stdout, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, stderr
    assert "0 runs submitted" in stdout and (out / "report.md").exists()
    same_metrics(out, reference)
    for rid in (preempted, requeued):
        assert "Restarts=1" in scontrol_show(tasks[rid])
        # resumed from the checkpoint, not restarted: the rows written before are kept as they were
        rows = rundir.read_metrics(out / rid / rundir.METRICS)
        assert rows[:len(before[rid])] == before[rid]
    log = (out / ".slurm" / tasks[preempted] / f"{tasks[preempted]}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in log and "Requeued" in (out / ".slurm" / tasks[preempted] /
                                                             f"{tasks[preempted]}_0_log.out").read_text()


class Planted:
    """Unpickling this object calls open(canary, 'w'): it creates a file."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def next_job_id() -> int:
    """SLURM numbers jobs in sequence: the id the next submission will get."""
    done = subprocess.run(["sbatch", "--parsable", "--partition", "debug", "--hold", "--output", "/dev/null",
                           "--wrap", "true"], capture_output=True, text=True, check=True)
    job = done.stdout.strip().split(";")[0]
    subprocess.run(["scancel", job], capture_output=True)
    return int(job) + 1


def test_a_planted_result_pickle_never_runs(slurm, tiny_reference, tmp_path):
    """A result pickle planted where each task's will be (job ids are sequential) is never read:
    each task's outcome is the JSON it writes."""
    preset, data, reference = tiny_reference
    out, canary = tmp_path / "slurm", tmp_path / "canary"
    array = next_job_id()
    for task in range(3):
        folder = out / ".slurm" / f"{array}_{task}"
        folder.mkdir(parents=True)
        (folder / f"{array}_{task}_0_result.pkl").write_bytes(pickle.dumps(("success", Planted(canary))))
    (out / ".slurm").chmod(0o700)
    done = subprocess.run(reproduce_command(preset, out, data), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert not canary.exists()
    assert sorted(rundir.read_json(out / ".slurm" / "jobs.json")["runs"].values()) == \
        [f"{array}_{task}" for task in range(3)]  # the planted ids were the tasks' own
    same_metrics(out, reference)


def test_seeds_fused_into_one_task_equal_the_local_array(slurm, tiny_reference, tmp_path):
    """--fuse 2: the two seeds of a run train as one array in one task (jobs.json maps both to
    it), with the metrics of the same array trained here."""
    from normlab.config import RuntimeOptions
    from normlab.study import expand, run_study

    _, data, _ = tiny_reference
    preset = tmp_path / "seeds.yaml"
    preset.write_text("name: seeds\nbase: {model: resnet8, data: cifar10, epochs: 2, batch_size: 10}\n"
                      "studies:\n  norms:\n    - {norm: [bn]}\n")
    local = tmp_path / "local"
    results = run_study(expand(str(preset), seeds=2), local, RuntimeOptions(data_dir=str(data), threads=1,
                                                                           progress=False),
                        array_size=lambda cfg: 2)
    assert all(r["state"] == "done" for r in results.values())
    out = tmp_path / "slurm"
    done = subprocess.run(reproduce_command(preset, out, data, "--seeds", "2", "--fuse", "2"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 runs submitted in 1 task (2 of them fused into run arrays)" in done.stdout
    tasks = rundir.read_json(out / ".slurm" / "jobs.json")["runs"]
    assert len(tasks) == 2 and len(set(tasks.values())) == 1
    same_metrics(out, local)


def cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra,message", [
    (["--gpus-per-run", "0"], "--gpus-per-run must be positive"),
    (["--gpus-per-run", "1"], "--gpus-per-run 1 is more than a node of partition 'debug' has (0 GPUs)"),
    (["--gpus-per-run", "0.5"], "--gpus-per-run must be a whole number"),
    (["--cpus-per-run", "999"], "--cpus-per-run 999 is more than a node of partition 'debug' has"),
    (["--partition", "nope"], "no partition 'nope' on this SLURM cluster; choose one with --partition: debug"),
    (["--time", "soon"], "--time must be a time limit per run"),
    (["--address", "auto"], "--address is for --backend ray"),
    (["--sbatch", "account"], "--sbatch expects KEY=VALUE"),
])
def test_slurm_bad_input(capsys, slurm, tiny_reference, tmp_path, extra, message):
    preset, data, _ = tiny_reference
    out = tmp_path / "o"
    code, _, err = cli(capsys, "reproduce", "--preset", str(preset), "--out", str(out), "--data-dir", str(data),
                       "--quiet", "--backend", "slurm", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.rglob("*.json"))


def test_slurm_nodes_that_cannot_write_the_results(capsys, slurm, tiny_reference):
    if slurm["readonly"] is None:
        pytest.skip("no mount namespaces here (needs root): cannot make a directory read-only for the jobs")
    preset, data, _ = tiny_reference
    out = slurm["readonly"] / "results"
    code, _, err = cli(capsys, "reproduce", "--preset", str(preset), "--out", str(out), "--data-dir", str(data),
                       "--quiet", "--backend", "slurm")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "without writing its log" in err and "every node shares and can write" in err
    assert not list(out.rglob(rundir.CONFIG)) and not (out / "report.md").exists()


def test_no_sbatch_on_the_path(capsys, monkeypatch, tiny_reference, tmp_path):
    preset, data, _ = tiny_reference
    monkeypatch.setenv("PATH", str(tmp_path))  # a directory without SLURM's commands
    code, _, err = cli(capsys, "reproduce", "--preset", str(preset), "--out", str(tmp_path / "o"), "--quiet",
                       "--backend", "slurm")
    assert code == 2 and "'sbatch' is not on the PATH" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_slurm_without_the_extra(tiny_reference, tmp_path):
    preset, _, _ = tiny_reference
    code = ("import sys; sys.modules['submitit'] = None; from normlab.cli import main; "
            f"sys.exit(main(['reproduce', '--preset', {str(preset)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--backend', 'slurm']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == \
        "normlab: error: --backend slurm needs submitit, an extra of normlab: pip install 'normlab[slurm]'"
    assert not (tmp_path / "o").exists()
