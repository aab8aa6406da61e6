"""Run arrays: R runs fused into one network compute what each computes alone (up to float
rounding), keep their own run directories, resume alone or together, and survive kill -9."""
import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normlab import checkpoint, rundir
from normlab.config import RunConfig, RuntimeOptions
from normlab.errors import NormlabError
from normlab.study import plan_arrays
from normlab.train import Trainer, train, train_array
from normlab.train import state as run_state

from conftest import interrupted, stop_after_epoch, strip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from soak import kill_then_finish  # noqa: E402


def seeds(cfg, n=3):
    return [dataclasses.replace(cfg, seed=s) for s in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("norm,virtual_gpus", [("bn", 1), ("bn", 2), ("gn:4", 1), ("frn", 1),
                                               ("evonorm-b0", 2), ("bn+ws", 1)])
def test_fused_steps_equal_the_runs_trained_alone(norm, virtual_gpus, device):
    """24 SGD steps of 3 fused runs against the same 3 runs alone, fp32: each run's losses,
    weights and running statistics agree to float noise."""
    cfg = RunConfig(model="resnet8", norm=norm, batch_size=4, virtual_gpus=virtual_gpus, epochs=2).normalized()
    opts = RuntimeOptions(progress=False, threads=1, amp=False, device=str(device))
    fused = Trainer(seeds(cfg), ["unused"] * 3, opts)
    alone = [Trainer([c], ["unused"], opts) for c in seeds(cfg)]
    assert fused.network.runs == 3 and all(t.network.runs == 1 for t in alone)
    for trainer in (fused, *alone):
        trainer.model.train()
    orders = [torch.randperm(4000, generator=torch.Generator().manual_seed(s)).to(device) for s in range(3)]
    n, worst = cfg.images_per_step, 0.0
    for step in range(24):
        index = [o[step * n:(step + 1) * n] for o in orders]
        fused_losses, _ = fused.train_step(index, cfg.lr)
        for r, trainer in enumerate(alone):
            (loss,), _ = trainer.train_step([index[r]], cfg.lr)
            worst = max(worst, abs(loss.item() - fused_losses[r].item()))
    def relative_gap(a, b):  # relative to the tensor's scale (BN's running variances reach 1e2)
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1)).item()
    weights = max(relative_gap(fused.network.state(r)[k], v)
                  for r in range(3) for k, v in alone[r].model.state_dict().items())
    print(f"{norm} x{virtual_gpus}: largest gaps over 24 steps: loss {worst:.1e}, weights/buffers {weights:.1e} "
          f"(relative)")
    assert worst < 1e-5 and weights < 1e-5
    # and each run's evaluation
    x = torch.randn(6, 3, 32, 32, device=device)
    fused.model.eval()
    with torch.no_grad():
        outs = fused.network.split(fused.model(fused.network.repeat(x)))
        for r, trainer in enumerate(alone):
            assert torch.allclose(outs[r], trainer.model.eval()(x), atol=1e-5)


def test_a_run_is_stacked_and_split_back_exactly():
    cfg = RunConfig(model="resnet8", norm="brn", batch_size=4, epochs=1).normalized()
    trainer = Trainer(seeds(cfg), ["unused"] * 3, RuntimeOptions(progress=False, threads=1))
    lone = Trainer([seeds(cfg)[1]], ["unused"], RuntimeOptions(progress=False, threads=1))
    for key, value in lone.model.state_dict().items():
        assert torch.equal(trainer.network.state(1)[key], value), key
    state = trainer.optimizer.state_dict()
    assert trainer.network.stack_optimizer_states([trainer.network.optimizer_state(state, r) for r in range(3)]) \
        ["param_groups"] == state["param_groups"]


def test_arrays_are_planned_from_runs_that_differ_only_in_their_seeds():
    base = RunConfig(model="resnet8", norm="bn", batch_size=2, epochs=1).normalized()
    runs = {c.run_id(): c for c in
            [*seeds(base, 4), *seeds(dataclasses.replace(base, norm="gn:4"), 2),
             *seeds(dataclasses.replace(base, norm="frn:learned-eps"), 2)]}
    jobs = plan_arrays(runs, list(runs), lambda cfg: 3)
    assert [len(j) for j in jobs] == [3, 1, 2, 1, 1]
    assert all(len({dataclasses.replace(runs[r], seed=0) for r in job}) == 1 for job in jobs)
    assert [len(j) for j in plan_arrays(runs, list(runs), lambda cfg: 1)] == [1] * 8


def test_runs_that_differ_in_more_than_the_seed_are_not_an_array():
    a = RunConfig(model="resnet8", norm="bn", epochs=1)
    with pytest.raises(NormlabError, match="differ in more than the seed"):
        Trainer([a, dataclasses.replace(a, norm="gn:4", seed=1)], ["x", "y"], RuntimeOptions(progress=False))


@pytest.fixture
def array_setup(cifar_fixture, device):
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=10, epochs=3, data="cifar10").normalized()
    return seeds(cfg), RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1, device=str(device),
                                      deterministic=device.type == "cuda")


@pytest.mark.gpu
def test_an_array_writes_each_run_directory_and_resumes_alone_or_together(array_setup, tmp_path):
    cfgs, opts = array_setup
    whole = train_array(cfgs, [tmp_path / "whole" / c.run_id() for c in cfgs], opts)
    assert {s["state"] for s in whole.values()} == {"done"}
    info = rundir.read_json(tmp_path / "whole" / cfgs[1].run_id() / rundir.CONFIG)
    assert info["execution"]["array"]["runs"] == 3 and info["run_id"] == cfgs[1].run_id()
    assert info["config"] == cfgs[1].to_dict()  # the run id and config are the lone run's

    # stopped after epoch 1 as an array, then resumed alone: the epoch trained in the array stays
    dirs = [tmp_path / "mixed" / c.run_id() for c in cfgs]
    interrupted(train_array, cfgs, dirs, opts, on_epoch=stop_after_epoch(1))
    assert rundir.read_json(dirs[1] / rundir.STATUS)["state"] == "interrupted"
    assert train(cfgs[1], dirs[1], opts)["state"] == "done"
    whole_rows = strip(rundir.read_metrics(tmp_path / "whole" / cfgs[1].run_id() / rundir.METRICS))
    mixed_rows = strip(rundir.read_metrics(dirs[1] / rundir.METRICS))
    assert mixed_rows[0] == whole_rows[0] and len(mixed_rows) == 3
    # the other two, stopped in the array, resume together as an array
    again = train_array([cfgs[0], cfgs[2]], [dirs[0], dirs[2]], opts)
    assert {s["state"] for s in again.values()} == {"done"}
    for r in (0, 2):
        assert strip(rundir.read_metrics(dirs[r] / rundir.METRICS))[0] == \
            strip(rundir.read_metrics(tmp_path / "whole" / cfgs[r].run_id() / rundir.METRICS))[0]

    # runs trained alone and stopped at one step resume together as an array
    lone_dirs = [tmp_path / "lone" / c.run_id() for c in cfgs[:2]]
    for cfg, d in zip(cfgs[:2], lone_dirs):
        interrupted(train, cfg, d, opts, on_epoch=stop_after_epoch(1))
    result = train_array(cfgs[:2], lone_dirs, opts)
    assert {s["state"] for s in result.values()} == {"done"}
    assert rundir.read_json(lone_dirs[0] / rundir.CONFIG)["execution"]["array"]["runs"] == 2
    # a finished array is left as it is
    assert train_array(cfgs, [tmp_path / "whole" / c.run_id() for c in cfgs], opts) == whole


def test_a_diverging_run_leaves_the_array_and_the_others_go_on(array_setup, tmp_path):
    cfgs, opts = array_setup
    dirs = [tmp_path / c.run_id() for c in cfgs]
    poisoned = []

    def poison(trainer):  # run 1's classifier becomes NaN after the first step
        if not poisoned and trainer.step == 1:
            with torch.no_grad():
                trainer.model.fc.weight[10:20] = float("nan")
            poisoned.append(True)

    statuses = train_array(cfgs, dirs, opts, on_progress=poison)
    assert statuses[cfgs[1].run_id()]["state"] == "diverged"
    assert statuses[cfgs[1].run_id()]["diverged_in_epoch"] == 1
    assert statuses[cfgs[0].run_id()]["state"] == statuses[cfgs[2].run_id()]["state"] == "done"
    for r in (0, 2):
        rows = rundir.read_metrics(dirs[r] / rundir.METRICS)
        assert len(rows) == 3 and all(row["train_loss"] == row["train_loss"] for row in rows)
    assert rundir.read_json(dirs[0] / rundir.CONFIG)["execution"]["array"]["runs"] == 2  # after the epoch


def test_a_kill_between_the_runs_checkpoints_is_recovered_exactly(array_setup, tmp_path, monkeypatch):
    """An array killed after some of its runs' new checkpoints are written: the rerun takes
    those runs back to the previous checkpoint and ends with the uninterrupted array's metrics."""
    cfgs, opts = array_setup
    ref = [tmp_path / "ref" / c.run_id() for c in cfgs]
    train_array(cfgs, ref, opts)
    dirs = [tmp_path / "out" / c.run_id() for c in cfgs]
    saves = []
    real_save = checkpoint.save

    class Killed(BaseException):
        pass

    def save_then_die(path, state):
        saves.append(path)
        if len(saves) == 5:  # epoch 2's checkpoints: run 0 written, run 1 killed mid-way
            raise Killed()
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train_array(cfgs, dirs, opts)
    monkeypatch.setattr(checkpoint, "save", real_save)
    steps = [checkpoint.load(d / rundir.CHECKPOINT)["epoch"] for d in dirs]
    assert steps == [2, 1, 1] and (dirs[0] / run_state.PREVIOUS).exists()
    assert {s["state"] for s in train_array(cfgs, dirs, opts).values()} == {"done"}
    for d, r in zip(dirs, ref):
        assert strip(rundir.read_metrics(d / rundir.METRICS)) == strip(rundir.read_metrics(r / rundir.METRICS))
        assert not (d / run_state.PREVIOUS).exists()


def seeds_command(out, data):
    return [sys.executable, "-m", "normlab", "train", "--model", "resnet8", "--norm", "gn:4",
            "--batch-size", "10", "--epochs", "3", "--data", "cifar10", "--data-dir", str(data),
            "--seeds", "0,1,2", "--threads", "1", "--quiet", "--out", str(out)]


def test_kill_9_of_an_array_then_rerun_gives_the_uninterrupted_metrics(tmp_path):
    from conftest import write_cifar_fixture

    data = write_cifar_fixture(tmp_path / "data", n_per_file=60)
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(seeds_command(ref, data), check=True, capture_output=True)
    rng = random.Random(int(os.environ.get("NORMLAB_FAULT_SEED", "0")))
    kills = kill_then_finish([*seeds_command(out, data), "--checkpoint-every", "0.005"], out, kills=5,
                             max_delay=0.3, rng=rng)
    print(f"array killed {kills} times")
    assert kills >= 3
    for run in sorted(p.name for p in ref.iterdir()):
        assert strip(rundir.read_metrics(out / run / rundir.METRICS)) == \
            strip(rundir.read_metrics(ref / run / rundir.METRICS)), run
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(run_state.PREVIOUS))


def test_evaluation_and_precise_bn_per_run():
    """Each run's test error and PreciseBN statistics in the array are its own."""
    from normlab.norms import precise_statistics
    from normlab.train.evaluation import evaluate

    cfg = RunConfig(model="resnet8", norm="bn", batch_size=8, virtual_gpus=2, precise_bn=64,
                    epochs=1).normalized()
    opts = RuntimeOptions(progress=False, threads=1, amp=False)
    fused = Trainer(seeds(cfg), ["unused"] * 3, opts)
    alone = [Trainer([c], ["unused"], opts) for c in seeds(cfg)]
    for trainer in (fused, *alone):
        with precise_statistics(trainer.model, trainer.precise_batches()):
            results = evaluate(trainer.network, trainer.data.test, trainer.normalize, 500,
                               trainer.autocast)
        trainer.results = results
    for r, trainer in enumerate(alone):
        (loss, error), = trainer.results
        assert abs(fused.results[r][0] - loss) < 1e-5 and abs(fused.results[r][1] - error) <= 0.2


def test_a_study_trains_its_seeds_as_arrays(tmp_path, cifar_fixture):
    from normlab.study import expand, run_study

    preset = tmp_path / "tiny.yaml"
    preset.write_text("name: tiny\nseeds: 2\nbase: {model: resnet8, data: cifar10, epochs: 2, batch_size: 10}\n"
                      "studies:\n  norms:\n    - {norm: [bn, 'frn:learned-eps']}\n")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1)
    results = run_study(expand(str(preset)), tmp_path / "out", opts, array_size=lambda cfg: 4)
    assert len(results) == 4 and {r["state"] for r in results.values()} == {"done"}
    arrays = {rid: rundir.read_json(tmp_path / "out" / rid / rundir.CONFIG)["execution"].get("array")
              for rid in results}
    assert sorted(a["runs"] if a else 1 for a in arrays.values()) == [1, 1, 2, 2]  # FRN's learned eps: alone
