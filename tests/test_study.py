import random

import pytest

from normlab import rundir
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import train
from normlab.errors import NormlabError
from normlab.report import build_report
from normlab.study import expand, parse_overrides, run_study

from conftest import interrupted, stop_after_epoch


def test_quick_preset_expansion():
    study = expand("quick")
    assert {k: len(v) for k, v in study.membership.items()} == {"norms": 12, "batch-size": 12, "groups": 9}
    assert len(study.runs) == 21  # 7 points x 3 seeds: runs shared between studies are trained once
    ids = list(study.runs)
    assert any(i.startswith("resnet8-bn-b2-s0-") for i in ids)
    assert any(i.startswith("resnet8-ln-b32-s0-") for i in ids)  # gn:1 of the groups study is LN
    assert all(c.data == "sample" and c.model == "resnet8" and c.epochs == 4 for c in study.runs.values())
    assert sorted({c.seed for c in study.runs.values()}) == [0, 1, 2]


def test_paper_preset_expansion_and_seeds():
    study = expand("paper", seeds=3)
    per_model_seed = {"norms": 4, "batch-size": 20, "groups": 10}
    assert {k: len(v) for k, v in study.membership.items()} == {k: v * 2 * 3 for k, v in per_model_seed.items()}
    # norms at 32 are in batch-size; gn:1 = ln, gn:16 and cpg=1 = in overlap too
    assert len(study.runs) == (20 + 10 - 3) * 2 * 3
    assert all(c.virtual_gpus == 8 and c.epochs == 100 for c in study.runs.values())
    report_style = expand("paper", overrides={"virtual_gpus": 1}, batch_sizes=[256, 128, 64, 32, 16, 8],
                          only=["batch-size"])
    assert sorted({c.batch_size for c in report_style.runs.values()}) == [8, 16, 32, 64, 128, 256]
    assert all(c.virtual_gpus == 1 for c in report_style.runs.values())


@pytest.mark.parametrize("text,match", [
    ("base: {model: resnet20}\nstudies: {a: [{norm: [bn]}]}\nwokers: 2\n", "unknown key 'wokers'"),
    ("base: {modle: resnet20}\nstudies: {a: [{norm: [bn]}]}\n", "unknown key 'modle'"),
    ("base: {epochs: ten}\nstudies: {a: [{norm: [bn]}]}\n", "'epochs' must be int"),
    ("studies: {a: [{norm: [bn, gn:7]}]}\n", "divides the 16 channels"),
    ("studies: [1, 2]\n", "'studies' must map"),
    ("seeds: 0\nstudies: {a: [{norm: [bn]}]}\n", "'seeds' must be a positive"),
    ("base: [\n", "not valid YAML"),
    ("rules: {when: {model: resnet8}}\nstudies: {a: [{norm: [bn]}]}\n", "'rules' must be a list"),
    ("rules: [{when: {model: resnet8}}]\nstudies: {a: [{norm: [bn]}]}\n", "'rules' must be a list"),
    ("rules: [{when: {modle: resnet8}, set: {epochs: 2}}]\nstudies: {a: [{norm: [bn]}]}\n",
     "'modle', which is not a run setting"),
    ("rules: [{when: {model: resnet20}, set: {warmup_shape: cosine}}]\nstudies: {a: [{norm: [bn]}]}\n",
     "unknown warm-up shape 'cosine'"),
])
def test_bad_preset_files(tmp_path, text, match):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(NormlabError, match=match):
        expand(str(path))


def test_paper_preset_warms_resnet110_up_wherever_it_trains_at_he_et_als_rate():
    """He et al. warm ResNet-110 up at lr / 10 for about an epoch at 0.1 per 128 images; the
    preset's one-device variant trains at 4x that rate per image, its 8-device default at half."""
    def warm(study):
        return {(c.model, c.virtual_gpus, c.warmup_epochs, c.warmup_shape, c.warmup_factor) for c in study.runs.values()}
    assert warm(expand("paper")) == {("resnet56", 8, 0.0, "linear", 0.1), ("resnet110", 8, 0.0, "linear", 0.1)}
    one = expand("paper", overrides={"virtual_gpus": 1})
    assert warm(one) == {("resnet56", 1, 0.0, "linear", 0.1), ("resnet110", 1, 1.0, "constant", 0.1)}
    cfg = next(c for c in one.runs.values() if c.model == "resnet110")
    assert (cfg.lr_at(0.0), cfg.lr_at(0.99), cfg.lr_at(1.0)) == pytest.approx((cfg.lr / 10, cfg.lr / 10, cfg.lr))
    assert cfg.to_dict()["warmup_shape"] == "constant"  # recorded in the config (and so in config.json)
    # --set wins over the rule: none of it applies
    assert warm(expand("paper", overrides={"virtual_gpus": 1, "warmup_epochs": 0})) == \
        {("resnet56", 1, 0.0, "linear", 0.1), ("resnet110", 1, 0.0, "linear", 0.1)}


def test_warmup_in_steps_or_epochs_linear_or_constant():
    he = RunConfig(base_lr=0.1, base_batch=32, warmup_steps=400, warmup_shape="constant")
    assert he.lr_at(399 / 100, 100) == pytest.approx(0.01) and he.lr_at(4.0, 100) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        he.lr_at(1.0)  # steps need the run's steps per epoch
    linear = RunConfig(warmup_epochs=2)
    assert [linear.lr_at(e) for e in (0, 1, 2)] == pytest.approx([0.01, 0.055, 0.1])
    assert RunConfig().run_id() == "resnet20-bn-b32-s0-eab9b7"  # the new fields keep every old run id
    for bad, match in ((dict(warmup_epochs=1, warmup_steps=5), "epochs or in steps, not both"),
                       (dict(warmup_shape="cosine"), "unknown warm-up shape"),
                       (dict(warmup_factor=0.0), "in \\(0, 1\\]"), (dict(warmup_steps=-1), "must not be negative")):
        with pytest.raises(NormlabError, match=match):
            RunConfig(**bad).validate()


def test_unknown_preset_and_overrides():
    with pytest.raises(NormlabError, match="unknown preset 'nope'"):
        expand("nope")
    assert parse_overrides(["epochs=3", "milestones=[1,2]"]) == {"epochs": 3, "milestones": [1, 2]}
    with pytest.raises(NormlabError, match="key=value"):
        parse_overrides(["epochs"])


def tiny_preset(tmp_path, extra=""):
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\nbase: {model: resnet8, data: cifar10, epochs: 2, batch_size: 10}\n"
                    "studies:\n  norms:\n    - {norm: [bn, 'gn:4']}\n" + extra)
    return str(path)


def test_rerun_skips_finished_and_resumes_unfinished(cifar_fixture, tmp_path):
    study = expand(tiny_preset(tmp_path))
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1)
    out = tmp_path / "out"
    first, second = study.runs.items()
    # reference for the second run, never interrupted
    train(second[1], tmp_path / "ref", opts)
    # the first run finishes; the second stops after its first epoch
    train(first[1], out / first[0], opts)
    interrupted(train, second[1], out / second[0], opts, on_epoch=stop_after_epoch(1))
    assert rundir.read_json(out / second[0] / rundir.STATUS)["state"] == "interrupted"
    finished_bytes = (out / first[0] / rundir.METRICS).read_bytes()
    results = run_study(study, out, opts, workers=1)
    assert all(r["state"] == "done" for r in results.values())
    assert (out / first[0] / rundir.METRICS).read_bytes() == finished_bytes  # skipped
    resumed = rundir.read_metrics(out / second[0] / rundir.METRICS)
    reference = rundir.read_metrics(tmp_path / "ref" / rundir.METRICS)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]
    assert strip(resumed) == strip(reference)


def test_study_with_two_workers_and_a_diverged_run(cifar_fixture, tmp_path):
    path = tmp_path / "div.yaml"
    path.write_text("base: {model: resnet8, data: cifar10, epochs: 2, batch_size: 10}\n"
                    "studies:\n  norms:\n    - {norm: ['gn:4'], base_lr: [0.05, 1.0e+6], zero_init_residual: [false]}\n")
    study = expand(str(path))
    out = tmp_path / "out"
    results = run_study(study, out, RuntimeOptions(data_dir=str(cifar_fixture), progress=False), workers=2)
    assert sorted(r["state"] for r in results.values()) == ["diverged", "done"]
    report = build_report(out).read_text()
    assert "diverged" in report


def fake_run(root, cfg: RunConfig, curve, state="done"):
    run = root / cfg.run_id()
    run.mkdir(parents=True)
    rows = [{"epoch": e + 1, "lr": cfg.lr, "train_loss": 1.0, "train_error": err * 0.8, "test_loss": 1.0,
             "test_error": err, "seconds": 10.0, "images_per_s": 100.0} for e, err in enumerate(curve)]
    rundir.write_metrics(run / rundir.METRICS, rows)
    rundir.write_json(run / rundir.CONFIG, {"run_id": cfg.run_id(), "config": cfg.to_dict(),
                                            "batch_semantics": "one device", "device": "cpu",
                                            "data": {"name": "cifar10", "train": 50000, "test": 10000}})
    status = {"state": state, "summary": rundir.summarize(rows)}
    if state == "diverged":
        status["diverged_in_epoch"] = len(curve) + 1
    rundir.write_json(run / rundir.STATUS, status)
    return cfg.run_id()


def test_report_from_synthetic_results(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "results"
    members = {"norms": [], "batch-size": [], "groups": []}
    for model in ("resnet56", "resnet110"):
        for seed in (0, 1):
            for norm in ("bn", "ln", "in", "gn:16"):
                cfg = RunConfig(model=model, norm=norm, batch_size=32, epochs=8, seed=seed)
                members["norms"].append(fake_run(root, cfg, [50 - 4 * e + rng.random() for e in range(8)]))
            for norm in ("bn", "gn:16"):
                for b in (32, 8, 2):
                    cfg = RunConfig(model=model, norm=norm, batch_size=b, epochs=8, seed=seed)
                    if cfg.run_id() not in members["norms"]:
                        state = "diverged" if (norm, b, seed) == ("bn", 2, 1) else "done"
                        curve = [50 - 3 * e + (40 / b if norm == "bn" else 0) for e in range(8 if state == "done" else 3)]
                        fake_run(root, cfg, curve, state)
                    members["batch-size"].append(cfg.run_id())
            for norm in ("gn:1", "gn:4", "gn:16", "gn:cpg=4", "gn:cpg=16"):
                cfg = RunConfig(model=model, norm=norm, batch_size=32, epochs=8, seed=seed)
                if not (root / cfg.run_id()).exists():
                    fake_run(root, cfg, [40 - 2 * e + rng.random() for e in range(8)])
                members["groups"].append(cfg.run_id())
    rundir.write_json(root / "study.json", {"name": "synthetic", "studies": members})
    report = build_report(root).read_text()
    for model in ("resnet56", "resnet110"):
        for figure in (f"norms_{model}_b32.png", f"batch_size_{model}.png", f"batch_curves_{model}.png",
                       f"groups_{model}.png"):
            assert (root / "figures" / "synthetic" / figure).stat().st_size > 10_000
            assert f"figures/synthetic/{figure}" in report
    assert "BN − GN G=16" in report and "lowest test error of G = 1, G = 4, G = 16:" in report
    assert "lowest test error of 4 channels per group, 16 channels per group:" in report
    assert "1 of 2 seeds diverged, counted at 90 % error" in report and "± " in report
    assert "median test error of the final min(5, epochs // 2) epochs (at least 1): the final 4 of 8" in report
    # BN - GN at batch 2: BN is 20 points worse in this made-up data with seed 0, and seed 1
    # diverged: it counts at 90 % (GN 33.5, the median of its final 4 epochs), paired by seed:
    # (20 + 56.5) / 2
    line = next(l for l in report.splitlines() if l.startswith("| BN − GN"))
    assert line.split("|")[-2].strip().startswith("+38.25 [")


def test_report_on_empty_directory(tmp_path):
    with pytest.raises(NormlabError, match="no runs"):
        build_report(tmp_path)
