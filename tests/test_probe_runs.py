"""Probes in training: they change nothing, they resume exactly after kill -9, and every run
of an array is probed on its own lone model."""
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normlab import checkpoint, rundir
from normlab.config import RunConfig, RuntimeOptions
from normlab.probes import PROBES
from normlab.report.probe_data import read_rows
from normlab.train import train, train_array

from conftest import strip, write_cifar_fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from soak import kill_then_finish  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar_fixture(tmp_path_factory.mktemp("probe-runs") / "data", n_per_file=40)


def options(data, probes: bool) -> RuntimeOptions:
    return RuntimeOptions(data_dir=str(data), progress=False, threads=1, probes=probes)


def test_a_run_with_probes_trains_exactly_as_one_without(data, tmp_path):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=5, virtual_gpus=2, epochs=2, data="cifar10")
    train(cfg, tmp_path / "without", options(data, False))
    train(cfg, tmp_path / "with", options(data, True))
    without, probed = tmp_path / "without", tmp_path / "with"
    assert strip(rundir.read_metrics(probed / rundir.METRICS)) == strip(rundir.read_metrics(without / rundir.METRICS))
    a, b = checkpoint.load(without / rundir.CHECKPOINT), checkpoint.load(probed / rundir.CHECKPOINT)
    for key in ("model", "optimizer"):
        assert str(a[key]) == str(b[key])  # every tensor printed in full: equal to the last digit
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and torch.equal(a["generator"], b["generator"])
    assert not (without / PROBES).exists()
    rows = read_rows(probed / PROBES)
    assert sorted({r["epoch"] for r in rows}) == [0, 1, 2]                  # initialization, then each epoch
    assert {r["probe"] for r in rows if r["epoch"] == 2} >= {"batch_mean_shift", "grad_norm", "test_error_batch_stats",
                                                             "feature_effective_rank", "branch_skip_ratio"}
    assert not any(r["probe"].startswith("test_error") for r in rows if r["epoch"] < 2)  # the final epoch only


def command(data, out, *extra):
    return [sys.executable, "-m", "normlab", "train", "--model", "resnet8", "--norm", "bn", "--batch-size", "10",
            "--epochs", "3", "--data", "cifar10", "--data-dir", str(data), "--out", str(out), "--quiet",
            "--threads", "1", "--probes", *extra]


def test_kill_9_then_resume_rewrites_probes_exactly(data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(command(data, ref), check=True, capture_output=True)
    rng = random.Random(0)
    kills = kill_then_finish(command(data, out, "--checkpoint-every", "0.005"), out, kills=3, max_delay=0.4,
                             rng=rng, attempts=20)
    assert kills >= 2, f"only {kills} kills landed"
    (run,) = [p.name for p in ref.iterdir()]
    assert strip(rundir.read_metrics(out / run / rundir.METRICS)) == strip(rundir.read_metrics(ref / run / rundir.METRICS))
    assert (out / run / PROBES).read_bytes() == (ref / run / PROBES).read_bytes()


def test_every_run_of_an_array_is_probed_on_its_lone_model(data, tmp_path):
    cfgs = [RunConfig(model="resnet8", norm="gn:4", batch_size=10, epochs=1, data="cifar10", seed=s) for s in (0, 1)]
    train_array(cfgs, [tmp_path / "array" / c.run_id() for c in cfgs], options(data, True))
    for cfg in cfgs:
        train(cfg, tmp_path / "alone" / cfg.run_id(), options(data, True))
        fused, alone = (read_rows(tmp_path / where / cfg.run_id() / PROBES) for where in ("array", "alone"))
        assert [(r["epoch"], r["layer"], r["probe"]) for r in fused] == [(r["epoch"], r["layer"], r["probe"]) for r in alone]
        for a, b in zip(fused, alone):  # a fused network sums in another order: equal to float rounding
            assert a["value"] == pytest.approx(b["value"], rel=1e-3, abs=1e-5), (a, b)
    seeds = [read_rows(tmp_path / "array" / c.run_id() / PROBES) for c in cfgs]
    assert [r["value"] for r in seeds[0]] != [r["value"] for r in seeds[1]]   # each its own run


def test_studies_probe_by_default_where_it_costs_at_most_5_percent(data):
    from normlab.probes import by_default, cost_share
    from normlab.study import expand
    from normlab.train import Trainer

    assert by_default(100, 50_000, 10_000) and cost_share(100, 50_000, 10_000) < 0.01   # CIFAR-10, 100 epochs
    assert not by_default(4, 4_000, 1_000)                                              # the sample, 4 epochs
    assert expand("why-quick").probes is True and expand("quick").probes is None
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=10, epochs=2, data="cifar10")
    assert not Trainer([cfg], ["unused"], RuntimeOptions(data_dir=str(data), probes=None)).probes  # 200 images


def test_bench_times_the_probes_against_training(tmp_path, capsys):
    import json

    from normlab.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--model", "resnet8", "--norm", "bn", "--batch-size", "8", "--steps", "2", "--repeats", "1",
                 "--warmup", "1", "--no-reference", "--no-amp", "--probes", "--json", str(out)]) == 0
    probes = json.loads(out.read_text())["probes"]
    assert probes["probe_pass_seconds"] > 0 and probes["probe_images"] == 128
    for data in ("sample", "cifar10"):
        o = probes["overhead"][data]
        assert 0 < o["per_epoch"] < o["final_epoch"] and o["run"] > 0
    assert "CIFAR-10 final" in capsys.readouterr().out
