"""Never lose a run: kill -9 at random moments, locks, config changes, full disks."""
import errno
import hashlib
import io
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from normlab import rundir
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.data import load_dataset
from normlab.train import RunBusy, train
from normlab.errors import NormlabError
from normlab.report import build_report

from conftest import strip, write_cifar_fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from soak import kill_then_finish  # noqa: E402  (the soak's, CI-sized here)


def study_command(preset, out, data, *extra):
    return [sys.executable, "-m", "normlab", "reproduce", "--preset", str(preset), "--out", str(out),
            "--data-dir", str(data), "--quiet", "--threads", "1", *extra]


@pytest.fixture
def tiny_study(tmp_path):
    data = write_cifar_fixture(tmp_path / "data", n_per_file=100)
    preset = tmp_path / "tiny.yaml"
    preset.write_text("name: tiny\nworkers: 1\nbase: {model: resnet8, data: cifar10, epochs: 3, batch_size: 10}\n"
                      "studies:\n  norms:\n    - {norm: [bn, 'gn:4', ln]}\n")
    return preset, data


def compare_with_reference(out, ref):
    runs = sorted(p.name for p in ref.iterdir() if (p / rundir.CONFIG).exists())
    assert len(runs) == 3
    for name in runs:
        assert rundir.read_json(out / name / rundir.STATUS)["state"] == "done"
        assert strip(rundir.read_metrics(out / name / rundir.METRICS)) == \
            strip(rundir.read_metrics(ref / name / rundir.METRICS)), name


def test_kill_9_at_random_moments_then_rerun_gives_the_same_results(tiny_study, tmp_path):
    preset, data = tiny_study
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(study_command(preset, ref, data), check=True, capture_output=True)
    rng = random.Random(int(os.environ.get("NORMLAB_FAULT_SEED", "0")))
    # checkpoints within epochs too (every 0.3 s), so kills land mid-epoch and mid-write; after
    # each kill the report must be readable
    kills = kill_then_finish(study_command(preset, out, data, "--checkpoint-every", "0.005"), out, kills=6,
                             max_delay=0.4, rng=rng,
                             after_kill=lambda: build_report(out) if any(out.glob("*/config.json")) else None)
    print(f"fault injection: study finished after {kills} kill -9s")
    assert kills >= 3, f"only {kills} kills landed"
    compare_with_reference(out, ref)
    assert not list(out.rglob("*.tmp"))  # no half-written file is left visible to readers


def test_two_processes_on_one_results_directory(tiny_study, tmp_path):
    preset, data = tiny_study
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(study_command(preset, ref, data), check=True, capture_output=True)
    procs = [subprocess.Popen(study_command(preset, out, data), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    for p in procs:
        p.wait(timeout=300)
        assert p.returncode == 0, p.stderr.read().decode()
    compare_with_reference(out, ref)


def hold_lock(path, ready):
    lock = rundir.RunLock(path)
    assert lock.acquire()
    ready.set()
    time.sleep(600)


def test_lock_of_a_killed_process_is_taken_over(tmp_path, cifar_fixture):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(tmp_path, ready))
    holder.start()
    assert ready.wait(60)
    assert not rundir.RunLock(tmp_path).acquire()
    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")
    with pytest.raises(RunBusy):
        train(cfg, tmp_path, RuntimeOptions(data_dir=str(cifar_fixture), progress=False))
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    lock = rundir.RunLock(tmp_path)
    assert lock.acquire()
    lock.release()
    assert train(cfg, tmp_path, RuntimeOptions(data_dir=str(cifar_fixture), progress=False))["state"] == "done"


def cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_changed_config_is_refused_then_forced(capsys, cifar_fixture, tmp_path):
    run = tmp_path / "run"
    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False)
    train(cfg, run, opts)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    changed = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=2, data="cifar10", seed=1)
    with pytest.raises(NormlabError, match=r"different config \(epochs: 1 -> 2; seed: 0 -> 1\).*--force"):
        train(changed, run, opts)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert train(changed, run, opts, force=True)["state"] == "done"
    (old,) = tmp_path.glob("run.old-*")
    assert (old / rundir.METRICS).read_bytes() == before[rundir.METRICS]


def test_full_disk_is_one_line_and_keeps_existing_results(capsys, cifar_fixture, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    common = ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "20", "--epochs", "1",
              "--data", "cifar10", "--data-dir", str(cifar_fixture), "--out", str(out), "--quiet"]
    assert cli(capsys, *common)[0] == 0
    (done,) = out.iterdir()
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    code, _, err = cli(capsys, *common[:-3], "--seed", "1", "--out", str(out), "--quiet")
    assert code == 2 and "no space left" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()} == before
    assert not list(out.rglob("*.tmp"))


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    code, _, err = cli(capsys, "train", "--epochs", "1", "--out", str(blocker / "runs"))
    assert code == 2 and f"{blocker} is not a directory; move it away, or use another --out" in err
    code, _, err = cli(capsys, "reproduce", "--out", str(blocker / "results"), "--quiet")
    assert code == 2 and "--out" in err and str(blocker) in err and len(err.strip().splitlines()) == 1


def test_checksum_mismatch_on_download(tmp_path, monkeypatch):
    payload = b"not the cifar archive" * 1000

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Response(payload))
    with pytest.raises(NormlabError, match=rf"checksum mismatch.*MD5 {hashlib.md5(payload).hexdigest()}"):
        load_dataset("cifar10", tmp_path / "fresh")
    assert not any((tmp_path / "fresh").iterdir())


def test_diverging_train_is_one_line_exit_2(capsys, cifar_fixture, tmp_path):
    code, _, err = cli(capsys, "train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "10",
                       "--epochs", "2", "--base-lr", "1e6", "--no-zero-init", "--data", "cifar10",
                       "--data-dir", str(cifar_fixture), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2 and "diverged in epoch" in err and "--base-lr" in err
    assert len(err.strip().splitlines()) == 1
    (run,) = (tmp_path / "o").iterdir()
    assert rundir.read_json(run / rundir.STATUS)["state"] == "diverged"


def test_reproduce_force_restarts_a_run_whose_config_changed(cifar_fixture, tmp_path):
    from normlab.study import expand, run_study
    preset = tmp_path / "p.yaml"
    preset.write_text("base: {model: resnet8, data: cifar10, epochs: 1, batch_size: 20}\n"
                      "studies:\n  norms:\n    - {norm: ['gn:4']}\n")
    study = expand(str(preset))
    (run_id,) = study.runs
    out = tmp_path / "out"
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False)
    # a directory of that name holding another config (as after a hash collision or a hand copy)
    train(RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=2, data="cifar10"), out / run_id, opts)
    results = run_study(study, out, opts, workers=1)
    assert results[run_id]["state"] == "failed" and "different config" in results[run_id]["error"]
    results = run_study(study, out, opts, workers=1, force=True)
    assert results[run_id]["state"] == "done" and len(list(out.glob(f"{run_id}.old-*"))) == 1
