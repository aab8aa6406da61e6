"""normlab on CUDA. The `gpu` tests run on any device (`pytest -m gpu --device cuda` on a GPU,
as scripts/gpu-check.sh does; on the CPU by default); the others check on the CPU what the CUDA
options do there: --deterministic, --fast-path, the out-of-memory probe, the device checks."""
import contextlib
import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist

from normlab import rundir
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.errors import NormlabError
from normlab.norms import GhostBatchNorm2d
from normlab.train import Trainer, ranks, start, train
from normlab.train import build, fast, memory
from normlab.train.evaluation import evaluate

from conftest import interrupted, stop_after_epoch, strip


def relative_gap(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1)).item()


@pytest.mark.gpu
def test_evaluation_on_the_device_equals_the_cpus(device):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=16, epochs=1)
    trained = Trainer([cfg], ["unused"], RuntimeOptions(progress=False, device=str(device), amp=False, threads=1))
    trained.model.train()
    for step in range(3):  # running statistics away from their initial values
        trained.train_step([torch.arange(16 * step, 16 * step + 16, device=device)], cfg.lr)
    on_cpu = Trainer([cfg], ["unused"], RuntimeOptions(progress=False, device="cpu", amp=False, threads=1))
    on_cpu.network.load([{k: v.cpu() for k, v in trained.network.state(0).items()}])
    (loss, error), = evaluate(trained.network, trained.data.test, trained.normalize, 250, contextlib.nullcontext)
    (cpu_loss, cpu_error), = evaluate(on_cpu.network, on_cpu.data.test, on_cpu.normalize, 250, contextlib.nullcontext)
    assert abs(loss - cpu_loss) < 1e-4 * max(1.0, cpu_loss)
    assert abs(error - cpu_error) <= 0.2  # an image or two whose top classes tie to float noise


def test_sgd_update_with_a_tensor_lr_is_torchs_sgd():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    twin.load_state_dict(model.state_dict())
    cfg = RunConfig(wd_on_norm=False)  # two parameter groups: decayed and not
    ours, theirs = build.build_optimizer(model, cfg), build.build_optimizer(twin, cfg)
    lr = torch.zeros(())
    for step in range(5):
        x = torch.randn(8, 4)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).square().sum().backward()
        for group in theirs.param_groups:
            group["lr"] = 0.1 / (step + 1)
        theirs.step()
        if step == 0:
            ours.step()  # the first step creates the momentum buffers (GraphStep's eager warm-up)
            continue
        lr.fill_(0.1 / (step + 1))
        fast.sgd_update(ours, lr)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("norm,virtual_gpus,runs", [("bn", 1, 1), ("bn", 4, 1), ("gn:4", 1, 2), ("brn", 2, 1)])
def test_the_graph_step_trains_as_the_eager_step(device, norm, virtual_gpus, runs):
    """--fast-path graph: 12 steps (3 eager, the capture, 8 replays) with a changing lr and,
    for Batch Renorm, limits changed between replays, against the eager step: each run's losses,
    weights and statistics agree to float noise. On the CPU the same static-buffer step runs
    uncaptured (capture needs CUDA)."""
    cfg = RunConfig(model="resnet8", norm=norm, batch_size=4, virtual_gpus=virtual_gpus, epochs=1).normalized()
    cfgs = [dataclasses.replace(cfg, seed=s) for s in range(runs)]
    opts = RuntimeOptions(progress=False, threads=1, amp=False, device=str(device))
    eager, graph = Trainer(cfgs, ["unused"] * runs, opts), Trainer(cfgs, ["unused"] * runs, opts)
    graph.graph_step = fast.GraphStep(graph, capture=device.type == "cuda")
    for trainer in (eager, graph):
        trainer.model.train()
    orders = [torch.randperm(4000, generator=torch.Generator().manual_seed(s)).to(device) for s in range(runs)]
    n, worst = cfg.images_per_step, 0.0
    for step in range(12):
        if step == 7:
            for trainer in (eager, graph):
                for layer in trainer.renorm:
                    layer.set_limits(1.5, 0.5)
        index = [o[step * n:(step + 1) * n] for o in orders]
        lr = cfg.lr * (1 - step / 24)
        eager_losses, eager_wrong = eager.train_step(index, lr)
        graph_losses, graph_wrong = graph.train_step(index, lr)
        worst = max(worst, max(abs(a.item() - b.item()) for a, b in zip(eager_losses, graph_losses)))
    assert (graph.graph_step.graph is not None) == (device.type == "cuda")
    weights = max(relative_gap(graph.network.state(r)[k], v)
                  for r in range(runs) for k, v in eager.network.state(r).items())
    print(f"{norm} x{virtual_gpus}, {runs} run(s): graph against eager over 12 steps: loss {worst:.1e}, "
          f"weights/buffers {weights:.1e} (relative)")
    assert worst < 1e-4 and weights < 1e-4


@pytest.mark.gpu
def test_a_graph_run_resumes_and_ends_as_an_eager_run(device, cifar_fixture, tmp_path):
    if device.type != "cuda":
        pytest.skip("--fast-path graph needs CUDA (its step is checked uncaptured on the CPU above)")
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=10, epochs=3, data="cifar10")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, device=str(device), amp=False)
    train(cfg, tmp_path / "eager", opts)
    graph = dataclasses.replace(opts, fast_path="graph")
    interrupted(train, cfg, tmp_path / "graph", graph, on_epoch=stop_after_epoch(1))
    assert train(cfg, tmp_path / "graph", graph)["state"] == "done"
    eager_rows, graph_rows = (strip(rundir.read_metrics(tmp_path / d / rundir.METRICS)) for d in ("eager", "graph"))
    assert len(graph_rows) == 3
    for a, b in zip(eager_rows, graph_rows):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["test_loss"] - b["test_loss"]) < 1e-3
    options = rundir.read_json(tmp_path / "graph" / rundir.CONFIG)["speed_options"]
    assert options["fast_path"] == "graph"


def test_fast_paths_are_refused_where_they_cannot_work():
    cfg = RunConfig(model="resnet8", epochs=1)
    with pytest.raises(NormlabError, match="needs a CUDA device"):
        Trainer([cfg], ["unused"], RuntimeOptions(progress=False, device="cpu", fast_path="graph"))
    cuda = torch.device("cuda")
    with pytest.raises(NormlabError, match="--compile and --fast-path compile"):
        fast.check("compile", cuda, True, 1)
    with pytest.raises(NormlabError, match="under torchrun leave it off"):
        fast.check("graph", cuda, False, 2)
    with pytest.raises(NormlabError, match="unknown fast path 'warp'"):
        fast.check("warp", cuda, False, 1)
    fast.check("off", torch.device("cpu"), True, 4)


def test_deterministic_is_recorded_never_in_the_run_id_and_changes_nothing_on_the_cpu(cifar_fixture, tmp_path):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=10, epochs=1, data="cifar10")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1)
    try:
        train(cfg, tmp_path / "det", dataclasses.replace(opts, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        build.set_deterministic(False)
    train(cfg, tmp_path / "plain", opts)
    assert not torch.are_deterministic_algorithms_enabled()
    info = rundir.read_json(tmp_path / "det" / rundir.CONFIG)
    assert info["speed_options"]["deterministic"] is True and info["run_id"] == cfg.run_id()
    assert rundir.read_json(tmp_path / "plain" / rundir.CONFIG)["speed_options"]["deterministic"] is False
    assert strip(rundir.read_metrics(tmp_path / "det" / rundir.METRICS)) == \
        strip(rundir.read_metrics(tmp_path / "plain" / rundir.METRICS))


def test_out_of_memory_is_refused_in_one_line_and_leaves_the_model_as_it_was(monkeypatch):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=8, virtual_gpus=2, epochs=1)
    trainer = Trainer([cfg], ["unused"], RuntimeOptions(progress=False, threads=1))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    memory.probe(trainer)  # what the trainer does on CUDA: a step's forward and backward, an evaluation
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(trainer, "forward", out_of_memory)
    with pytest.raises(NormlabError) as refused:
        memory.probe(trainer)
    assert str(refused.value) == ("out of GPU memory on cpu in one training step: resnet8 at 2 x 8 images per step "
                                  "does not fit; lower --batch-size or --virtual-gpus")
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_out_of_memory_during_training_is_one_line_exit_2_and_a_failed_run(monkeypatch, tmp_path, capsys):
    real = Trainer.compute_step

    def out_of_memory_at_step_3(trainer, *args, **kwargs):
        if trainer.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(trainer, *args, **kwargs)
    monkeypatch.setattr(Trainer, "compute_step", out_of_memory_at_step_3)
    code = main(["train", "--model", "resnet8", "--batch-size", "32", "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "out of GPU memory on cpu in epoch 1" in err[0]
    assert "lower --batch-size or --virtual-gpus" in err[0]
    status = rundir.read_json(next(tmp_path.iterdir()) / rundir.STATUS)
    assert status["state"] == "failed" and "out of GPU memory" in status["error"]


def test_a_gpu_index_beyond_the_machines_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(NormlabError, match=r"this machine has 1 GPU\(s\), cuda:0 to cuda:0; use one of those"):
        build.resolve_device("cuda:7")


# -- CUDA only ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_a_one_process_nccl_group_trains_as_one_process(device, cifar_fixture, tmp_path, monkeypatch):
    """normlab's torchrun path on CUDA (NCCL collectives, the gloo control group, DDP) in a
    group of one: the same metrics as the plain run, exactly (deterministic algorithms)."""
    if device.type != "cuda":
        pytest.skip("NCCL needs CUDA (torchrun on gloo is tests/test_distributed.py)")
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=10, epochs=2, data="cifar10")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, device=str(device), deterministic=True)
    train(cfg, tmp_path / "single", opts)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    group = ranks.Group("cuda")
    try:
        assert group.backend == "nccl"
        with start(group, [cfg], [tmp_path / "nccl"], opts, False) as trainer:
            assert trainer.run()[cfg.run_id()]["state"] == "done"
    finally:
        group.close()
        build.set_deterministic(False)
    assert strip(rundir.read_metrics(tmp_path / "nccl" / rundir.METRICS)) == \
        strip(rundir.read_metrics(tmp_path / "single" / rundir.METRICS))


def sync_bn_rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank draws the same batch and takes its part
    x = torch.randn(8, 16, 4, 4, device="cuda:0")
    weight, grad = torch.randn(16, device="cuda:0"), torch.randn(8, 16, 4, 4, device="cuda:0")
    layer = ranks.SyncBatchNormAct(16).to("cuda:0")
    layer.act = True
    with torch.no_grad():
        layer.weight.copy_(weight)
    part = x.chunk(world)[rank].clone().requires_grad_()
    layer(part).backward(grad.chunk(world)[rank])
    torch.save({"grad": part.grad.cpu(), "weight_grad": layer.weight.grad.cpu(),
                "running_mean": layer.running_mean.cpu(), "running_var": layer.running_var.cpu()},
               os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.gpu
def test_sync_batchnorm_on_cuda_equals_bn_over_every_ranks_images(device, tmp_path):
    """nn.SyncBatchNorm's CUDA kernels (--sync-bn under torchrun on GPUs) on one GPU: two
    processes on gloo (NCCL refuses two ranks on one GPU) against BN over all their images."""
    if device.type != "cuda":
        pytest.skip("nn.SyncBatchNorm runs on CUDA only (the CPU's version is tested in tests/test_distributed.py)")
    torch.multiprocessing.spawn(sync_bn_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    x = torch.randn(8, 16, 4, 4, device="cuda:0", requires_grad=True)
    weight, grad = torch.randn(16, device="cuda:0"), torch.randn(8, 16, 4, 4, device="cuda:0")
    layer = GhostBatchNorm2d(16, act=True).to("cuda:0")
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer(x).backward(grad)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(parts[0]["weight_grad"] + parts[1]["weight_grad"], layer.weight.grad.cpu(),
                               rtol=1e-4, atol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["running_mean"], layer.running_mean.cpu())
        torch.testing.assert_close(p["running_var"], layer.running_var.cpu())
