"""bf16 autocast by default where the CPU computes bf16 natively; fp32 elsewhere."""
import platform

import pytest
import torch

from normlab import rundir
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import Trainer, train
from normlab.norms import GhostBatchNorm2d
from normlab.precision import choose_amp, cpu_bf16_support

NATIVE, WHY = cpu_bf16_support()


def test_detection_follows_what_torch_reports_about_the_cpu():
    if platform.machine().lower() in ("x86_64", "amd64"):
        caps = torch.cpu.get_capabilities()
        assert NATIVE == bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    assert WHY  # always a reason, recorded in config.json
    cpu = torch.device("cpu")
    assert choose_amp(cpu, None) == (NATIVE, f"auto: {WHY}")
    assert choose_amp(cpu, True) == (True, "--amp")
    assert choose_amp(cpu, False) == (False, "--no-amp")
    assert choose_amp(torch.device("cuda"), None)[0] is True


def test_precision_is_recorded_and_never_part_of_the_run_id(tmp_path):
    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=32, epochs=1)
    status = train(cfg, tmp_path / "r", RuntimeOptions(progress=False, amp=False))
    assert status["state"] == "done"
    options = rundir.read_json(tmp_path / "r" / rundir.CONFIG)["speed_options"]
    assert options["amp"] is False and options["amp_reason"] == "--no-amp"
    auto = Trainer([cfg], [tmp_path / "unused"], RuntimeOptions(progress=False))
    assert auto.amp == NATIVE and auto.describe(auto.members[0])["speed_options"]["amp_reason"] == f"auto: {WHY}"
    assert auto.describe(auto.members[0])["run_id"] == cfg.run_id()


def bf16_step(norm, device):
    cfg = RunConfig(model="resnet8", norm=norm, batch_size=16, epochs=1)
    run = Trainer([cfg], ["unused"], RuntimeOptions(progress=False, device=str(device)))
    assert run.amp, "auto must choose bf16 on CUDA and on this CPU"
    run.model.train()
    (loss,), (wrong,) = run.train_step([torch.arange(16, device=device)], cfg.lr)
    return run, loss


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["bn", "gn:4"])
def test_bf16_path_keeps_parameters_statistics_and_loss_in_fp32(norm, device):
    if device.type == "cpu" and not NATIVE:
        pytest.skip(f"bf16 path needs native bf16: {WHY}")
    run, loss = bf16_step(norm, device)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    bns = [m for m in run.model.modules() if isinstance(m, GhostBatchNorm2d)]
    for m in bns:
        assert m.running_mean.dtype == torch.float32 and m.running_var.dtype == torch.float32
        assert not torch.equal(m.running_var, torch.ones_like(m.running_var))  # updated
    assert bool(bns) == (norm == "bn")
    # the computation really is bf16: the first conv's output under the run's autocast
    with run.autocast():
        assert run.model.conv1(torch.randn(2, 3, 32, 32, device=device)).dtype == torch.bfloat16


@pytest.mark.skipif(NATIVE, reason="this CPU has native bf16; the fp32 default is tested elsewhere")
def test_fp32_is_the_default_without_native_bf16():
    run = Trainer([RunConfig(model="resnet8", norm="bn", epochs=1)], ["unused"], RuntimeOptions(progress=False))
    assert run.amp is False
