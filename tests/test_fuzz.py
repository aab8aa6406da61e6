"""Fuzz: many generated hostile run directories, checkpoints, data batches, presets and search
journals, each run through `train`, `reproduce`, `report` or `search-groups` in this process.
Invariants, for every case: no traceback; exit code 0 or 2 (1 for `reproduce`: a refused run
is a failed run; 75 for a search stopped on purpose); exit 2 is one error line (after one
warning per damaged run skipped); no file under
`outside/` (where every planted link points) changed or appeared; the canary that any planted
pickle would create never exists.

NORMLAB_FUZZ_SCALE multiplies the number of cases (1 in CI: 420 cases, about 90 s on 2 cores),
NORMLAB_FUZZ_SEED picks another sequence, NORMLAB_FUZZ_RECORD=FILE appends each target's
counts to FILE as JSON lines (benchmarks/fuzz.md)."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch

from normlab import checkpoint, rundir
from normlab.cli import main
from normlab.config import RunConfig

import fuzz_cases as fc
from conftest import write_cifar_fixture
from test_report import fake_run

SCALE = float(os.environ.get("NORMLAB_FUZZ_SCALE", "1"))
SEED = int(os.environ.get("NORMLAB_FUZZ_SEED", "0"))
CFG = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")


def cases(n: int) -> range:
    return range(max(1, round(n * SCALE)))


class World:
    """A fuzz case's surroundings: `outside/` holds what a planted link points at."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.outside = root / "outside"
        (self.outside / "victim-dir").mkdir(parents=True)
        (self.outside / "victim.txt").write_text("someone's thesis\n")
        (self.outside / "victim-dir" / rundir.METRICS).write_text("epoch,loss\n1,0.5\n")
        (self.outside / "victim-dir" / "norms_resnet56_b32.png").write_bytes(b"\x89PNG figure")
        self.canary = self.outside / "canary"
        self.rng = random.Random(f"{SEED}-{name}")
        self.codes: collections.Counter = collections.Counter()
        self.started = time.monotonic()

    def snapshot(self) -> dict:
        found = {}
        for here, dirs, files in os.walk(self.outside):
            for name in dirs + files:
                path = Path(here) / name
                found[str(path)] = os.readlink(path) if path.is_symlink() else \
                    hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        return found

    def check(self, args: list, allowed: set[int], case: str) -> int:
        """Run one command; assert the invariants."""
        before = self.snapshot()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:
                code = exit_.code
        err = err.getvalue()
        where = f"{self.name} case {case}: normlab {' '.join(map(str, args))}\n{err[-3000:]}"
        assert "Traceback" not in err, where
        assert code in allowed, f"exit {code}; {where}"
        lines = err.strip().splitlines()
        assert all(line.startswith("normlab") for line in lines), where
        if code == 2:  # one error line, after a warning for each damaged run it skipped
            assert lines[-1].startswith("normlab: error: "), where
            assert all(line.startswith("normlab: warning: ") for line in lines[:-1]), where
        assert not self.canary.exists(), f"a planted pickle ran; {where}"
        assert self.snapshot() == before, f"a file outside the results directory changed; {where}"
        self.codes[code] += 1
        return code

    def record(self) -> None:
        summary = {"target": self.name, "cases": sum(self.codes.values()), "exit_codes": dict(self.codes),
                   "seconds": round(time.monotonic() - self.started, 1), "seed": SEED, "scale": SCALE,
                   "invariants_held": True}
        print(json.dumps(summary))
        if os.environ.get("NORMLAB_FUZZ_RECORD"):
            with open(os.environ["NORMLAB_FUZZ_RECORD"], "a") as f:
                f.write(json.dumps(summary) + "\n")


def fresh(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def mutate_file(world: World, path: Path) -> None:
    """One hostile change to the file at path (content by its kind, or a special file)."""
    rng = world.rng
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        return  # already made a link, a FIFO or a directory by an earlier change
    if fc.special(rng, path, world.outside):
        return
    small = path.is_file() and not path.is_symlink() and path.stat().st_size < (1 << 20)
    text = path.read_text(errors="replace") if small else ""
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except ValueError:
            value = {}
        path.write_bytes(fc.mutate_json(rng, value, str(world.canary)))
    elif path.suffix == ".csv":
        path.write_bytes(fc.mutate_csv(rng, text, str(world.canary)))
    else:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real trained run, a small results directory for reports, a data set, a search."""
    root = tmp_path_factory.mktemp("fuzzbase")
    data = write_cifar_fixture(root / "data", n_per_file=4)  # 20 training images: one step of 20
    runs = root / "runs"
    args = ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "20", "--epochs", "1",
            "--data", "cifar10", "--data-dir", str(data), "--out", str(runs), "--quiet"]
    assert main(args) == 0
    results = root / "results"
    for norm, batch, seed in (("bn", 32, 0), ("bn", 32, 1), ("gn:16", 32, 0), ("gn:16", 8, 0)):
        fake_run(results, RunConfig(model="resnet56", norm=norm, batch_size=batch, epochs=6, seed=seed), 7.0 + seed)
    rundir.write_json(results / "study.json", {"name": "fuzz", "studies": {
        "batch-size": sorted(p.name for p in results.iterdir() if p.is_dir())}})
    return {"root": root, "data": data, "runs": runs, "args": args, "results": results}


def test_fuzz_report(base, tmp_path):
    world = World(tmp_path, "report")
    rng = world.rng
    for i in cases(40):
        results = fresh(base["results"], tmp_path / "results")
        runs = sorted(p for p in results.iterdir() if p.is_dir())
        for _ in range(rng.randrange(1, 4)):
            run = rng.choice(runs)
            target = rng.choice([run / rundir.CONFIG, run / rundir.METRICS, run / rundir.STATUS,
                                 results / "study.json", results / "figures", results / "report.md", run])
            if target == run and run.is_symlink():
                continue  # already made a link by an earlier change
            if target == run and rng.random() < 0.5:  # a run directory that is a link
                shutil.rmtree(run)
                run.symlink_to(world.outside / "victim-dir", target_is_directory=True)
            elif target.name in ("figures", "report.md") or target == run:
                fc.special(rng, target, world.outside) if rng.random() < 0.9 else None
            else:
                mutate_file(world, target)
        if rng.random() < 0.2:  # a run directory with a hostile name
            name = rng.choice(["x\ny", "a|b", "<img src=x>", "=1+1", "z" * 200, "-rf", "$x$"])
            shutil.copytree(base["results"] / runs[0].name, results / name)
        world.check(["report", results], {0, 2}, str(i))
    world.record()


def test_fuzz_train_resume(base, tmp_path):
    world = World(tmp_path, "train")
    rng, canary = world.rng, str(world.canary)
    state = torch.load(base["runs"] / CFG.run_id() / rundir.CHECKPOINT, weights_only=True)
    for i in cases(60):
        runs = fresh(base["runs"], tmp_path / "runs")
        run = runs / CFG.run_id()
        target = rng.choice(["checkpoint"] * 5 + [rundir.CONFIG, rundir.STATUS, rundir.METRICS, checkpoint.RECORD,
                                                  rundir.LOCK, "run"])
        if target == "checkpoint":
            data = fc.checkpoint_bytes(rng, state, canary)
            (run / rundir.CHECKPOINT).write_bytes(data)
            if rng.random() < 0.8:  # an attacker can record the SHA-256 too
                (run / checkpoint.RECORD).write_text(f"{hashlib.sha256(data).hexdigest()}  {rundir.CHECKPOINT}\n")
            if rng.random() < 0.5:
                rundir.write_json(run / rundir.STATUS, {"state": "running"})
        elif target == "run":
            shutil.rmtree(run)
            fc.special(rng, run, world.outside) or run.symlink_to(world.outside / "victim-dir")
        else:
            path = run / target
            path.touch() if not path.exists() else None
            mutate_file(world, path)
        epochs = rng.choice(["1", "1", "2"])
        world.check(base["args"][:8] + [epochs] + base["args"][9:-3] + ["--out", runs, "--quiet"], {0, 2}, str(i))
    world.record()


def test_fuzz_data(base, tmp_path):
    world = World(tmp_path, "data")
    rng = world.rng
    for i in cases(60):
        data = fresh(base["data"], tmp_path / "data")
        batch = data / "cifar-10-batches-py" / rng.choice(["data_batch_1", "data_batch_4", "test_batch"])
        if not fc.special(rng, batch, world.outside):
            batch.write_bytes(fc.batch_bytes(rng, str(world.canary)))
        args = ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "4", "--epochs", "1",
                "--data", "cifar10", "--data-dir", data, "--out", tmp_path / f"runs{i}", "--quiet"]
        world.check(args, {0, 2}, str(i))
    world.record()


def test_fuzz_presets(tmp_path):
    world = World(tmp_path, "presets")
    rng = world.rng
    for i in cases(200):
        preset = tmp_path / "p.yaml"
        preset.write_text(fc.preset_text(rng, str(world.canary)))
        extra = []
        if rng.random() < 0.2:
            extra = ["--set", f"{rng.choice(fc.KEYS)}={json.dumps(fc.weird_value(rng, str(world.canary)))[:5000]}"]
        if rng.random() < 0.1:
            extra += ["--seeds", str(rng.choice([1, 3, 10**5, 10**9]))]
        world.check(["reproduce", "--preset", preset, "--out", tmp_path / "results", "--dry-run", *extra], {0, 2}, str(i))
        assert not (tmp_path / "results").exists()
    world.record()


def test_fuzz_search_journal(base, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from normlab.search import trials
    from normlab.search.candidates import parse_candidates
    from normlab.search.plan import make_spec

    world = World(tmp_path, "search-groups")
    rng = world.rng
    spec = make_spec(candidates=parse_candidates("ln,in,gn:4"), seeds=2, min_epochs=None, reduction_factor=3,
                     val_split=None, overrides={"schedule": "cosine"}, model="resnet8", batch_size=32,
                     data="sample", epochs=2)
    made = trials.Search(tmp_path / "base-search", spec)
    for value in (50.0, 60.0):  # a few finished and pruned trials: more kinds of journal lines
        trial = made.study.ask()
        trial.suggest_categorical("norm", [c.spec for c in spec.candidates])
        trial.suggest_int("seed", 0, 1)
        trial.report(value, 1)
        made.study.tell(trial, value)
    lines = (tmp_path / "base-search" / trials.JOURNAL).read_text().splitlines()

    def work_briefly(self, opts, force, say):  # the journal is read and replayed; nothing trains
        self.claim()
        self.trials()
        return "interrupted"
    monkeypatch.setattr(trials.Search, "work", work_briefly)
    args = ["search-groups", "--quick", "--candidates", "ln,in,gn:4", "--workers", "1", "--quiet"]
    for i in cases(40):
        out = fresh(tmp_path / "base-search", tmp_path / "search")
        journal = out / trials.JOURNAL
        if not fc.special(rng, journal, world.outside):
            journal.write_text(fc.journal_lines(rng, lines, str(world.canary)))
        world.check(args + ["--out", out], {2, 75}, str(i))
    world.record()


def test_fuzz_reproduce(base, tmp_path):
    world = World(tmp_path, "reproduce")
    rng = world.rng
    preset = tmp_path / "tiny.yaml"
    preset.write_text("base: {model: resnet8, data: cifar10, epochs: 1, batch_size: 20}\n"
                      "studies:\n  norms:\n    - {norm: ['gn:4']}\n")
    for i in cases(20):
        out = fresh(base["runs"], tmp_path / "results")
        run = out / CFG.run_id()
        for _ in range(rng.randrange(1, 3)):
            mutate_file(world, run / rng.choice([rundir.CONFIG, rundir.STATUS, rundir.METRICS, checkpoint.RECORD]))
        if rng.random() < 0.3:
            mutate_file(world, out / "study.json")
        world.check(["reproduce", "--preset", preset, "--out", out, "--data-dir", base["data"], "--quiet"],
                    {0, 1, 2}, str(i))
    world.record()
