"""Checkpoints are data, never code: safe loading, the SHA-256 record, crash consistency."""
import builtins
import hashlib
import pickle

import pytest
import torch

from normlab import checkpoint, rundir
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import train
from normlab.errors import NormlabError

CFG = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")


class Planted:
    """Unpickling this object calls open(marker, 'w'): it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def finished_run(cifar_fixture, tmp_path):
    run = tmp_path / "runs" / CFG.run_id()
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False)
    assert train(CFG, run, opts)["state"] == "done"
    return run, opts


def record(run):
    digest = hashlib.sha256((run / rundir.CHECKPOINT).read_bytes()).hexdigest()
    (run / checkpoint.RECORD).write_text(f"{digest}  {rundir.CHECKPOINT}\n")


def test_a_real_checkpoint_loads_with_the_safe_loader(finished_run):
    run, _ = finished_run
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)  # as a user would, too
    assert state["epoch"] == 1 and set(state["numpy_rng"]) == {"kind", "keys", "pos", "has_gauss", "gauss"}
    line = (run / checkpoint.RECORD).read_text().split()
    assert line == [hashlib.sha256((run / rundir.CHECKPOINT).read_bytes()).hexdigest(), rundir.CHECKPOINT]


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_planted_pickle_never_runs(finished_run, tmp_path, capsys, cifar_fixture, how):
    run, opts = finished_run
    marker = tmp_path / "pwned"
    with open(run / rundir.CHECKPOINT, "wb") as f:
        torch.save({"model": Planted(marker)}, f) if how == "torch.save" else pickle.dump(Planted(marker), f)
    record(run)  # whoever planted it also recorded its hash
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(NormlabError, match="holds objects other than tensors"):
        train(CFG, run, opts)
    args = ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "20", "--epochs", "1",
            "--data", "cifar10", "--data-dir", str(cifar_fixture), "--out", str(run.parent), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds objects other than tensors" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()  # no code in it ran
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # --force starts afresh and keeps the planted directory aside, untouched
    assert main(args + ["--force"]) == 0 and not marker.exists()
    (old,) = run.parent.glob(f"{run.name}.old-*")
    assert (old / rundir.CHECKPOINT).read_bytes() == before[rundir.CHECKPOINT]
    assert rundir.read_json(run / rundir.STATUS)["state"] == "done"


def test_a_changed_checkpoint_is_refused(finished_run):
    run, opts = finished_run
    data = bytearray((run / rundir.CHECKPOINT).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / rundir.CHECKPOINT).write_bytes(bytes(data))
    with pytest.raises(NormlabError, match="does not match the SHA-256 recorded"):
        train(CFG, run, opts)
    (run / checkpoint.RECORD).unlink()
    with pytest.raises(NormlabError, match="has no SHA-256 record"):
        train(CFG, run, opts)


def test_a_crash_between_checkpoint_and_record_loses_nothing(tmp_path):
    path = tmp_path / rundir.CHECKPOINT
    checkpoint.save(path, {"step": torch.tensor(1)})
    # the steps of save(), stopped after each one: whichever file is in place loads
    data = tmp_path / "new"
    torch.save({"step": torch.tensor(2)}, data)
    new = hashlib.sha256(data.read_bytes()).hexdigest()
    staged = rundir.stage(path, data.read_bytes())
    assert checkpoint.load(path)["step"] == 1
    old = checkpoint._recorded(tmp_path / checkpoint.RECORD, path.name)
    checkpoint._write_record(tmp_path / checkpoint.RECORD, path.name, [new, *old])
    assert checkpoint.load(path)["step"] == 1
    rundir.commit(staged, path)
    assert checkpoint.load(path)["step"] == 2
    checkpoint.save(path, {"step": torch.tensor(3)})
    assert checkpoint.load(path)["step"] == 3
    assert len((tmp_path / checkpoint.RECORD).read_text().splitlines()) == 1


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    host = rundir._HOST
    dead = tmp_path / f".checkpoint.pt.{host}.999999999.abc.tmp"   # no such pid
    live = tmp_path / f".checkpoint.pt.{host}.1.abc.tmp"           # pid 1 is alive
    other = tmp_path / ".checkpoint.pt.otherhost.999999999.abc.tmp"  # another machine's
    for p in (dead, live, other):
        p.write_text("x")
    assert rundir.remove_stale_temps(tmp_path) == 1
    assert not dead.exists() and live.exists() and other.exists()
