"""A results directory normlab did not write cannot make it change anything outside it, use
unbounded memory, or wait forever (issue 18). Each test plants what an attacker would: a link
whose target's content is checked afterwards, a sparse file of hundreds of MiB, a FIFO."""
import hashlib
import os
import stat
import threading
import tracemalloc

import pytest

from normlab import checkpoint, rundir
from normlab.cli import main
from normlab.config import RunConfig

from test_report import fake_run

CFG = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")
MiB = 1 << 20
BIG = 256 * MiB  # a sparse file: no disk used, but GBs of memory if read whole


def train_args(data, out, *extra):
    return ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "20", "--epochs", "1",
            "--data", "cifar10", "--data-dir", str(data), "--out", str(out), "--quiet", *extra]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def victim(tmp_path, name="precious.txt"):
    """A file outside the results directory that must never change."""
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("someone's thesis\n")
    return path


def unchanged(path) -> bool:
    return sorted(p.name for p in path.parent.iterdir()) == [path.name] and \
        path.read_text() == "someone's thesis\n"


# -- links: nothing outside the results directory changes ------------------------------------
def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(capsys, cifar_fixture, tmp_path):
    out, target = tmp_path / "runs", victim(tmp_path)
    (out / CFG.run_id()).mkdir(parents=True)
    (out / CFG.run_id() / rundir.LOCK).symlink_to(target)
    code, err = cli(capsys, *train_args(cifar_fixture, out))
    assert code == 2 and "is a symbolic link" in one_line(err) and rundir.LOCK in err
    assert unchanged(target)


def test_a_run_directory_that_is_a_link_is_not_written_through(capsys, cifar_fixture, tmp_path):
    out = tmp_path / "runs"
    other = tmp_path / "other-project"
    other.mkdir()
    (other / rundir.METRICS).write_text("epoch,loss\n1,0.5\n")
    out.mkdir()
    (out / CFG.run_id()).symlink_to(other, target_is_directory=True)
    code, err = cli(capsys, *train_args(cifar_fixture, out))
    assert code == 2 and "is a symbolic link" in one_line(err)
    assert sorted(p.name for p in other.iterdir()) == [rundir.METRICS]
    assert (other / rundir.METRICS).read_text() == "epoch,loss\n1,0.5\n"


def test_a_figures_folder_that_is_a_link_is_not_written_through(capsys, tmp_path):
    results = tmp_path / "results"
    fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6), 7.0)
    thesis = victim(tmp_path, "norms_resnet56_b32.png")
    (results / "figures").symlink_to(thesis.parent, target_is_directory=True)
    code, err = cli(capsys, "report", results)
    assert code == 2 and "figures is a symbolic link" in one_line(err)
    assert unchanged(thesis)


@pytest.mark.parametrize("name", ["trials.log", "optuna.journal", "locks"])
def test_the_search_never_writes_through_a_link(tmp_path, name):
    pytest.importorskip("optuna")
    from normlab.search.candidates import parse_candidates
    from normlab.search.plan import make_spec
    from normlab.search.trials import Search
    out = tmp_path / "search"
    out.mkdir()
    target = victim(tmp_path)
    (out / name).symlink_to(target.parent if name == "locks" else target)
    spec = make_spec(candidates=parse_candidates(None), seeds=2, min_epochs=None, reduction_factor=3,
                     val_split=None, overrides={}, model="resnet8", batch_size=32, data="sample", epochs=2)
    with pytest.raises(Exception, match="is a symbolic link") as err:
        Search(out, spec).log({"trial": 0, "outcome": "planted"})
    assert "NormlabError" in type(err.value).__name__
    assert unchanged(target)


# -- bounded reads ---------------------------------------------------------------------------
def sparse(path, size=BIG):
    with open(path, "wb") as f:
        f.truncate(size)


def peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", [rundir.CONFIG, rundir.METRICS, rundir.STATUS])
def test_a_huge_sparse_file_is_refused_before_it_is_read(capsys, tmp_path, name):
    results = tmp_path / "results"
    fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6), 7.0)
    bad = fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6, seed=1), 7.5)
    sparse(results / bad / name)
    peak = peak_bytes(lambda: main(["report", str(results)]))
    err = capsys.readouterr().err
    assert peak < 64 * MiB, f"{peak / MiB:.0f} MiB"
    assert (results / "report.md").exists() and "Traceback" not in err
    assert "more than the" in err and bad in err and len(err.strip().splitlines()) == 1


def test_a_huge_sparse_checkpoint_is_refused_before_it_is_read(capsys, cifar_fixture, tmp_path):
    out = tmp_path / "runs"
    assert main(train_args(cifar_fixture, out)) == 0
    run = out / CFG.run_id()
    sparse(run / rundir.CHECKPOINT)
    digest = hashlib.sha256()
    with open(run / rundir.CHECKPOINT, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    (run / checkpoint.RECORD).write_text(f"{digest.hexdigest()}  {rundir.CHECKPOINT}\n")
    capsys.readouterr()
    peak = peak_bytes(lambda: main(train_args(cifar_fixture, out)))
    err = capsys.readouterr().err
    assert peak < 64 * MiB, f"{peak / MiB:.0f} MiB"
    assert "more than the" in one_line(err) and "--force" in err


@pytest.mark.parametrize("name", [rundir.STATUS, rundir.CONFIG])
def test_a_fifo_is_refused_not_waited_on(tmp_path, name):
    results = tmp_path / "results"
    fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6), 7.0)
    bad = fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6, seed=1), 7.5)
    fifo = results / bad / name
    fifo.unlink()
    os.mkfifo(fifo)
    codes, warnings = [], []
    from normlab.report import build_report
    worker = threading.Thread(target=lambda: codes.append(build_report(results, warn=warnings.append)),
                              daemon=True)
    worker.start()
    worker.join(120)
    if worker.is_alive():  # blocked in open(): release it, then fail
        os.close(os.open(fifo, os.O_RDWR))
        pytest.fail(f"normlab report waited on the FIFO {name}")
    assert codes and any("FIFO" in w for w in warnings), warnings
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left as it was


# -- files get the user's umask -------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_file_normlab_writes_gets_the_umask(cifar_fixture, tmp_path, umask, mode):
    out = tmp_path / "runs"
    old = os.umask(umask)
    try:
        assert main(train_args(cifar_fixture, out)) == 0
        assert main(["report", str(out)]) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {rundir.CONFIG, rundir.METRICS, rundir.STATUS, rundir.CHECKPOINT,
                                       checkpoint.RECORD, "report.md", "results.csv", "curves.csv"}
    assert any(p.suffix == ".png" for p in files)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(mode)}
    dirs = [p for p in out.rglob("*") if p.is_dir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {oct(0o777 & ~umask)}



def test_a_trial_is_ours_while_another_command_fills_in_its_parameters(tmp_path):
    """A journal read while another command suggests a queued trial's parameters (norm first,
    then seed) holds the trial half filled in: still this search's; a trial with another
    norm, a seed the search never uses, or a parameter it never sets is not."""
    pytest.importorskip("optuna")
    from types import SimpleNamespace

    from normlab.search.candidates import parse_candidates
    from normlab.search.plan import make_spec
    from normlab.search.trials import Search
    spec = make_spec(candidates=parse_candidates(None), seeds=2, min_epochs=None, reduction_factor=3,
                     val_split=None, overrides={}, model="resnet8", batch_size=32, data="sample", epochs=2)
    search = object.__new__(Search)
    search.spec = spec
    norm = spec.candidates[0].spec

    def trial(params, seed=2, values=None):
        return SimpleNamespace(system_attrs={"fixed_params": {"norm": norm, "seed": seed}}, params=params,
                               values=values)
    assert all(search._queued(trial(p)) for p in ({}, {"norm": norm}, {"norm": norm, "seed": 2}))
    assert search._queued(trial({"norm": norm, "seed": 2}, values=[31.5]))
    assert not any(search._queued(t) for t in (
        trial({"norm": "gn:3"}), trial({"norm": norm, "seed": 1}), trial({"norm": norm, "lr": 1.0}),
        trial({}, seed=3), trial({}, seed=-1), trial({}, values=["x"])))
