"""Nothing normlab reads can run code, and every malformed file gets one clear line (exit 2,
nothing damaged), or in `normlab report` one warning and the rest of the report (issue 18).
A planted pickle's execution would create a canary file; its absence is checked."""
import builtins
import csv
import hashlib
import io
import json
import os
import pickle
import re
import stat

import pytest
import torch

from normlab import checkpoint, rundir
from normlab.cli import main
from normlab.config import RunConfig

from bad_inputs import ALIASES, HUGE_GRID
from test_hostile_files import CFG, cli, one_line, train_args
from test_report import fake_run


class Planted:
    """Unpickling this object calls open(canary, 'w'): it creates a file."""

    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (builtins.open, (self.canary, "w"))


# -- code never runs -------------------------------------------------------------------------
def test_a_planted_cifar_batch_never_runs(capsys, cifar_fixture, tmp_path):
    canary = tmp_path / "canary"
    batch = cifar_fixture / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": Planted(canary), b"labels": [0]}, protocol=2))
    code, err = cli(capsys, *train_args(cifar_fixture, tmp_path / "runs"))
    assert code == 2 and "is not a CIFAR batch: it asks to load io.open" in one_line(err)
    assert not canary.exists() and not (tmp_path / "runs").exists()


def test_a_planted_slurm_result_never_runs(tmp_path):
    """SLURM job ids are sequential: a result pickle planted where a task's will be must not be
    read (each task's outcome is a JSON it writes)."""
    submitit = pytest.importorskip("submitit")
    from normlab.backends.slurm import SlurmBackend, Task
    canary, folder = tmp_path / "canary", tmp_path / "results" / ".slurm"
    backend = object.__new__(SlurmBackend)
    backend.folder, backend.following = folder, {"4242_0"}
    job = submitit.SlurmJob(folder=folder / "%j", job_id="4242_0")
    job.paths.result_pickle.parent.mkdir(parents=True)
    with open(job.paths.result_pickle, "wb") as f:
        pickle.dump(("success", Planted(canary)), f)
    run = "resnet8-bn-b32-s0-abcdef"
    task = Task({run: tmp_path / "results" / run}, job)
    assert backend._outcome("4242_0", task, {"4242_0": "RUNNING"}) is None
    assert not canary.exists()
    (folder / "outcomes").mkdir()
    outcome = folder / "outcomes" / "4242_0.json"
    outcome.write_text(json.dumps({"results": {run: {"state": "done"}}}))
    assert backend._outcome("4242_0", task, {"4242_0": "RUNNING"}) == {run: {"state": "done"}}
    for wrong in ({"results": {run: [1]}}, {"results": [1]}, {"results": {"another-run": {"state": "done"}}},
                  {"results": {run: {"state": "planted"}}}, {"results": {run: {"state": "done", "x": [1]}}}):
        outcome.write_text(json.dumps(wrong))
        assert backend._outcome("4242_0", task, {"4242_0": "RUNNING"}) is None, wrong


def test_a_slurm_folder_that_others_could_write_is_refused(tmp_path):
    """The nodes unpickle what submitit keeps in OUT/.slurm: it must be this user's alone."""
    from normlab.backends.slurm import private_folder
    from normlab.errors import NormlabError
    folder = tmp_path / "out" / ".slurm"
    private_folder(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o775)
    with pytest.raises(NormlabError, match="can be written by other users"):
        private_folder(folder)
    folder.rmdir()
    folder.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(NormlabError, match="is not a directory"):
        private_folder(folder)
    if os.getuid() == 0:
        folder.unlink()
        folder.mkdir(mode=0o700)
        os.chown(folder, 65534, 65534)
        with pytest.raises(NormlabError, match="belongs to another user"):
            private_folder(folder)


# -- checkpoints of the wrong structure, with a matching SHA-256 --------------------------------
def plant_state(run, change):
    """Rewrite the run's checkpoint with `change` applied, and record its SHA-256 as normlab would."""
    state = torch.load(run / rundir.CHECKPOINT, weights_only=True)
    change(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (run / rundir.CHECKPOINT).write_bytes(buffer.getvalue())
    (run / checkpoint.RECORD).write_text(f"{hashlib.sha256(buffer.getvalue()).hexdigest()}  {rundir.CHECKPOINT}\n")


CHANGES = {
    "a key missing": lambda s: s.pop("order"),
    "a wrong type": lambda s: s.update(epoch="one"),
    "a wrong shape": lambda s: s["model"].update({"fc.bias": torch.zeros(11)}),
    "an epoch out of range": lambda s: s.update(epoch=-1),
    "a data order out of range": lambda s: s.update(step=1, order=torch.arange(100) + 100),
    "a view expanded to 10^9 elements": lambda s: s.update(step=1, order=torch.zeros(1, dtype=torch.int64).expand(10**9)),
    "a wrong generator state": lambda s: s.update(generator=torch.zeros(7, dtype=torch.uint8)),
    "a wrong optimizer state": lambda s: s["optimizer"]["state"].update({0: {"momentum_buffer": torch.zeros(3)}}),
    "another run's config": lambda s: s["config"].update(seed=5),
}


@pytest.mark.parametrize("what", CHANGES)
def test_a_checkpoint_of_the_wrong_structure_is_one_line(capsys, cifar_fixture, tmp_path, what):
    out = tmp_path / "runs"
    args = train_args(cifar_fixture, out)
    assert main(args) == 0
    run = out / CFG.run_id()
    (run / rundir.STATUS).write_text(json.dumps({"state": "running"}))  # so that it resumes
    plant_state(run, CHANGES[what])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, err = cli(capsys, *args)
    assert code == 2 and "is not a checkpoint of this run" in one_line(err) and "--force" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# -- malformed JSON, numbers, presets, journals, references ------------------------------------
TINY = "base: {model: resnet8, data: cifar10, epochs: 1, batch_size: 20}\nstudies:\n  norms:\n    - {norm: ['gn:4', ln]}\n"


@pytest.mark.parametrize("name,text", [(rundir.STATUS, "[1, 2]"), (rundir.STATUS, '{"state": [1]}'),
                                       (rundir.CONFIG, '"text"'), (rundir.CONFIG, '{"config": [1]}')])
def test_json_of_the_wrong_shape_never_crashes_reproduce(capsys, cifar_fixture, tmp_path, name, text):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY)
    out = tmp_path / "results"
    run = out / CFG.run_id()
    run.mkdir(parents=True)
    (run / name).write_text(text)
    code, err = cli(capsys, "reproduce", "--preset", preset, "--out", out, "--data-dir", cifar_fixture, "--quiet")
    assert "Traceback" not in err
    if name == rundir.STATUS:  # not a status: the run counts as not finished, and is trained
        assert code == 0 and rundir.read_json(run / rundir.STATUS)["state"] == "done"
    else:  # not normlab's config: the run is refused (--force starts it afresh), nothing written
        failed = [line for line in err.splitlines() if f"{CFG.run_id()}: failed:" in line]
        assert code == 1 and len(failed) == 1 and f"{rundir.CONFIG} is not normlab's" in failed[0] and "--force" in err
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK, name] and (run / name).read_text() == text


def test_nan_and_inf_in_metrics_skip_the_run_and_the_report_goes_on(capsys, tmp_path):
    results = tmp_path / "results"
    good = fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6), 7.0)
    for seed, value in ((1, "nan"), (2, "inf"), (3, "-inf")):
        bad = fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6, seed=seed), 7.5)
        text = (results / bad / rundir.METRICS).read_text().splitlines()
        head, row = text[0].split(","), text[2].split(",")
        row[head.index("test_error")] = value
        (results / bad / rundir.METRICS).write_text("\n".join(text[:2] + [",".join(row)] + text[3:]) + "\n")
    code, err = cli(capsys, "report", results)
    assert code == 0 and "Traceback" not in err
    assert err.count("not a percentage") == 3 and len(err.strip().splitlines()) == 3
    assert good in (results / "report.md").read_text() and (results / "results.csv").exists()


@pytest.mark.parametrize("args,expect", [
    (["--seed", "4294967296"], "--seed must be from 0 to 4294967295"),
    (["--seed", "-1"], "--seed must be from 0"),
    (["--model", "resnet6000002"], "deeper than any normlab builds"),
    (["--batch-size", "9" * 40], "beyond any sensible value"),
])
def test_numbers_out_of_range_are_one_line(capsys, tmp_path, args, expect):
    code, err = cli(capsys, "train", "--epochs", "1", "--out", tmp_path / "runs", *args)
    assert code == 2 and expect in one_line(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,args,expect", [
    (ALIASES, [], "aliases (*name) are not supported"),
    (HUGE_GRID, [], "more than the 10,000 runs"),
    ("studies: {s: [{norm: [bn]}]}\n", ["--seeds", "100000000"], "'seeds' must be a positive whole number, at most 1,000"),
    ("base: {epochs: 1" + "0" * 5000 + "}\nstudies: {s: [{norm: [bn]}]}\n", [], "holds a value normlab cannot read"),
    ("base: {seed: 4294967295}\nstudies: {s: [{norm: [bn]}]}\n", ["--seeds", "2"], "--seed must be from 0 to"),
    ("studies: {s: [{norm: [bn], model: resnet6000002}]}\n", [], "deeper than any normlab builds"),
    ("studies: {1: [{norm: [bn]}]}\n", [], "'studies' must map study names"),
    ("[" * 5000 + "]" * 5000 + "\n", [], "nested too deeply"),
])
def test_hostile_presets_are_one_line_before_anything_is_expanded(capsys, tmp_path, text, args, expect):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    code, err = cli(capsys, "reproduce", "--preset", preset, "--out", tmp_path / "results", "--dry-run", *args)
    assert code == 2 and expect in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


@pytest.mark.parametrize("bad", ["{not json\n", '{"op_code": "x"}\n', '[1, 2]\n', '{"op_code": 5, "worker_id": 1}\n'])
def test_a_bad_line_in_the_search_journal_is_one_line(capsys, tmp_path, bad):
    pytest.importorskip("optuna")
    out = tmp_path / "search"
    args = ["search-groups", "--quick", "--out", out, "--workers", "1", "--candidates", "ln,in", "--quiet"]
    from normlab.search.candidates import parse_candidates
    from normlab.search.plan import make_spec
    from normlab.search.trials import JOURNAL, Search
    spec = make_spec(candidates=parse_candidates("ln,in"), seeds=2, min_epochs=None, reduction_factor=3,
                     val_split=None, overrides={"schedule": "cosine"}, model="resnet8", batch_size=32,
                     data="sample", epochs=2)
    Search(out, spec)  # a search that was started
    good = (out / JOURNAL).read_text().splitlines(keepends=True)
    (out / JOURNAL).write_text("".join(good[:1] + [bad] + good[1:]))
    code, err = cli(capsys, *args)
    assert code == 2 and "optuna.journal" in one_line(err) and "move it away" in err


def test_a_references_file_with_a_list_where_text_belongs(capsys, tmp_path):
    results = tmp_path / "results"
    fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6), 7.0)
    refs = tmp_path / "refs.yaml"
    refs.write_text("sources: {s: {name: S, cite: C}}\nsettings:\n  - {source: [s], data: cifar10, devices: 1, "
                    "setup: x, metric: y, approx: false, model: resnet56, errors: [{norm: bn, batch_size: 32, error: 7}]}\n")
    code, err = cli(capsys, "report", results, "--references", refs)
    assert code == 0 and "published numbers left out" in one_line(err) and "unknown source" in err
    assert (results / "report.md").exists()


# -- text from files is escaped where it enters the report ------------------------------------------
def test_text_from_files_cannot_inject_markdown_html_or_formulas(tmp_path):
    results = tmp_path / "results"
    rid = fake_run(results, RunConfig(model="resnet56", norm="bn", batch_size=32, epochs=6), 7.0)
    info = json.loads((results / rid / rundir.CONFIG).read_text())
    info.update(run_id="=HYPERLINK(\"http://x\")|x\n## Owned", device="<img src=x onerror=alert(1)>")
    (results / rid / rundir.CONFIG).write_text(json.dumps(info))
    (results / "study.json").write_text(json.dumps({
        "name": "x\n# Owned heading", "description": "<script>alert(1)</script>\n| a | b |",
        "studies": {"norms": [info["run_id"]], "x\n## Owned study": [info["run_id"]]}}))
    assert main(["report", str(results)]) == 0
    md = (results / "report.md").read_text()
    assert not any(line.startswith(("## Owned", "# Owned", "| a | b |")) for line in md.splitlines())
    assert not re.search(r"(?<!\\)<(script|img)", md)  # escaped: shown as text, never HTML
    runs_table = md[md.index("| run | norm |"):].split("\n\n")[0].splitlines()
    widths = {len(line.replace("\\|", "").split("|")) for line in runs_table}
    assert len(widths) == 1, runs_table  # the injected | did not add a cell
    (row,) = csv.DictReader(io.StringIO((results / "results.csv").read_text()))
    assert row["run_id"].startswith("'=HYPERLINK") and row["device"].startswith("<img")  # text, no formula
