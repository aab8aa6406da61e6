import csv
import json
import math
import random
import re
import sys

import pytest

import normlab
from normlab import references, rundir
from normlab.cli import main
from normlab.config import RunConfig
from normlab.errors import NormlabError
from normlab.report import build_report, load_results
from normlab.report.findings import AGREES, DISAGREES, INCONCLUSIVE, findings, flat_verdict, sign_verdict
from normlab.report.runs import group_points, load_runs
from normlab.stats import Summary


def fake_run(root, cfg: RunConfig, final: float, epochs: int = 6, state: str = "done"):
    """A run directory whose median test error of the final 5 epochs is `final`."""
    run = root / cfg.run_id()
    run.mkdir(parents=True)
    curve = [final + 2.0 * (epochs - 1 - e) if e < epochs - 5 else final for e in range(epochs)]
    rows = [{"epoch": e + 1, "lr": cfg.lr, "train_loss": 1.0, "train_error": err * 0.8, "test_loss": 1.0,
             "test_error": err, "seconds": 2.0, "images_per_s": 100.0} for e, err in enumerate(curve)]
    rundir.write_metrics(run / rundir.METRICS, rows)
    rundir.write_json(run / rundir.CONFIG, {"run_id": cfg.run_id(), "config": cfg.to_dict(), "device": "cpu",
                                            "batch_semantics": "one device", "data": {"name": cfg.data}})
    rundir.write_json(run / rundir.STATUS, {"state": state, "summary": rundir.summarize(rows)})
    return cfg.run_id()


def study(root, errors, seeds=3, noise=0.1, model="resnet56", data="cifar10", virtual_gpus=1, seed=0, epochs=6,
          **fields):
    """A results directory: errors maps (study, norm, batch) -> mean error; seeds scatter by noise."""
    rng = random.Random(seed)
    members = {}
    for (name, norm, batch), error in errors.items():
        for s in range(seeds):
            cfg = RunConfig(model=model, norm=norm, batch_size=batch, epochs=epochs, seed=s, data=data,
                            virtual_gpus=virtual_gpus, **fields).normalized()
            if not (root / cfg.run_id()).exists():
                fake_run(root, cfg, error + rng.uniform(-noise, noise))
            members.setdefault(name, []).append(cfg.run_id())
    rundir.write_json(root / "study.json", {"name": "synthetic", "studies": members})
    return root


def paper_like(bn32=7.5, gn32=9.5, bn2=20.0, gn2=9.6, g1=12.0, g4=10.5, g16=9.5):
    errors = {("batch-size", "bn", 32): bn32, ("batch-size", "bn", 8): (bn32 + bn2) / 2, ("batch-size", "bn", 2): bn2,
              ("batch-size", "gn:16", 32): gn32, ("batch-size", "gn:16", 8): gn32, ("batch-size", "gn:16", 2): gn2}
    errors.update({("groups", "gn:1", 32): g1, ("groups", "gn:4", 32): g4, ("groups", "gn:16", 32): g16,
                   ("groups", "gn:cpg=4", 32): 10.5, ("groups", "gn:cpg=16", 32): 9.8})
    return errors


def verdicts(root, model="resnet56"):
    points = list(group_points(load_runs(root)).values())
    batch = [p for p in points if p.cfg.batch_size != 32 or p.norm in ("bn", "gn:16")]
    found, untested = findings(model, points[0].cfg, batch, [p for p in points if p.norm != "bn"],
                               references.load())
    return {f.claim.split(" (")[0]: f.verdict for f in found}, found, untested


def test_verdict_rules():
    assert sign_verdict(Summary(3, 2.0, 0.5, 1.0, 3.0), +1)[0] == AGREES
    assert sign_verdict(Summary(3, 2.0, 0.5, 1.0, 3.0), -1)[0] == DISAGREES
    assert sign_verdict(Summary(3, 1.0, 0.5, 0.0, 2.0), +1)[0] == INCONCLUSIVE  # could be zero
    assert sign_verdict(Summary(3, 1.0, 0.5, -0.1, 2.0), +1)[0] == INCONCLUSIVE
    assert sign_verdict(Summary(1, 5.0, math.nan), +1) == (INCONCLUSIVE, "fewer than 2 seeds that count on a side: no interval")
    assert flat_verdict([Summary(3, 0.1, 0.1, -0.5, 0.7, dof=2)])[0] == AGREES
    assert flat_verdict([Summary(3, 3.0, 0.1, 2.0, 4.0, dof=2)])[0] == DISAGREES
    assert flat_verdict([Summary(3, 0.5, 0.5, -0.2, 1.5, dof=2)])[0] == INCONCLUSIVE


def test_findings_agree_when_the_data_show_the_published_effects(tmp_path):
    root = study(tmp_path, paper_like())
    v, found, untested = verdicts(root)
    assert v == {"BN is ahead of GN at batch 32": AGREES, "BN's error rises as the batch shrinks": AGREES,
                 "GN's error stays flat as the batch shrinks": AGREES,
                 "The gap BN − GN grows as the batch shrinks": AGREES, "G = 16 is the best group count": AGREES,
                 "Fewer groups do worse": AGREES, "16 channels per group is the best channels per group": AGREES}
    first = found[0]
    assert "GN paper, ImageNet ResNet-50: BN 23.6, GN G=32 24.1" in first.published
    assert "impl. report, CIFAR-10 ResNet-56: BN ≈ 7.45, GN G=16 ≈ 9.5" in first.published
    assert "BN − GN G=16 -2.0" in first.numbers and "[" in first.numbers
    assert any("G = 32 is the best group count" in u for u in untested)  # the GN paper's best G


def test_findings_disagree_or_stay_inconclusive_as_the_intervals_say(tmp_path):
    # GN ahead of BN at 32 by 1 point (clear with noise 0.1); BN flat; G = 4 best
    v, found, _ = verdicts(study(tmp_path / "a", paper_like(bn32=9.5, gn32=8.5, bn2=9.5, gn2=8.5, g4=8.0, g16=8.5)))
    assert v["BN is ahead of GN at batch 32"] == DISAGREES
    assert v["BN's error rises as the batch shrinks"] == INCONCLUSIVE
    assert v["G = 16 is the best group count"] == DISAGREES
    # the same effects buried in noise: nothing can be claimed either way
    v, found, _ = verdicts(study(tmp_path / "b", paper_like(gn32=7.8, g1=9.8, g4=9.6), noise=2.0))
    assert v["BN is ahead of GN at batch 32"] == INCONCLUSIVE
    assert v["Fewer groups do worse"] == INCONCLUSIVE
    assert next(f for f in found if f.claim.startswith("BN is ahead")).why == "the interval contains 0"
    # one seed: every verdict is inconclusive, and says why
    v, found, _ = verdicts(study(tmp_path / "c", paper_like(), seeds=1))
    assert set(v.values()) == {INCONCLUSIVE}
    assert all("fewer than 2 seeds that count" in f.why for f in found)


def test_report_gives_intervals_findings_and_published_numbers(tmp_path):
    root = study(tmp_path / "r", {**paper_like(), ("norms", "bn", 32): 7.5, ("norms", "ln", 32): 11.0,
                                  ("norms", "in", 32): 11.5, ("norms", "gn:16", 32): 9.5,
                                  ("batch-size", "bn", 64): 7.0}, epochs=100)  # the impl. report's recipe
    text = build_report(root).read_text()
    assert text.index("## Findings") < text.index("## Study: synthetic") < text.index("Setup:") < text.index("### resnet56")
    assert "| BN is ahead of GN at batch 32 (lower error) |" in text and "**agrees**" in text
    assert "How a verdict is reached" in text and "wholly on the predicted side of 0" in text
    # mean ± std [95 % interval] in every cell of this study; Welch's interval for BN − GN
    assert re.search(r"\| BN \| 7\.\d\d ± 0\.\d\d \[7\.\d\d, 7\.\d\d\] \|", text)
    gap = next(line for line in text.splitlines() if line.startswith("| BN − GN G=16 |"))
    assert gap.count("[") == 3 and gap.split("|")[2].strip() == "-"  # no GN at batch 64
    # published columns: every header names its data set and model; footnotes say whose setting
    headers = [c.strip() for line in text.splitlines() if line.startswith("| norm |") or line.startswith("| setting |")
               for c in line.split("|") if c.strip().startswith("published:")]
    assert headers and all(re.search(r"(ImageNet|CIFAR-10) ResNet-\d+ \[\d\]", h) for h in headers)
    assert "published: impl. report, CIFAR-10 ResNet-56" in text and "published: GN paper, ImageNet ResNet-50" in text
    assert re.search(r"\[\d\] impl\. report: CIFAR-10, ResNet-56.*The same setting as this study's", text)
    assert re.search(r"\[\d\] GN paper: ImageNet, ResNet-50.*Another setting than this study's", text)
    # He et al.'s ResNet-56 number is BN at 64 images per device (2 GPUs): in that column only,
    # another setting (2 devices, 164 epochs)
    assert re.search(r"\| He et al\., CIFAR-10 ResNet-56 \[\d\]: BN \| 6\.97 \| - \| - \| - \|", text)
    assert text.count("| 6.97 |") == 1
    assert re.search(r"\[\d\] He et al\.: CIFAR-10, 2 GPUs × 64 images.*Another setting than this study's", text)
    assert re.search(r"\| GN paper, ImageNet ResNet-50 \[\d\]: BN − GN G=32 \| - \| -0\.5 \| \+0\.8 \| \+10\.6 \|", text)
    assert "seeds: 0, 1, 2 (12 points with 3 finished seeds)" in text


def test_other_models_see_published_numbers_labelled_as_another_setting(tmp_path):
    root = study(tmp_path / "r", {("norms", "bn", 32): 30.0, ("norms", "gn:16", 32): 31.0},
                 model="resnet8", data="sample")
    text = build_report(root).read_text()
    assert "published: impl. report, CIFAR-10 ResNet-56" in text  # its only model, labelled
    assert "He et al., " not in text and "He et al.:" not in text  # several depths, none of them resnet8
    assert "The same setting" not in text


def test_one_seed_is_said_plainly(tmp_path):
    root = study(tmp_path / "r", paper_like(), seeds=1)
    text = build_report(root).read_text()
    # said once, at the top: not in the setup, the verdicts, the tables or the cells
    assert text.count("**One seed per point**") == 1 and text.index("**One seed per point**") < text.index("## Findings")
    assert text.lower().count("one seed") == 1 and "fewer than 2 finished seeds on a side" not in text
    section = text.split("### resnet56")[1]
    assert "±" not in section and "(1 seed)" not in text
    assert re.search(r"\| BN \| 7\.\d\d \| 13\.\d\d \| (19|20)\.\d\d \|", section)


def test_tidy_files_and_load_results_without_pandas(tmp_path, monkeypatch):
    root = study(tmp_path / "r", {("norms", "bn", 32): 7.5, ("norms", "gn:16", 32): 9.5}, seeds=2)
    build_report(root)
    with open(root / "results.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    with open(root / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len(runs) == 4 and len(curves) == 4 * 6
    assert {"run_id", "model", "norm", "batch_size", "virtual_gpus", "seed", "lr", "state", "studies",
            "final_test_error", "norm_label", "groups"} <= set(runs[0])
    assert {"run_id", "epoch", "train_error", "test_error", "lr"} <= set(curves[0])
    for row in runs:  # the summary is the run's own
        status = rundir.read_json(root / row["path"] / rundir.STATUS)
        assert float(row["final_test_error"]) == pytest.approx(status["summary"]["median_final5_test_error"])
        assert row["studies"] == "synthetic/norms" and row["state"] == "done"
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    plain = normlab.load_results(root)
    assert isinstance(plain.runs, list) and len(plain.runs) == 4 and len(plain.curves) == 24
    row = plain.runs[0]
    assert isinstance(row["batch_size"], int) and isinstance(row["final_test_error"], float)
    assert row["zero_init_residual"] is True and row["groups"] in (None, 16)
    # the csv files alone (copied away from the run directories) load the same
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.csv", "curves.csv"):
        (copy / name).write_bytes((root / name).read_bytes())
    assert load_results(copy) == plain
    (tmp_path / "empty").mkdir()
    with pytest.raises(NormlabError, match="no runs"):
        load_results(tmp_path / "empty")
    with pytest.raises(NormlabError, match="not a directory"):
        load_results(tmp_path / "nowhere")


def test_pandas_reads_the_tidy_files_as_they_are(tmp_path):
    pandas = pytest.importorskip("pandas")
    root = study(tmp_path / "r", {("norms", "bn", 32): 7.5, ("norms", "gn:16", 32): 9.5}, seeds=2)
    build_report(root)
    runs, curves = pandas.read_csv(root / "results.csv"), pandas.read_csv(root / "curves.csv")
    assert runs["final_test_error"].dtype.kind == "f" and runs["batch_size"].dtype.kind == "i"
    assert runs["zero_init_residual"].dtype.kind == "b" and curves["epoch"].dtype.kind == "i"
    by_norm = runs.groupby("norm")["final_test_error"].mean()
    assert abs(by_norm["bn"] - 7.5) < 0.11 and abs(by_norm["gn:16"] - 9.5) < 0.11
    loaded = normlab.load_results(root)
    pandas.testing.assert_frame_equal(loaded.runs, runs)
    pandas.testing.assert_frame_equal(loaded.curves, curves)


def test_damaged_run_directories_are_skipped_with_one_warning_each(tmp_path, capsys):
    root = study(tmp_path / "r", {("norms", "bn", 32): 7.5, ("norms", "gn:16", 32): 9.5}, seeds=4)
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    damage = {
        dirs[0]: ("config.json", b'{"run_id": "x", "config": {"model": '),                 # cut short
        dirs[1]: ("config.json", json.dumps({"config": {"modle": "resnet56"}}).encode()),  # unknown key
        dirs[2]: ("metrics.csv", b"epoch,train_error,test_error\n1,50.0,oops\n"),           # not a number
        dirs[3]: ("metrics.csv", b"epoch,train_error\n1,50.0\n"),                          # no test_error
        dirs[4]: ("metrics.csv", b"epoch,train_error,test_error\n1,50.0\n"),               # short line
        dirs[5]: ("config.json", b"\xff\xfe\x00garbage"),                                  # not text
    }
    for path, (name, data) in damage.items():
        (path / name).write_bytes(data)
    code = main(["report", str(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert len(err) == len(damage)
    for path in damage:
        assert sum(str(path) in line for line in err) == 1
    assert all(line.startswith("normlab: warning: skipping ") for line in err)
    assert "has no 'test_error' column" in "\n".join(err) and "unknown key 'modle'" in "\n".join(err)
    text = (root / "report.md").read_text()
    assert all(p.name not in text for p in damage)
    with open(root / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2  # the two intact runs


def test_a_report_of_damaged_runs_only_fails_with_one_line(tmp_path, capsys):
    run = tmp_path / "r" / "resnet8-bn-b32-s0-abc"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{not json")
    assert main(["report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("normlab: error: no readable runs in") and len(err) == 2
    assert not (tmp_path / "r" / "report.md").exists()


def test_shipped_references_hold_the_anchors_numbers():
    published = references.load()
    by = {(p.source, p.model, p.norm, p.batch_size): p for p in published}
    assert by[("gn-paper", "resnet50", "bn", 2)].error == 34.7
    assert by[("gn-paper", "resnet50", "gn:32", 2)].error == 24.1
    assert by[("gn-paper", "resnet50", "gn:cpg=16", 32)].error == 24.2
    assert by[("gn-paper", "resnet50", "in", 32)].error == 28.4
    assert by[("impl-report", "resnet56", "bn", 32)].text() == "≈ 7.45"
    assert by[("he2016", "resnet56", "bn", 64)].error == 6.97  # 2 GPUs x 64 images
    assert by[("he2016", "resnet110", "bn", 64)].note.startswith("best of 5")
    assert {p.devices for p in published if p.source == "he2016"} == {2}
    counts = {s: sum(p.source == s for p in published) for s in ("gn-paper", "impl-report", "he2016")}
    assert counts == {"gn-paper": 24, "impl-report": 3, "he2016": 5}
    assert by[("gn-paper", "resnet50", "brn", 4)].error == 26.3  # Batch Renorm, Sec. 4.1
    assert all(p.data == "imagenet" and p.devices == 8 for p in published if p.source == "gn-paper")
    assert [p.model for p in references.for_model(published, "resnet110") if p.source == "he2016"] == ["resnet110"]
    assert not [p for p in references.for_model(published, "resnet8") if p.source == "he2016"]


@pytest.mark.parametrize("text,match", [
    ("sources: [\n", "not valid YAML"),
    ("- 1\n", "expected a mapping with 'sources'"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: b, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, errors: [{norm: bn, batch_size: 32, error: 1}]}]\n", "unknown source 'b'"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, errors: [{norm: bn, batch_size: 32, error: 120}]}]\n", "between 0 and 100"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, errors: [{norm: gnx, batch_size: 32, error: 1}]}]\n", "unknown norm"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, errors: [{norm: bn, batch_size: 32, error: 1}]}]\n", "no 'model'"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, errors: [{norm: bn, batch_size: 32, error: 1}, {norm: bn, batch_size: 32, "
     "error: 2}]}]\n", "a second number"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, errors: [{norm: bn, batch: 32, error: 1}]}]\n", "unknown key 'batch'"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, recipe: {lr: 0.1}, errors: [{norm: bn, batch_size: 32, error: 1}]}]\n",
     "unknown recipe key 'lr'"),
    ("sources: {a: {name: A, cite: C}}\nsettings: [{source: a, model: m, data: d, devices: 1, setup: s, "
     "metric: e, approx: false, recipe: {epochs: ten}, errors: [{norm: bn, batch_size: 32, error: 1}]}]\n",
     "'epochs' must be int"),
])
def test_bad_reference_tables(tmp_path, text, match):
    path = tmp_path / "refs.yaml"
    path.write_text(text)
    with pytest.raises(NormlabError, match=match):
        references.load(path)


def test_damaged_reference_table_leaves_the_published_numbers_out(tmp_path, capsys):
    root = study(tmp_path / "r", {("norms", "bn", 32): 7.5, ("norms", "gn:16", 32): 9.5}, seeds=2)
    bad = tmp_path / "refs.yaml"
    bad.write_text("sources: {a: {name: A}}\nsettings: []\n")
    assert main(["report", str(root), "--references", str(bad)]) == 0
    out = capsys.readouterr()
    assert out.err.strip().splitlines() == [
        f"normlab: warning: published numbers left out of the report: {bad}: source 'a': missing 'cite'; "
        f"reinstall normlab or fix that file"]
    text = (root / "report.md").read_text()
    assert "published:" not in text and "## Findings" in text
    assert main(["report", str(root), "--references", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_real_study_reports_with_intervals(tmp_path, cifar_fixture, capsys):
    preset = tmp_path / "tiny.yaml"
    preset.write_text("name: tiny\nbase: {model: resnet8, data: cifar10, epochs: 1}\nstudies:\n"
                      "  batch-size:\n    - {norm: [bn, 'gn:4'], batch_size: [20, 4]}\n")
    out = tmp_path / "out"
    code = main(["reproduce", "--preset", str(preset), "--out", str(out), "--seeds", "2", "--workers", "1",
                 "--data-dir", str(cifar_fixture), "--quiet", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    text = (out / "report.md").read_text()
    assert "## Findings" in text and "BN's error rises as the batch shrinks (20 → 4)" in text
    assert re.search(r"\| BN \| \d+\.\d\d ± \d+\.\d\d \[", text)
    with open(out / "results.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8 and {r["state"] for r in runs} == {"done"} and {r["seed"] for r in runs} == {"0", "1"}
    for r in runs:  # the csv's summary is the run's own
        status = rundir.read_json(out / r["path"] / rundir.STATUS)
        assert float(r["final_test_error"]) == pytest.approx(status["summary"]["median_final5_test_error"])
