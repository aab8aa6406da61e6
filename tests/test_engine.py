import math

import pytest
import torch

from normlab import rundir
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import train
from normlab.errors import NormlabError

from conftest import strip


def test_lr_rule_and_schedules():
    assert RunConfig(batch_size=32).lr == pytest.approx(0.1)
    assert RunConfig(batch_size=8).lr == pytest.approx(0.025)
    assert RunConfig(batch_size=128, base_lr=0.1, base_batch=128).lr == pytest.approx(0.1)
    assert RunConfig(batch_size=2, virtual_gpus=8).lr == pytest.approx(0.00625)  # N per device
    step = RunConfig(batch_size=32, schedule="step", step_size=30, epochs=100)
    assert [step.lr_at(e) for e in (0, 29.9, 30, 60, 95)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])
    multi = RunConfig(schedule="multistep", milestones=(82, 123), epochs=164)
    assert [multi.lr_at(e) for e in (81, 82, 123)] == pytest.approx([0.1, 0.01, 0.001])
    cos = RunConfig(schedule="cosine", epochs=10)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(5) == pytest.approx(0.05)
    warm = RunConfig(warmup_epochs=2, warmup_factor=0.1)
    assert warm.lr_at(0) == pytest.approx(0.01) and warm.lr_at(1) == pytest.approx(0.055)
    assert warm.lr_at(2) == pytest.approx(0.1)


def test_run_ids_are_readable_and_canonical():
    a = RunConfig(model="resnet56", norm="gn:16", batch_size=32, seed=0)
    assert a.run_id().startswith("resnet56-gn16-b32-s0-")
    assert RunConfig(norm="GN:1").run_id() == RunConfig(norm="ln").run_id()
    assert RunConfig(batch_size=2, virtual_gpus=8).run_id().startswith("resnet20-bn-b2x8-s0-")
    assert RunConfig(epochs=5).run_id() != RunConfig(epochs=6).run_id()


def test_short_run_loss_falls_and_files_are_written(tmp_path):
    cfg = RunConfig(model="resnet8", norm="gn:8", batch_size=64, epochs=3, data="sample")
    status = train(cfg, tmp_path / "run", RuntimeOptions(progress=False, threads=2))
    assert status["state"] == "done"
    rows = rundir.read_metrics(tmp_path / "run" / rundir.METRICS)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["train_error"] < rows[0]["train_error"]
    assert {"lr", "train_loss", "train_error", "test_loss", "test_error", "seconds"} <= set(rows[0])
    config = rundir.read_json(tmp_path / "run" / rundir.CONFIG)
    assert config["norm_layers"]["norm1"] == {"channels": 16, "groups": 8}
    assert config["torch"] == torch.__version__ and config["device"] == "cpu"
    assert config["config"]["seed"] == 0


@pytest.mark.gpu
def test_same_seed_same_metrics(cifar_fixture, tmp_path, device):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=10, epochs=2, data="cifar10", val_split=20)
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1, device=str(device),
                          deterministic=device.type == "cuda")
    train(cfg, tmp_path / "a", opts)
    train(cfg, tmp_path / "b", opts)
    a = rundir.read_metrics(tmp_path / "a" / rundir.METRICS)
    b = rundir.read_metrics(tmp_path / "b" / rundir.METRICS)
    assert "val_error" in a[0]
    assert strip(a) == strip(b)


def test_rerun_of_a_finished_run_does_nothing(cifar_fixture, tmp_path):
    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=1, data="cifar10")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False)
    train(cfg, tmp_path / "r", opts)
    before = (tmp_path / "r" / rundir.METRICS).read_bytes()
    assert train(cfg, tmp_path / "r", opts)["state"] == "done"
    assert (tmp_path / "r" / rundir.METRICS).read_bytes() == before


def test_virtual_gpus_run(cifar_fixture, tmp_path):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=2, virtual_gpus=5, epochs=1, data="cifar10")
    status = train(cfg, tmp_path / "v", RuntimeOptions(data_dir=str(cifar_fixture), progress=False))
    config = rundir.read_json(tmp_path / "v" / rundir.CONFIG)
    assert status["state"] == "done" and config["steps_per_epoch"] == 10
    assert "BN statistics over each 2 images" in config["batch_semantics"]


def test_divergence_is_recorded(cifar_fixture, tmp_path):
    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=10, epochs=3, base_lr=1e6, data="cifar10",
                    zero_init_residual=False)
    status = train(cfg, tmp_path / "d", RuntimeOptions(data_dir=str(cifar_fixture), progress=False))
    assert status["state"] == "diverged"
    rows = rundir.read_metrics(tmp_path / "d" / rundir.METRICS)
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_bn_with_one_image_per_device_is_refused():
    with pytest.raises(NormlabError, match="BN cannot train on 1 image"):
        RunConfig(norm="bn", batch_size=1).validate()
    RunConfig(norm="gn:4", batch_size=1).validate()


def test_run_ids_of_existing_runs_never_change():
    # Pinned from normlab 0.1: results directories made then must keep resuming. Fields added
    # later are declared with config.later() and stay out of the id while at their defaults.
    assert RunConfig().run_id() == "resnet20-bn-b32-s0-eab9b7"
    assert RunConfig(model="resnet56", norm="gn:16", batch_size=32).run_id() == "resnet56-gn16-b32-s0-794060"
    assert RunConfig(model="resnet8", norm="bn", batch_size=2, virtual_gpus=8, data="sample", epochs=7,
                     schedule="cosine").run_id() == "resnet8-bn-b2x8-s0-ae9554"
