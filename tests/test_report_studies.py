"""Several studies in one results directory, each with its own record and section; reports
written mid-study; the final-epochs rule; the report's text conventions (signs, one-seed notice
once, nothing "best" out of one); search.md's comparison at equal epochs."""
import csv

import pytest

from normlab import records, rundir
from normlab.backends.base import Backend
from normlab.config import RunConfig, RuntimeOptions
from normlab.errors import NormlabError
from normlab.report import build_report
from normlab.report.runs import load_runs
from normlab.search.results import text as search_text
from normlab.stats import difference, summarize
from normlab.study import expand, run_study
from test_figures import two_studies
from test_report import fake_run, study


class NoTraining(Backend):
    """A backend that trains nothing: every run comes back done (the record is what we test)."""

    def train(self, jobs, display=None):
        for array in jobs:  # each job is an array of runs (RunJob, ...)
            for job in array:
                yield job.run_id, {"state": "done"}


def preset(tmp_path, name, studies):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: {{model: resnet8, epochs: 2}}\nstudies:\n{studies}")
    return str(path)


def test_each_study_keeps_its_own_record(tmp_path):
    out, opts = tmp_path / "results", RuntimeOptions(progress=False)
    quick = preset(tmp_path, "quick", "  norms:\n    - {norm: [bn, ln]}\n  groups:\n    - {norm: ['gn:4']}\n")
    zoo = preset(tmp_path, "zoo", "  zoo:\n    - {norm: [frn], batch_size: [8, 2]}\n")
    for name in (quick, zoo):
        run_study(expand(name), out, opts, backend=NoTraining())
    assert sorted(p.name for p in (out / "studies").iterdir()) == ["quick.json", "zoo.json"]
    assert not (out / "study.json").exists()
    got = {r.name: r for r in records.read_records(out)}
    assert set(got["quick"].studies) == {"norms", "groups"} and len(got["quick"].run_ids) == 3
    assert set(got["zoo"].studies) == {"zoo"} and len(got["zoo"].run_ids) == 2
    # a study run again with --only replaces that part of its record and keeps the others
    run_study(expand(quick, only=["groups"], overrides={"epochs": 3}), out, opts, backend=NoTraining())
    again = {r.name: r for r in records.read_records(out)}["quick"]
    assert again.studies["norms"] == got["quick"].studies["norms"]
    assert again.studies["groups"] != got["quick"].studies["groups"] and len(again.run_ids) == 3


def test_a_damaged_record_is_refused_in_one_line(tmp_path):
    root = study(tmp_path / "r", {("norms", "bn", 32): 7.5}, seeds=1)
    (root / "studies").mkdir()
    (root / "studies" / "quick.json").write_text("{ not json")
    with pytest.raises(NormlabError, match=r"studies/quick.json is not valid JSON"):
        build_report(root)
    assert not (root / "report.md").exists()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The report of a directory with two study records, over the stale figures of an earlier
    report (the one-folder layout of earlier versions, and a study no longer there)."""
    root = two_studies(tmp_path_factory.mktemp("two") / "results")
    (root / "figures" / "gone").mkdir(parents=True)
    for stale in ("norms_resnet8_b32.png", "gone/zoo_resnet8.png"):
        (root / "figures" / stale).write_bytes(b"stale")
    return root, build_report(root).read_text()


def test_a_section_and_setup_per_study(two):
    root, text = two
    quick, zoo = text.split("## Study: quick")[1].split("## Study: zoo-quick")
    assert text.index("## Findings") < text.index("## Study: quick") < text.index("## Study: zoo-quick")
    assert "- epochs: 6;" in quick and "- epochs: 3;" in zoo  # never "epochs: 3, 6"
    assert "#### Every normalization (the zoo)" in zoo and "#### Every normalization" not in quick
    assert "| BN is ahead of GN at batch 32 (lower error) |" in text and "| resnet8, 1 device × N, quick |" in text
    assert "This directory holds 2 studies" in text
    figures = sorted(str(p.relative_to(root / "figures")) for p in (root / "figures").rglob("*.png"))
    assert figures == ["quick/batch_curves_resnet8.png", "quick/batch_size_resnet8.png",
                       "quick/groups_resnet8.png", "quick/norms_resnet8_b32.png", "zoo-quick/zoo_resnet8.png"]
    assert all(f"(figures/{f})" in text for f in figures)
    with open(root / "results.csv", newline="") as f:
        studies = {row["studies"] for row in csv.DictReader(f)}
    assert "zoo-quick/zoo" in studies and any("quick/groups" in s for s in studies)


def test_conventions_are_said_once(two):
    _, text = two
    assert text.count("Differences are written A − B") == 1 and "GN − BN" not in text
    assert "BN − GN" in text and "G = 1 − G = 16" in text
    # quick has 2 seeds and zoo-quick one: the cells say which, and the notice says it once
    assert text.count("Points marked (1 seed) have one finished seed") == 1
    assert "(1 seed)" in text.split("## Study: zoo-quick")[1]


def test_the_final_epochs_rule_is_stated_and_used_alike(tmp_path):
    assert [rundir.final_epochs(e) for e in (1, 2, 3, 4, 7, 9, 10, 100)] == [1, 1, 1, 2, 3, 4, 5, 5]
    # 3 epochs: the median of all three would count epoch 1 and name A the lowest; the last
    # epoch, the rule's, names B (as the runs end)
    root, ids = tmp_path / "r", []
    for norm, curve in (("gn:16", [50.0, 52.0, 58.0]), ("bn", [60.0, 55.0, 55.0])):
        cfg = RunConfig(model="resnet8", norm=norm, batch_size=2, epochs=3, data="sample", virtual_gpus=8)
        ids.append(fake_run(root, cfg, 0.0, epochs=3))
        rows = [{"epoch": e + 1, "train_error": err, "test_error": err} for e, err in enumerate(curve)]
        rundir.write_metrics(root / ids[-1] / rundir.METRICS, rows)
    records.write_record(root, "zoo-quick", "", {"zoo": ids}, {i: {} for i in ids})
    finals = {r.cfg.norm: r.final for r in load_runs(root)}
    assert finals == {"gn:16": 58.0, "bn": 55.0}
    text = build_report(root).read_text()
    assert "batch 2: lowest test error of the 2 norms: BN (55.00 %; chosen on the test set" in text
    assert "the final 1 of 3. **Runs of 3 epochs are too short for the GN paper's rule**" in text
    assert "| norm | 2 |" in text and "test error (%), final epoch" in text
    with open(root / "results.csv", newline="") as f:
        assert {r["norm"]: float(r["final_test_error"]) for r in csv.DictReader(f)} == finals


def test_a_report_written_mid_study_says_how_far_it_is(tmp_path):
    root = tmp_path / "r"
    done = fake_run(root, RunConfig(model="resnet8", norm="bn", batch_size=32, epochs=6, data="sample"), 40.0)
    running = fake_run(root, RunConfig(model="resnet8", norm="gn:16", batch_size=32, epochs=6, data="sample"),
                       45.0, epochs=2, state="running")
    later = [RunConfig(model="resnet8", norm=n, batch_size=2, epochs=6, data="sample").run_id() for n in ("bn", "gn:16")]
    records.write_record(root, "quick", "", {"batch-size": [done, running, *later]},
                         {i: {} for i in (done, running, *later)})
    records.write_record(root, "later", "", {"norms": later}, {i: {} for i in later})
    text = build_report(root).read_text()
    assert "## Study: later\n\n**Under way: 0 of 2 runs finished (2 not started)**" in text
    assert "No run of this study has started yet." in text
    assert "**Under way: 1 of 4 runs finished (1 running, 2 not started)**" in text
    untested = text.split("Not tested by these runs:")[1].split("##")[0]
    assert "BN degrades" in untested and untested.count("under way") == 1
    assert "resnet8, 1 device × N, quick: the study is under way: 1 of 4 runs finished (1 running, 2 not started); more" in untested
    assert "| GN G=16 | 1 of 1 running (left out) |" in text


def test_nothing_is_called_best_out_of_one(tmp_path):
    root = study(tmp_path / "r", {("groups", "gn:16", 32): 9.5, ("zoo", "bn", 8): 20.0}, seeds=2)
    text = build_report(root).read_text()
    section = text.split("## Study")[1]
    assert "lowest" not in section and "best" not in section


def search_result(finalists: int) -> dict:
    """A search's result: gn:4 and ln finalists, gn:2 pruned after epoch 1 with a lower epoch-1
    error than the winner's epoch-2 one (as early errors can be)."""
    def finalist(norm, values, rung, selection):
        return {"norm": norm, "groups": [4, 4, 4], "state": "finalist", "val_errors": values,
                "val_error": summarize(values), "at_rungs": {1: rung}, "selection_val_error": selection,
                "diverged_seeds": 0}
    winner = finalist("gn:4", {1: 70.0, 2: 71.0}, 78.0, 69.9)
    ranking = [winner, finalist("ln", {1: 72.0, 2: 74.0}, 79.0, 71.0)][:finalists] + [
        {"norm": "gn:2", "groups": [2, 2, 2], "state": "pruned", "epochs": 1, "at_rungs": {1: 80.0},
         "detail": "pruned after epoch 1"}]
    for e in ranking[1:finalists]:
        e.update(minus_winner=difference(e["val_errors"], winner["val_errors"]), holm_p=0.2, verdict="tied")
    settings = {"base": {"model": "resnet8", "batch_size": 32, "data": "sample", "val_split": 1000, "epochs": 2},
                "reduction_factor": 3, "seeds": 2, "final_seeds": [1, 2], "candidates": ["gn:4", "ln", "gn:2"]}
    return {"settings": settings, "rungs": [1], "ranking": ranking,
            "winner": {"norm": "gn:4", "groups": [4, 4, 4], "val_error": winner["val_error"],
                       "selection_val_error": 69.9, "better_than_winner": [],
                       "tied_with": [e["norm"] for e in ranking[1:finalists]],
                       "test_error": summarize([71.0, 72.0])},
            "margins": {e["norm"]: {k: e[k] for k in ("minus_winner", "holm_p", "verdict")}
                        for e in ranking[1:finalists]},
            "compute": {"images_trained": 10, "run_epochs": 5, "fraction_of_full_grid": 0.5, "full_grid_images": 20}}


def test_search_md_compares_candidates_at_the_same_epoch():
    md = search_text(search_result(2))
    header = next(line for line in md.splitlines() if line.startswith("| rank |"))
    assert header.split(" | ")[3:7] == ["epoch 1, seed 0", "epoch 2, seed 0 (selection)", "epoch 2, seeds 1, 2",
                                        "minus the winner"]
    pruned = next(line for line in md.splitlines() if "| gn:2 |" in line)
    cells = [c.strip() for c in pruned.split("|")[1:-1]]
    assert cells[3:] == ["80.00", "-", "-", "", "", "pruned after epoch 1"]  # its epoch-1 error, under epoch 1
    winner = next(line for line in md.splitlines() if "| gn:4 |" in line)
    assert "| 78.00 | 69.90 | 70.50 ± 0.71 [" in winner
    only = search_text(search_result(1))
    assert "the only finalist" in only and "every other finalist" not in only
