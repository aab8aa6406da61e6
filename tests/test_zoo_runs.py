"""The zoo in runs: config fields, bad input, PreciseBN in the trainer, exact resume, presets."""
import sys

import pytest
import torch

from normlab import rundir
from normlab.bench import bench_zoo_layers
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import STOP, train
from normlab.errors import NormlabError
from normlab.study import expand

from conftest import TIMING, interrupted, strip

NEW_SPECS = ["brn", "frn", "frn:learned-eps", "evonorm-s0:4", "evonorm-b0", "gn:4+ws", "bn+ws"]


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(list(args)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_run_ids_name_the_new_norms_and_precise_bn():
    assert RunConfig(norm="brn").run_id().startswith("resnet20-brn-b32-s0-")
    assert RunConfig(norm="GN:16+WS").run_id().startswith("resnet20-gn16ws-b32-s0-")
    assert RunConfig(norm="evonorm-s0:8").run_id().startswith("resnet20-evos0g8-b32-s0-")
    assert RunConfig(norm="bn", precise_bn=512).run_id().startswith("resnet20-bn-pbn-b32-s0-")
    assert RunConfig(norm="brn", brn_r_max=2.0).run_id() != RunConfig(norm="brn").run_id()
    assert "brn_r_max" not in RunConfig(norm="brn").to_dict()  # new fields stay out at defaults


@pytest.mark.parametrize("fields,message", [
    ({"norm": "brn", "batch_size": 1}, "BRN cannot train on 1 image per device"),
    ({"norm": "evonorm-b0", "batch_size": 1}, "EvoNorm-B0 cannot train on 1 image per device"),
    ({"norm": "bn+ws", "batch_size": 1}, "BN+WS cannot train on 1 image per device"),
    ({"norm": "gn:16", "brn_r_max": 2.0}, "--brn-r-max applies to Batch Renorm only"),
    ({"norm": "brn", "brn_r_max": 0.5}, "--brn-r-max >= 1"),
    ({"norm": "brn", "brn_start": 0.5, "brn_d_end": 0.2}, "0 <= --brn-start <= --brn-r-end"),
    ({"norm": "brn", "brn_r_end": 1.5}, "<= 1"),
    ({"norm": "gn:16", "precise_bn": 100}, "which gn:16 does not keep"),
    ({"norm": "frn", "precise_bn": 100}, "which frn does not keep"),
    ({"norm": "bn", "precise_bn": -1}, "--precise-bn must be a positive number"),
])
def test_bad_zoo_configs(fields, message):
    with pytest.raises(NormlabError) as err:
        RunConfig(**fields).validate()
    assert message in str(err.value)
    RunConfig(norm="gn:16", batch_size=1).validate()
    RunConfig(norm="frn", batch_size=1).validate()
    RunConfig(norm="evonorm-s0:8", batch_size=1).validate()
    RunConfig(norm="brn+ws", precise_bn=64).validate()


def test_every_new_spec_trains_end_to_end_and_reports(capsys, cifar_fixture, tmp_path):
    out = tmp_path / "runs"
    for spec in NEW_SPECS:
        extra = ["--virtual-gpus", "2"] if spec in ("brn", "evonorm-b0", "bn+ws") else []
        code, stdout, stderr = run_cli(capsys, "train", "--model", "resnet8", "--norm", spec, "--batch-size", "5",
                                       "--epochs", "1", "--data", "cifar10", "--data-dir", str(cifar_fixture),
                                       "--out", str(out), "--quiet", "--threads", "1", *extra)
        assert code == 0 and "done" in stdout, (spec, stderr)
    assert len(list(out.iterdir())) == len(NEW_SPECS)
    code, stdout, _ = run_cli(capsys, "report", str(out))
    assert code == 0 and (out / "report.md").exists()


def test_precise_bn_changes_the_evaluation_only(cifar_fixture, tmp_path):
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1)
    base = dict(model="resnet8", norm="bn", batch_size=5, virtual_gpus=2, epochs=2, data="cifar10")
    train(RunConfig(**base), tmp_path / "ema", opts)
    train(RunConfig(**base, precise_bn=40), tmp_path / "precise", opts)
    ema, precise = (rundir.read_metrics(tmp_path / d / rundir.METRICS) for d in ("ema", "precise"))
    evaluation = TIMING + ("test_loss", "test_error")
    assert strip(ema, evaluation) == strip(precise, evaluation)          # the same training
    assert [r["test_loss"] for r in ema] != [r["test_loss"] for r in precise]
    assert rundir.read_json(tmp_path / "precise" / rundir.CONFIG)["precise_bn_images"] == 40


@pytest.mark.parametrize("norm,precise", [("brn", 20), ("evonorm-b0", 0)])
def test_resume_mid_ramp_is_exact(norm, precise, cifar_fixture, tmp_path):
    cfg = RunConfig(model="resnet8", norm=norm, batch_size=5, virtual_gpus=2, epochs=2, data="cifar10",
                    precise_bn=precise)
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1)
    train(cfg, tmp_path / "whole", opts)

    def stop_at_step_3(run):  # within the first epoch, while r_max and d_max are rising
        if run.epoch == 0 and run.step == 3:
            STOP.set()
    interrupted(train, cfg, tmp_path / "resumed", opts, on_progress=stop_at_step_3)
    assert train(cfg, tmp_path / "resumed", opts)["state"] == "done"
    whole, resumed = (rundir.read_metrics(tmp_path / d / rundir.METRICS) for d in ("whole", "resumed"))
    assert strip(whole) == strip(resumed) and len(whole) == 2
    a, b = (torch.load(tmp_path / d / rundir.CHECKPOINT, weights_only=False)["model"] for d in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zoo_presets():
    zoo = expand("zoo")
    assert list(zoo.membership) == ["zoo"] and len(zoo.runs) == 33
    assert {c.batch_size for c in zoo.runs.values()} == {32, 8, 2}
    assert all(c.model == "resnet56" and c.data == "cifar10" and c.virtual_gpus == 8 for c in zoo.runs.values())
    assert sum(c.precise_bn > 0 for c in zoo.runs.values()) == 3
    quick = expand("zoo-quick")
    assert list(quick.membership) == ["zoo"] and len(quick.runs) == 16
    assert all(c.data == "sample" for c in quick.runs.values())
    norms = {c.norm for c in quick.runs.values()}
    assert {"bn", "brn", "gn:16", "gn:16+ws", "frn", "evonorm-s0:16", "evonorm-b0"} == norms


def test_bench_times_every_zoo_layer_against_gn():
    rows = bench_zoo_layers(torch.device("cpu"), batch=2, repeats=1)
    layers = {r["layer"] for r in rows}
    assert {"gn:16", "bn", "brn", "frn", "evonorm-s0:16", "evonorm-b0", "conv 3x3 + WS"} <= layers
    assert all(r["microseconds"] > 0 and r["relative"] > 0 for r in rows)
    assert [r["relative"] for r in rows if r["layer"] == "gn:16"] == [1.0, 1.0, 1.0]
