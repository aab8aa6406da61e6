"""Data-parallel training under torchrun (gloo, 2 real processes) is the same computation as
--virtual-gpus 2 in one process; it resumes after kill -9 of a rank, stops on one rank's
signal, and refuses bad input on every rank with one line, exit code 2 and no hang."""
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from normlab import rundir
from normlab.cli import main
from normlab.config import RunConfig
from normlab.data import apply_augmentation, augment, draw_augmentation, load_sample
from normlab.norms import GhostBatchNorm2d

from conftest import strip

TIMEOUT = 300  # seconds for any launch: a hang fails the test instead of stalling the suite


def real_cifar(root: Path, train_per_file: int, test: int) -> Path:
    """Real CIFAR-10 images (from the bundled sample) in the official python layout."""
    train_split, test_split = load_sample()
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{i + 1}", train_split, slice(i * train_per_file, (i + 1) * train_per_file))
             for i in range(5)] + [("test_batch", test_split, slice(0, test))]
    for name, split, part in files:
        batch = {b"data": split.images[part].reshape(-1, 3072).numpy(),
                 b"labels": split.labels[part].tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def train_args(data: Path, out: Path, *extra) -> list[str]:
    # fp32 (--no-amp): the equivalence is shown without bf16's rounding on CPUs that have it.
    # 35 training images, 2 x 16 per step: one step per epoch (3 images left out each epoch, as
    # one process does), so the 24 epochs' train losses are 24 steps' losses.
    return ["--model", "resnet8", "--batch-size", "16", "--epochs", "24", "--data", "cifar10",
            "--data-dir", str(data), "--out", str(out), "--quiet", "--threads", "1", "--no-amp", *extra]


def torchrun(*args: str, nproc: int = 2, wait: bool = True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "normlab", "train", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return finish([proc])[0] if wait else proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*rank_args: list[str], command: str = "train") -> list[subprocess.Popen]:
    """Start one process per rank as torchrun does (env:// rendezvous), each with its own args."""
    port, world = free_port(), len(rank_args)
    procs = []
    for rank, args in enumerate(rank_args):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "normlab", command, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process; kills them all and fails on a hang."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"hung for {TIMEOUT} s")
    return results


def run_dir(out: Path) -> Path:
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return path


def metrics(out: Path) -> list[dict]:
    return strip(rundir.read_metrics(run_dir(out) / rundir.METRICS))


def model_state(out: Path) -> dict:
    return torch.load(run_dir(out) / rundir.CHECKPOINT, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return real_cifar(tmp_path_factory.mktemp("data"), train_per_file=7, test=500)


@pytest.fixture(scope="module")
def torchrun_bn(data, tmp_path_factory):
    """Plain BN trained by 2 processes under torchrun: the reference of the fault tests."""
    out = tmp_path_factory.mktemp("torchrun")
    code, _, err = torchrun(*train_args(data, out))
    assert code == 0, err
    return out


# -- the same computation ------------------------------------------------------------------

def test_ghost_bn_running_statistics_are_the_mean_of_per_device_bns():
    """Why averaging the ranks' BN buffers before evaluation equals ghost BN: the moving average
    is linear in the batch statistics, so K independent updates averaged at the end equal K
    chunk updates averaged at every step."""
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(8)
    ghost.chunk_size = 4
    per_device = [torch.nn.BatchNorm2d(8) for _ in range(3)]
    for _ in range(20):
        x = torch.randn(12, 8, 5, 5) * 3 + 1
        out = ghost(x)
        outs = [bn(chunk) for bn, chunk in zip(per_device, x.split(4))]
        torch.testing.assert_close(out, torch.cat(outs))
    for name in ("running_mean", "running_var"):
        average = torch.stack([getattr(bn, name) for bn in per_device]).mean(0)
        torch.testing.assert_close(getattr(ghost, name), average)
        assert not torch.allclose(getattr(per_device[0], name), average)  # the ranks drifted apart


def test_each_rank_takes_its_part_of_the_steps_augmentation():
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    whole = augment(images, torch.Generator().manual_seed(5))
    offsets, flips = draw_augmentation(12, torch.Generator().manual_seed(5))
    parts = [apply_augmentation(images[r * 4:(r + 1) * 4], offsets[:, r * 4:(r + 1) * 4], flips[r * 4:(r + 1) * 4])
             for r in range(3)]
    assert torch.equal(whole, torch.cat(parts))


def sync_bn_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    from normlab.train.ranks import NaiveSyncBatchNorm
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank builds the whole batch, then keeps its part
    x = (torch.randn(world * 3, 4, 5, 5) * 2 + 1).requires_grad_()
    target = torch.randn_like(x)
    reference = torch.nn.BatchNorm2d(4)
    torch.nn.init.uniform_(reference.weight)
    sync = NaiveSyncBatchNorm(4)
    sync.load_state_dict(reference.state_dict())
    whole = reference(x)
    F.mse_loss(whole, target, reduction="sum").backward()
    part = slice(rank * 3, (rank + 1) * 3)
    mine = x.detach()[part].clone().requires_grad_()
    out = sync(mine)
    F.mse_loss(out, target[part], reduction="sum").backward()
    torch.testing.assert_close(out, whole.detach()[part])
    torch.testing.assert_close(sync.running_mean, reference.running_mean)
    torch.testing.assert_close(sync.running_var, reference.running_var)  # unbiased, as BN's
    torch.testing.assert_close(mine.grad, x.grad[part], rtol=1e-4, atol=1e-4)
    for p_sync, p_ref in ((sync.weight, reference.weight), (sync.bias, reference.bias)):
        grad = p_sync.grad.clone()
        dist.all_reduce(grad)  # the whole batch's gradient is the sum of the ranks' (before DDP's mean)
        torch.testing.assert_close(grad, p_ref.grad, rtol=1e-4, atol=1e-4)
    dist.destroy_process_group()


def test_naive_sync_bn_equals_bn_over_all_ranks_images(tmp_path):
    context = torch.multiprocessing.start_processes(sync_bn_worker, args=(2, str(tmp_path / "init")),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("hung")


# BRN: 4 steps per epoch (2 x 4 images), so that its running statistics, which feed the next
# step's r and d, must be averaged after every step and not only before evaluation (r and d
# unclipped from the start, so that they matter)
# Tolerances: about 10-40 times the float noise seen on this CPU (losses, weights); without
# BRN's per-step averaging its gaps were 2.2e-5 and 1e-4.
@pytest.mark.parametrize("extra,epochs,steps,tolerance", [
    ([], 24, 1, (1e-5, 1e-4)), (["--sync-bn"], 24, 1, (1e-4, 1e-3)),
    (["--norm", "brn", "--batch-size", "4", "--epochs", "6", "--brn-start", "0", "--brn-r-end", "0",
      "--brn-d-end", "0"], 6, 4, (2e-6, 2e-5))], ids=["bn", "sync-bn", "brn"])
def test_two_processes_equal_two_virtual_gpus(capsys, data, torchrun_bn, tmp_path, extra, epochs, steps, tolerance):
    if extra:
        processes = tmp_path / "torchrun"
        code, _, err = torchrun(*train_args(data, processes, *extra))
        assert code == 0, err
    else:
        processes = torchrun_bn
    virtual = tmp_path / "virtual"
    assert main(["train", *train_args(data, virtual, "--virtual-gpus", "2", *extra)]) == 0
    capsys.readouterr()
    assert run_dir(processes).name == run_dir(virtual).name  # one run: "2 devices x 16 images"
    config_p, config_v = (rundir.read_json(run_dir(o) / rundir.CONFIG) for o in (processes, virtual))
    assert config_p["config"] == config_v["config"] and config_p["config"]["virtual_gpus"] == 2
    assert config_p["execution"]["how"] == "processes (torchrun)" and config_p["execution"]["backend"] == "gloo"
    assert config_v["execution"]["how"] == "virtual devices in one process"
    assert config_p["steps_per_epoch"] == config_v["steps_per_epoch"] == steps
    rows_p, rows_v = metrics(processes), metrics(virtual)
    assert len(rows_p) == len(rows_v) == epochs  # 24 steps in all
    gaps = {k: max(abs(p[k] - v[k]) for p, v in zip(rows_p, rows_v)) for k in ("train_loss", "test_loss")}
    print(f"{extra}: largest difference over {epochs * steps} steps: {gaps}")
    assert gaps["train_loss"] < tolerance[0] and gaps["test_loss"] < tolerance[0], gaps
    assert rows_p[-1]["train_loss"] < rows_p[0]["train_loss"] - 0.03  # it did learn: a real test
    assert [r["train_error"] for r in rows_p] == [r["train_error"] for r in rows_v]
    assert [r["test_error"] for r in rows_p] == [r["test_error"] for r in rows_v]
    state_p, state_v = model_state(processes), model_state(virtual)
    assert state_p.keys() == state_v.keys()
    gap, name = max(((state_p[k] - state_v[k]).abs().max().item(), k) for k in state_v)
    print(f"{extra}: largest difference of a weight or BN running statistic: {gap:.2g} ({name})")
    assert gap < tolerance[1]  # weights and the averaged running statistics: the same model


# -- faults ----------------------------------------------------------------------------------

def worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            env = dict(v.split("=", 1) for v in (stat.parent / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(stat.parent.name)
    return ranks


def wait_for_epochs(out: Path, epochs: int, procs) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        runs = [p for p in out.glob("*") if p.is_dir()] if out.exists() else []
        if runs and len(rundir.read_metrics(runs[0] / rundir.METRICS)) >= epochs:
            return
        assert all(p.poll() is None for p in procs), "ended before it could be stopped"
        time.sleep(0.02)
    pytest.fail("no progress")


def test_kill_9_of_rank_0_then_the_same_command_resumes(data, torchrun_bn, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(*train_args(data, out), wait=False)
    wait_for_epochs(out, 3, [proc])
    os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)  # the writer, at any moment
    code, _, err = finish([proc])[0]
    assert code != 0
    assert rundir.read_json(run_dir(out) / rundir.STATUS)["state"] != "done"
    code, _, err = torchrun(*train_args(data, out))
    assert code == 0, err
    assert rundir.read_json(run_dir(out) / rundir.STATUS)["state"] == "done"
    assert metrics(out) == metrics(torchrun_bn)  # resumed from an epoch's end: the same numbers


def test_a_signal_to_one_rank_stops_every_rank_then_resumes(capsys, tmp_path):
    data = real_cifar(tmp_path / "data", train_per_file=20, test=100)  # 100 images: 3 steps per epoch

    def args(out, *extra):
        return ["--model", "resnet8", "--batch-size", "16", "--epochs", "12", "--data", "cifar10",
                "--data-dir", str(data), "--out", str(out), "--quiet", "--threads", "1", "--no-amp", *extra]
    out = tmp_path / "out"
    procs = launch(args(out), args(out))
    wait_for_epochs(out, 1, procs)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 must hear of it and stop too
    results = finish(procs)
    assert [code for code, _, _ in results] == [75, 75], results
    status = rundir.read_json(run_dir(out) / rundir.STATUS)
    assert status["state"] == "interrupted" and status["epoch"] < 12
    assert [code for code, _, _ in finish(launch(args(out), args(out)))] == [0, 0]
    assert main(["train", *args(tmp_path / "virtual", "--virtual-gpus", "2")]) == 0
    capsys.readouterr()
    for p, v in zip(metrics(out), metrics(tmp_path / "virtual"), strict=True):
        assert abs(p["train_loss"] - v["train_loss"]) < 1e-4 and abs(p["test_loss"] - v["test_loss"]) < 1e-4


# -- bad input -------------------------------------------------------------------------------

def one_line_each(results, message: str) -> None:
    for code, _, err in results:
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("normlab: error:") and message in lines[0], err


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("*.json"))


def test_bad_input_on_two_ranks(tmp_path):
    small = real_cifar(tmp_path / "small", train_per_file=4, test=20)
    other = real_cifar(tmp_path / "other", train_per_file=5, test=20)
    out = tmp_path / "out"
    base = ["--model", "resnet8", "--epochs", "1", "--data", "cifar10", "--out", str(out), "--quiet"]
    # 20 training images: one process of 16 would train, two of 16 are one step of 32
    one_line_each(finish(launch(*[[*base, "--data-dir", str(small), "--batch-size", "16"]] * 2)),
                  "one step needs 32 images (2 devices x 16) but the training set has 20")
    one_line_each(finish(launch(*[[*base, "--data-dir", str(small), "--batch-size", "4", "--virtual-gpus", "3"]] * 2)),
                  "--virtual-gpus 3 under torchrun with 2 processes")
    # a rank reading another copy of the data would take another number of steps: refused
    results = finish(launch([*base, "--data-dir", str(small), "--batch-size", "4"],
                            [*base, "--data-dir", str(other), "--batch-size", "4"]))
    one_line_each(results, "rank 1 has training images 25 but rank 0 has 20")
    one_line_each(finish(launch(*[[str(out)]] * 2, command="report")), "only 'normlab train' runs under torchrun")
    assert nothing_written(out)


def test_errors_of_rank_0_alone_stop_every_rank(tmp_path):
    data = real_cifar(tmp_path / "data", train_per_file=4, test=20)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    args = ["--model", "resnet8", "--epochs", "1", "--batch-size", "4", "--data", "cifar10",
            "--data-dir", str(data), "--quiet"]
    one_line_each(finish(launch(*[[*args, "--out", str(blocker / "runs")]] * 2)), "choose a writable --out")
    run = tmp_path / "out" / RunConfig(model="resnet8", epochs=1, batch_size=4, data="cifar10",
                                       virtual_gpus=2).run_id()
    run.mkdir(parents=True)
    lock = rundir.RunLock(run)
    assert lock.acquire()  # as if another torchrun group were training it
    try:
        one_line_each(finish(launch(*[[*args, "--out", str(tmp_path / "out")]] * 2)),
                      "is being trained by another process")
    finally:
        lock.release()
    assert [p.name for p in run.iterdir()] == [rundir.LOCK]


def test_a_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(busy.getsockname()[1])}
        proc = subprocess.Popen([sys.executable, "-m", "normlab", "train", "--out", str(tmp_path / "o")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        one_line_each(finish([proc]), "cannot join the other processes")
    assert nothing_written(tmp_path / "o")


@pytest.mark.parametrize("args,message", [
    (["--norm", "gn:4", "--sync-bn", "--virtual-gpus", "2"], "--sync-bn synchronises BN's batch statistics, but norm 'gn:4'"),
    (["--norm", "brn", "--sync-bn", "--virtual-gpus", "2"], "but norm 'brn' is not BN"),
    (["--norm", "ln", "--sync-bn", "--virtual-gpus", "2"], "but norm 'ln' has none"),
    (["--norm", "bn", "--sync-bn"], "--sync-bn needs several devices"),
])
def test_sync_bn_bad_input(capsys, tmp_path, args, message):
    code = main(["train", "--epochs", "1", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert nothing_written(tmp_path / "o")


def test_torchrun_itself_reports_the_ranks_lines(tmp_path):
    data = real_cifar(tmp_path / "data", train_per_file=4, test=20)
    out = tmp_path / "out"
    code, _, err = torchrun("--model", "resnet8", "--epochs", "1", "--batch-size", "16", "--data", "cifar10",
                            "--data-dir", str(data), "--out", str(out), "--quiet")
    assert code != 0  # torchrun exits 1 when its workers fail; each worker exited 2 with one line
    assert err.count("normlab: error: one step needs 32 images") == 2  # one line from each rank
    assert nothing_written(out)
