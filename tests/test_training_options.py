"""Training options of issue 19: a warm-up counted in steps reaches the loop, and runs trained
without the test set (search-groups) train exactly alike and read it once at the end."""
import math

import pytest

from normlab import rundir
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import ranks, start, train


def tiny(**fields):
    return RunConfig(model="resnet8", norm="gn:4", data="cifar10", batch_size=10, epochs=2, **fields)


def test_a_warmup_in_steps_reaches_the_training_loop(cifar_fixture, tmp_path):
    # 100 training images, 10 per step: 10 steps per epoch; lr / 10 for the first 15 steps
    cfg = tiny(warmup_steps=15, warmup_shape="constant")
    train(cfg, tmp_path / "r", RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1))
    rows = rundir.read_metrics(tmp_path / "r" / rundir.METRICS)
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr / 10, cfg.lr])  # the lr of each epoch's last step
    assert rundir.read_json(tmp_path / "r" / rundir.CONFIG)["config"]["warmup_steps"] == 15  # recorded


def test_train_takes_a_warmup_option(cifar_fixture, tmp_path, capsys):
    args = ["train", "--model", "resnet8", "--norm", "gn:4", "--data", "cifar10", "--data-dir", str(cifar_fixture),
            "--batch-size", "10", "--epochs", "1", "--out", str(tmp_path), "--quiet", "--threads", "1"]
    assert main(args + ["--warmup", "400steps:constant"]) == 0
    (run,) = [p for p in tmp_path.iterdir() if (p / rundir.CONFIG).exists()]
    config = rundir.read_json(run / rundir.CONFIG)["config"]
    assert (config["warmup_steps"], config["warmup_shape"], config["warmup_factor"]) == (400, "constant", 0.1)
    assert main(args + ["--warmup", "400"]) == 2  # 400 epochs of a 1-epoch run: not this
    assert "a warm-up of 400 epochs is longer than the run (1 epochs)" in capsys.readouterr().err


def test_runs_without_the_test_set_train_alike_and_read_it_once(cifar_fixture, tmp_path):
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1)
    cfg = tiny(val_split=20)
    train(cfg, tmp_path / "with", opts)
    train(cfg, tmp_path / "without", RuntimeOptions(**{**opts.__dict__, "test_set": False}))
    with_test, without = (rundir.read_metrics(tmp_path / d / rundir.METRICS) for d in ("with", "without"))
    drop = ("test_loss", "test_error", "seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in without] == \
        [{k: v for k, v in r.items() if k not in drop} for r in with_test]
    assert all(math.isnan(r["test_error"]) for r in without)
    with start(ranks.SINGLE, [cfg], [tmp_path / "without"], opts, force=False) as trainer:
        assert trainer.read_test() == pytest.approx([with_test[-1]["test_error"]])
