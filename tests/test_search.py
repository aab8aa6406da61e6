"""search-groups: the candidates, bad inputs, the search against the full grid, kill -9 at random
moments, two processes sharing one search."""
import importlib.util
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from normlab import rundir
from normlab.cli import main
from normlab.config import RuntimeOptions
from normlab.data import load_sample
from normlab.train import train
from normlab.models import STAGE_WIDTHS, cifar_resnet
from normlab.norms import norm_layers
from normlab.search.candidates import all_candidates, effective_groups, parse_candidates
from normlab.search.plan import make_spec
from normlab.stats import difference

needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                                  reason="Optuna is not installed (pip install -e '.[test,search]')")


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(list(args)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


# -- the candidates ----------------------------------------------------------------------------
def test_candidates_are_every_distinct_grouping_of_the_real_model():
    candidates = all_candidates()
    groups = [c.groups for c in candidates]
    assert len(set(groups)) == len(groups) == 12
    # every G and K up to 4x the widest stage (clamped above it) gives one of the candidates
    reachable = set()
    for spec in [f"gn:{g}" for g in range(1, 257)] + [f"gn:cpg={k}" for k in range(1, 257)]:
        try:
            reachable.add(effective_groups(spec))
        except Exception:
            continue
    assert reachable == set(groups)
    assert {"ln", "in", "gn:16"} <= {c.spec for c in candidates}
    # the groups are those of the layers the model builds
    for c in candidates:
        built = {(layer["channels"], layer["groups"]) for layer in norm_layers(cifar_resnet(8, c.spec)).values()}
        assert built == set(zip(STAGE_WIDTHS, c.groups)), c.spec


# -- bad input ---------------------------------------------------------------------------------
BAD = [
    (["--candidates", "ln,gn:1"], "needs at least two"),
    (["--candidates", "gn:64,in,gn:cpg=1"], "needs at least two"),
    (["--candidates", "bn,ln"], "'bn' has no groups"),
    (["--candidates", "gn:3,ln"], "divides the 16 channels"),
    (["--val-split", "0"], "held-out validation split"),
    (["--val-split", "4000"], "--val-split 4000 leaves no training images"),
    (["--epochs", "1"], "too small for one rung"),
    (["--epochs", "4", "--min-epochs", "4"], "too small for one rung"),
    (["--min-epochs", "0"], "--min-epochs must be a positive"),
    (["--seeds", "1"], "--seeds must be 2 or more"),
    (["--reduction-factor", "1"], "--reduction-factor must be 2 or more"),
    (["--set", "norm=gn:4"], "use --candidates"),
    (["--set", "lr=3"], "unknown key 'lr'"),
    (["--workers", "0"], "--workers must be a positive"),
    (["--batch-size", "5000"], "lower --batch-size"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, args, message):
    out = tmp_path / "search"
    code, _, stderr = run_cli(capsys, "search-groups", "--quick", "--epochs", "2", *args, "--out", str(out))
    assert code == 2, stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()


def test_dry_run_prints_the_plan_and_its_cost_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "search"
    code, stdout, _ = run_cli(capsys, "search-groups", "--quick", "--dry-run", "--out", str(out))
    assert code == 0 and not out.exists()
    assert "12 candidates" in stdout and "gn:cpg=4(4/8/16)" in stdout
    assert "rungs after epoch 1" in stdout and "full grid of 12 candidates x 3 seeds x 2 epochs = 72 run-epochs" in " ".join(stdout.split())
    assert "seed 0 selects the finalists and the winner" in " ".join(stdout.split())


def test_without_optuna_the_fix_is_named(capsys, tmp_path, monkeypatch, tiny_real):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    out = tmp_path / "search"
    code, _, stderr = run_cli(capsys, *search_args(tiny_real, out))
    assert code == 2 and "pip install 'normlab[search]'" in stderr
    assert not out.exists()


# -- real searches on a tiny set of real images -----------------------------------------------
CANDIDATES = "ln,gn:2,gn:4,gn:16,in,gn:cpg=2"  # gn:cpg=2 is pruned after epoch 1
SEEDS, EPOCHS = 3, 3


@pytest.fixture(scope="module")
def tiny_real(tmp_path_factory):
    """The first 1,000 training and 200 test images of the bundled sample, in CIFAR-10's layout:
    real images (a search on random ones would only compare noise) and fast."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_split, test_split = load_sample()
    for name, split, start, stop in [*((f"data_batch_{i + 1}", train_split, 200 * i, 200 * (i + 1)) for i in range(5)),
                                     ("test_batch", test_split, 0, 200)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": split.images[start:stop].reshape(stop - start, -1).numpy(),
                         b"labels": split.labels[start:stop].tolist()}, f)
    return root


def search_args(data, out, *extra):
    return ["search-groups", "--model", "resnet8", "--data", "cifar10", "--data-dir", str(data),
            "--val-split", "200", "--batch-size", "32", "--epochs", str(EPOCHS), "--min-epochs", "1",
            "--seeds", str(SEEDS), "--candidates", CANDIDATES, "--set", "schedule=cosine",
            "--threads", "1", "--out", str(out), *extra]


def command(data, out, *extra):
    return [sys.executable, "-m", "normlab", *search_args(data, out, "--quiet", *extra)]


@pytest.fixture(scope="module")
def reference(tiny_real, tmp_path_factory):
    """One uninterrupted search, and how long it took."""
    out = tmp_path_factory.mktemp("reference") / "search"
    start = time.monotonic()
    done = subprocess.run(command(tiny_real, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out, time.monotonic() - start


def essentials(out):
    """What must not depend on kills or restarts: the ranking, the winner and its test error."""
    result = json.loads((out / "search.json").read_text())
    return result["ranking"], result["winner"], result["margins"]


def spec_of_the_tests():
    return make_spec(candidates=parse_candidates(CANDIDATES), seeds=SEEDS, min_epochs=1, reduction_factor=3,
                     val_split=200, overrides={"schedule": "cosine"}, model="resnet8", batch_size=32,
                     data="cifar10", epochs=EPOCHS)


@needs_optuna
def test_the_winner_is_the_full_grids_best_or_statistically_tied(reference, tiny_real, tmp_path):
    out, _ = reference
    result = json.loads((out / "search.json").read_text())
    assert result["compute"]["images_trained"] < result["compute"]["full_grid_images"]
    # the full grid: every candidate, every final seed, every epoch (the search's runs are
    # reused: finished ones are skipped, pruned ones resume from their checkpoints)
    grid = tmp_path / "grid"
    shutil.copytree(out / "runs", grid)
    spec = spec_of_the_tests()
    errors = {}
    for c in spec.candidates:
        errors[c.spec] = {}
        for seed in spec.final_seeds():
            cfg = spec.config(c.spec, seed)
            train(cfg, grid / cfg.run_id(), RuntimeOptions(threads=1, data_dir=str(tiny_real), progress=False))
            errors[c.spec][seed] = rundir.read_metrics(grid / cfg.run_id() / rundir.METRICS)[-1]["val_error"]
    best = min(errors, key=lambda norm: sum(errors[norm].values()))
    winner = result["winner"]["norm"]
    # the ranking's numbers are the final seeds' (1..S), never seed 0's, which selected
    mine = next(r for r in result["ranking"] if r["norm"] == winner)["val_errors"]
    assert {int(s): v for s, v in mine.items()} == errors[winner]
    gap = difference(errors[winner], errors[best])
    assert winner == best or gap.low <= 0, (winner, best, errors)
    # the comparison has teeth: in this setting the grid's worst is beyond the best's (Welch) interval
    worst = max(errors, key=lambda norm: sum(errors[norm].values()))
    assert difference(list(errors[worst].values()), list(errors[best].values())).low > 0, errors


@needs_optuna
def test_kill_9_at_random_moments_then_rerun_reaches_the_same_result(reference, tiny_real, tmp_path):
    ref, _ = reference
    out = tmp_path / "search"
    journal = out / "optuna.journal"
    size = lambda: journal.stat().st_size if journal.exists() else 0
    final = (ref / "optuna.journal").stat().st_size
    rng = random.Random(int(os.environ.get("NORMLAB_FAULT_SEED", "0")))
    # three kills at random points of the search's progress (measured by its journal's growth,
    # so that a loaded machine moves the kills with the work), then a run to the end
    for kill in range(4):
        proc = subprocess.Popen(command(tiny_real, out, "--checkpoint-every", "0.005"), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kill < 3:
            target = size() + rng.uniform(0.15, 0.4) * (final - size())
            while proc.poll() is None and size() < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 1.5))  # anywhere: mid-epoch, mid-checkpoint, mid-journal write
            assert proc.poll() is None, "the search finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            continue
        assert proc.wait() == 0, proc.stderr.read().decode()
    assert essentials(out) == essentials(ref)
    # the same trials in the same order, each stopped at the same epoch
    trials = lambda d: [(t.number, t.params, t.state.name, t.last_step) for t in load_study(d).trials]
    assert trials(out) == trials(ref)


class Killed(BaseException):
    """The process dies here: nothing after it runs."""


@needs_optuna
def test_a_kill_between_the_prune_decision_and_its_record_changes_nothing(reference, tiny_real, tmp_path,
                                                                           monkeypatch):
    """Optuna's pruner stores a rung's value before it decides. A search killed after a "prune"
    decision, before the trial is recorded as pruned, asks the pruner again when it resumes; it
    must get the same answer (it used to judge the next rung, and the pruned trial trained on).
    The search is followed up to that trial, which the rest of the search cannot change."""
    import torch

    from normlab.search import trials
    threads = torch.get_num_threads()
    out, opts = tmp_path / "search", RuntimeOptions(threads=1, data_dir=str(tiny_real), progress=False)

    def die(run_dir, epoch):
        raise Killed()
    record = trials.mark_pruned
    monkeypatch.setattr(trials, "mark_pruned", die)
    try:
        with pytest.raises(Killed):
            trials.Search(out, spec_of_the_tests()).work(opts, False, lambda line: None)
        (killed,) = [t for t in load_study(out).trials if t.state.name == "RUNNING"]
        assert "completed_rung_0" in killed.system_attrs  # decided, not recorded
        monkeypatch.setattr(trials, "mark_pruned", record)
        search = trials.Search(out, spec_of_the_tests())  # the next process adopts the trial
        trial, lock = search.claim()
        assert trial.number == killed.number
        search.run_trial(trial, opts, False, lambda line: None)
        lock.release()
    finally:
        torch.set_num_threads(threads)
    trials_of = lambda d: [(t.number, t.params, t.state.name, t.last_step) for t in load_study(d).trials
                           if t.number <= killed.number]
    assert trials_of(out)[-1][2:] == ("PRUNED", 1)
    assert trials_of(out) == trials_of(reference[0])  # as the search never stopped


@needs_optuna
def test_the_search_reads_the_test_set_once_for_the_winner(reference, monkeypatch):
    from normlab.search import results, trials
    from normlab.train import Trainer
    out, _ = reference
    for run in (out / "runs").iterdir():  # no run of the search evaluated the test set
        assert all(math.isnan(r["test_error"]) for r in rundir.read_metrics(run / rundir.METRICS)), run.name
    result = json.loads((out / "search.json").read_text())
    kept = json.loads((out / results.TEST_FILE).read_text())
    assert kept["norm"] == result["winner"]["norm"] and len(kept["test_errors"]) == SEEDS
    assert result["winner"]["test_errors"] == kept["test_errors"]
    # writing the answer again reads nothing more
    monkeypatch.setattr(Trainer, "read_test", lambda self: pytest.fail("the test set was read again"))
    again = results.collect(trials.Search(out, spec_of_the_tests()))
    assert again["winner"]["test_errors"] == kept["test_errors"]


def load_study(out):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    return optuna.load_study(study_name="search-groups",
                             storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))


@needs_optuna
def test_two_commands_share_one_search_and_train_nothing_twice(tiny_real, tmp_path):
    out = tmp_path / "search"
    procs = [subprocess.Popen(command(tiny_real, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for extra in (["--workers", "2"], [])]  # three workers in two commands
    for proc in procs:
        assert proc.wait(timeout=900) == 0, proc.stderr.read().decode()
    records = [json.loads(line) for line in (out / "trials.log").read_text().splitlines()]
    assert len({r["pid"] for r in records}) >= 2  # more than one worked
    trained = [(r["run"], epoch) for r in records for epoch in r["epochs_trained"]]
    assert len(trained) == len(set(trained))  # no epoch of any run trained twice
    study = load_study(out)
    keys = [(t.params["norm"], t.params["seed"]) for t in study.trials]
    assert len(keys) == len(set(keys)) and all(t.state.is_finished() for t in study.trials)
    result = json.loads((out / "search.json").read_text())
    assert result["winner"]["val_error"]["n"] == SEEDS
    # every epoch in the run directories was trained by one of the two
    assert sum(len(rundir.read_metrics(out / "runs" / run / rundir.METRICS)) for run in {r for r, _ in trained}) \
        == len(trained) == result["compute"]["run_epochs"]


@needs_optuna
def test_a_search_directory_with_other_settings_is_refused(capsys, reference, tiny_real):
    out, _ = reference
    before = (out / "optuna.journal").read_bytes()
    code, _, stderr = run_cli(capsys, *search_args(tiny_real, out, "--epochs", "4"))
    assert code == 2 and "holds a search with other settings (base.epochs: 3 -> 4)" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert (out / "optuna.journal").read_bytes() == before
