"""--log tensorboard | mlflow | wandb: what each tool holds, read back with its own reader
(TensorBoard's event reader, MLflow's client on the local store, W&B's offline run files read
by `wandb leet`), compared with metrics.csv, across a kill -9 and a resume; and loggers that
fail without stopping training. W&B never goes on the network here (offline mode)."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab import loggers, rundir
from normlab.loggers.base import figure_name
from normlab.config import RunConfig

from conftest import write_cifar_fixture



def needs(tool: str) -> None:
    if importlib.util.find_spec(tool) is None:  # CI installs the three extras
        pytest.skip(f"{tool} is not installed (pip install 'normlab[{tool}]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """W&B offline, flushing its run file every half second (W&B's default is 15 s), with no
    login or settings of the user's; MLflow's store is always the local one."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB__TRANSACTION_LOG_FLUSH_INTERVAL", "0.5")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


# -- the tools' readers -------------------------------------------------------------------------
def tensorboard_scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()  # applies the purge steps, as TensorBoard does
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def mlflow_runs(out: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out.absolute() / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


def mlflow_points(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


@functools.lru_cache(maxsize=None)  # read once a test has finished writing (its paths are its own)
def wandb_records(out: Path, run_name: str) -> list[dict]:
    """Every record of the run's offline files, in the order `wandb sync` uploads them."""
    records = []
    for path in sorted((out / "wandb").glob("offline-run-*/*.wandb")):
        listing = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                                 capture_output=True, text=True, check=True).stdout
        file_records = [json.loads(line) for line in listing.splitlines() if line.strip()]
        if any(r["type"] == "run" and r["run"].get("display_name") == run_name for r in file_records):
            records += file_records
    return records


def points(tool: str, out: Path, run_id: str, prefix: str, name: str) -> list[tuple[int, float]]:
    """(x, value) of one curve as the tool holds it: x is the epoch or the global step."""
    if tool == "tensorboard":
        where = out / "tensorboard" / run_id / ("steps" if prefix == "step" else "")
        return tensorboard_scalars(where, f"{prefix}/{name}")
    if tool == "mlflow":
        client, runs = mlflow_runs(out)
        (run,) = [r for r in runs if r.info.run_name == run_id]
        return mlflow_points(client, run, f"{prefix}/{name}")
    x = {"epoch": "epoch", "step": "global_step"}[prefix]
    history = [r["history"]["item"] for r in wandb_records(out, run_id) if r["type"] == "history"]
    return [(h[x], float(h[f"{prefix}/{name}"])) for h in history if f"{prefix}/{name}" in h]  # "NaN" in JSON


def summary(tool: str, out: Path, run_id: str) -> dict:
    if tool == "tensorboard":
        return {loggers.base.FINAL: tensorboard_scalars(out / "tensorboard" / run_id,
                                                        f"summary/{loggers.base.FINAL}")[-1][1]}
    if tool == "mlflow":
        _, runs = mlflow_runs(out)
        (run,) = [r for r in runs if r.info.run_name == run_id]
        return {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith("summary/")}
    final = {}
    for r in wandb_records(out, run_id):
        if r["type"] == "summary":
            final.update(r["summary"].get("update") or {})
    return {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("summary/")}


def assert_matches_metrics(tool: str, out: Path, run_id: str, rows: list[dict]) -> None:
    """Every column of metrics.csv, every epoch once, equal to the tool's (TensorBoard keeps
    float32)."""
    for name in rows[0]:
        if name == "epoch":
            continue
        held = points(tool, out, run_id, "epoch", name)
        assert [x for x, _ in held] == [r["epoch"] for r in rows], (tool, name, held)
        for (_, value), row in zip(held, rows):
            assert value == pytest.approx(row[name], rel=1e-6, nan_ok=True), (tool, name)


# -- real training: normlab train, reproduce, torchrun -------------------------------------------
def normlab(*args: str, wait: bool = True, **env):
    command = [sys.executable, "-m", "normlab", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert "warning" not in err, err
    return out


def test_train_killed_and_resumed_matches_metrics_in_every_tool(tmp_path):
    """`normlab train --log tensorboard,mlflow,wandb`, killed (-9) after its first epoch, then the
    same command again: each tool holds every column of metrics.csv once per epoch, the loss
    every K steps once, the final number, and one run (found again on resume)."""
    tools = [t for t in loggers.TOOLS if importlib.util.find_spec(t)]
    if not tools:
        pytest.skip("none of tensorboard, mlflow, wandb is installed")
    data = write_cifar_fixture(tmp_path / "data", n_per_file=100)  # 500 training images: 50 steps
    out = tmp_path / "runs"
    args = ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "10", "--epochs", "4", "--data",
            "cifar10", "--data-dir", str(data), "--out", str(out), "--quiet", "--threads", "1",
            "--log", ",".join(tools), "--log-every", "7"]
    proc = normlab(*args, wait=False)
    metrics = lambda: next(out.glob(f"*/{rundir.METRICS}"), None)  # noqa: E731
    while proc.poll() is None and not (metrics() and rundir.read_metrics(metrics())):
        time.sleep(0.05)
    steps = lambda: sum(p.stat().st_size for p in out.glob("tensorboard/*/steps/events.*"))  # noqa: E731
    logged = steps()
    while proc.poll() is None and "tensorboard" in tools and steps() == logged:
        time.sleep(0.05)  # until a step past the first epoch's checkpoint is logged
    time.sleep(0.6)  # and W&B has written it to its file
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and len(rundir.read_metrics(metrics())) < 4
    normlab(*args)
    run_id = metrics().parent.name
    rows = rundir.read_metrics(metrics())
    cfg = RunConfig.from_dict(rundir.read_json(metrics().parent / rundir.CONFIG)["config"])
    final = rundir.read_json(metrics().parent / rundir.STATUS)["summary"][loggers.base.FINAL]
    assert len(rows) == 4
    for tool in tools:
        assert_matches_metrics(tool, out, run_id, rows)
        steps = points(tool, out, run_id, "step", "train_loss")
        assert [g for g, _ in steps] == list(range(7, 4 * 50 + 1, 7)), tool
        assert all(0 < loss < 10 for _, loss in steps), tool
        lrs = points(tool, out, run_id, "step", "lr")
        assert [lr for _, lr in lrs] == pytest.approx([cfg.lr_at((g - 1) / 50) for g, _ in lrs]), tool
        assert summary(tool, out, run_id)[loggers.base.FINAL] == pytest.approx(final), tool
    if "mlflow" in tools:
        _, runs = mlflow_runs(out)
        assert [(r.info.run_name, r.info.status) for r in runs] == [(run_id, "FINISHED")]
        assert runs[0].data.params["norm"] == "gn:4" and runs[0].data.tags["normlab.seed"] == "0"
    if "wandb" in tools:
        starts = [r["run"] for r in wandb_records(out, run_id) if r["type"] == "run"]
        assert len(starts) == 2 and {s["run_id"] for s in starts} == {f"{run_id}-{cfg_key(out, run_id)}"}


def test_reproduce_groups_a_study_and_logs_its_report(tmp_path):
    """`normlab reproduce --seeds 2 --log ...`: the two seeds train as one array, each logging as
    itself; one experiment for the study, its runs tagged and their seeds grouped; the report's
    figures as a `report` run, replaced (not duplicated) when the command runs again."""
    tools = [t for t in loggers.TOOLS if importlib.util.find_spec(t)]
    if not tools:
        pytest.skip("none of tensorboard, mlflow, wandb is installed")
    data = write_cifar_fixture(tmp_path / "data", n_per_file=40)  # 200 training images: 20 steps
    preset = tmp_path / "tiny.yaml"
    preset.write_text("name: tiny\nworkers: 1\nbase: {model: resnet8, data: cifar10, epochs: 2, batch_size: 10}\n"
                      "studies:\n  norms:\n    - {norm: ['gn:4']}\n")
    out = tmp_path / "results"
    args = ["reproduce", "--preset", str(preset), "--seeds", "2", "--fuse", "2", "--out", str(out), "--data-dir", str(data),
            "--quiet", "--threads", "1", "--log", ",".join(tools), "--log-every", "5"]
    normlab(*args)
    normlab(*args)  # finished: nothing trains, the report is written and logged again
    run_ids = sorted(p.parent.name for p in out.glob(f"*/{rundir.METRICS}"))
    assert len(run_ids) == 2 and rundir.read_json(out / run_ids[0] / rundir.CONFIG)["execution"]["array"]["runs"] == 2
    figures = sorted(figure_name(p) for p in (out / "figures").rglob("*.png"))
    assert figures and all(f.startswith("figures/tiny/") for f in figures)
    for tool in tools:
        losses = []
        for run_id in run_ids:
            assert_matches_metrics(tool, out, run_id, rundir.read_metrics(out / run_id / rundir.METRICS))
            losses.append(points(tool, out, run_id, "step", "train_loss"))
            assert [g for g, _ in losses[-1]] == [5, 10, 15, 20, 25, 30, 35, 40]
        assert losses[0] != losses[1]  # each run of the array its own loss, not the array's
    if "tensorboard" in tools:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        report = EventAccumulator(str(out / "tensorboard" / "report"), size_guidance={"images": 0})
        report.Reload()
        assert sorted(report.Tags()["images"]) == figures
        assert all(len(report.Images(f)) == 1 for f in figures)  # replaced, not added
    if "mlflow" in tools:
        client, runs = mlflow_runs(out)
        assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {"normlab-tiny"}
        by_name = {r.info.run_name: r for r in runs}
        assert sorted(by_name) == sorted(run_ids + ["report"])
        assert {by_name[r].data.tags["normlab.studies"] for r in run_ids} == {"norms"}
        assert len({by_name[r].data.tags["normlab.group"] for r in run_ids}) == 1  # the seeds' group
        assert {by_name[r].data.tags["normlab.seed"] for r in run_ids} == {"0", "1"}
        def listed(path):
            for a in client.list_artifacts(by_name["report"].info.run_id, path):
                yield from listed(a.path) if a.is_dir else [a.path]
        assert sorted(listed("figures")) == sorted([f"{f}.png" for f in figures] + ["figures/report.md"])
    if "wandb" in tools:
        for run_id in run_ids:
            (start,) = {json.dumps(r["run"].get("run_group")) for r in wandb_records(out, run_id) if r["type"] == "run"}
            assert json.loads(start) == run_ids[0].replace("-s0-", "-")[:-6] + json.loads(start)[-6:]
        report = [r["history"]["item"] for r in wandb_records(out, "report") if r["type"] == "history"]
        assert len(report) == 2  # once per report written
        assert all(any(k.startswith(f"{f}.") for k in report[0]) for f in figures), report[0]


def test_under_torchrun_only_rank_0_logs(tmp_path):
    needs("tensorboard")
    data = write_cifar_fixture(tmp_path / "data", n_per_file=8)  # 40 images: 2 steps of 2 x 10
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "normlab", "train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "10",
               "--epochs", "2", "--data", "cifar10", "--data-dir", str(data), "--out", str(out), "--quiet",
               "--threads", "1", "--log-to", "tensorboard", "--log-every", "1"]  # torchrun takes --log
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p.parent for p in out.glob(f"*/{rundir.METRICS}")]
    assert rundir.read_json(run_dir / rundir.CONFIG)["execution"]["how"] == "processes (torchrun)"
    board = out / "tensorboard" / run_dir.name
    assert len(list(board.glob("events.*"))) == 1 and len(list((board / "steps").glob("events.*"))) == 1
    assert_matches_metrics("tensorboard", out, run_dir.name, rundir.read_metrics(run_dir / rundir.METRICS))
    assert [g for g, _ in points("tensorboard", out, run_dir.name, "step", "train_loss")] == [1, 2, 3, 4]


def test_the_logging_options_travel_to_cluster_nodes(tmp_path, monkeypatch):
    """Ray and SLURM get the runtime options pickled: --log goes with them, its paths absolute
    and MLflow's store settled where the command started."""
    import pickle

    from normlab.backends.base import options_for_nodes
    from normlab.config import RuntimeOptions

    monkeypatch.chdir(tmp_path)
    log = loggers.options([], 7, "results", "quick")
    assert log.root == str(tmp_path / "results") and log.mlflow_uri == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    node = pickle.loads(pickle.dumps(options_for_nodes(RuntimeOptions(log=log), threads=2, gpus=0)))
    assert node.log == log


def cfg_key(out: Path, run_id: str) -> str:
    return rundir.read_json(out / run_id / loggers.KEY_FILE)["key"]


# -- never in the way ---------------------------------------------------------------------------
ROW = {"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_error": 50.0, "test_loss": 2.1, "test_error": 60.0}


def a_run(tmp_path):
    cfg = RunConfig(model="resnet8", norm="gn:4").to_dict()
    run_dir = tmp_path / RunConfig.from_dict(cfg).run_id()
    run_dir.mkdir(parents=True)
    return cfg, run_dir


def test_a_missing_library_is_one_warning_and_no_logger(monkeypatch, tmp_path, capsys):
    for module in ("torch.utils.tensorboard", "mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    log = loggers.options(list(loggers.TOOLS), 10, tmp_path, "x")
    assert log.tools == ()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    for tool, line in zip(loggers.TOOLS, lines):
        assert line.startswith(f"normlab: warning: --log {tool}:") and f"pip install 'normlab[{tool}]'" in line


def test_a_failing_logger_is_one_warning_and_the_others_go_on(monkeypatch, tmp_path, capsys):
    needs("tensorboard")

    class DiskFull(loggers.base.Logger):
        name = "full"

        def log_step(self, step, values):
            raise OSError(28, "No space left on device")

    monkeypatch.setitem(loggers.LOGGERS, "full", DiskFull)
    cfg, run_dir = a_run(tmp_path)
    log = loggers.Loggers(loggers.LogOptions(("full", "tensorboard"), 1, str(tmp_path)), cfg, run_dir)
    log.start(0, [])
    for step in (1, 2, 3):
        log.step(step, {"train_loss": float(step)})
    log.epoch(1, ROW)
    log.finish("done", [ROW])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "full logging of resnet8-gn4" in err[0] and "No space left" in err[0], err
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard" / run_dir.name / "steps",
                                              "step/train_loss")] == [1, 2, 3]


def test_a_logger_that_cannot_start_is_one_warning(tmp_path, capsys):
    needs("tensorboard")
    cfg, run_dir = a_run(tmp_path)
    (tmp_path / "tensorboard").write_text("a file where TensorBoard's directory would go")
    log = loggers.Loggers(loggers.LogOptions(("tensorboard",), 1, str(tmp_path)), cfg, run_dir)
    log.start(0, [])
    assert not log and not log.due(1)
    log.step(1, {"train_loss": 1.0})
    log.finish("done", [ROW])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("normlab: warning: tensorboard logging of resnet8-gn4"), err


def test_an_mlflow_server_that_does_not_answer_is_one_warning(monkeypatch, tmp_path, capsys):
    needs("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    assert loggers.options(["mlflow"], 10, tmp_path, "x").tools == ()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("normlab: warning: --log mlflow:") and "127.0.0.1:9" in err[0]


def test_wandb_without_login_or_server_logs_offline(monkeypatch, tmp_path):
    """No login: offline, quietly. A login but no server: offline, one warning (W&B alone
    would wait 90 s in every run). Each in a fresh process, as W&B reads its settings once."""
    needs("wandb")
    monkeypatch.delenv("WANDB_MODE")
    script = ("import sys; from normlab import loggers; "
              "print(loggers.options(['wandb'], 10, sys.argv[1], 'x').wandb_mode)")
    no_login = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                              timeout=120)
    assert no_login.stdout.split() == ["offline"] and "warning" not in no_login.stderr, no_login.stderr
    monkeypatch.setenv("WANDB_API_KEY", "a" * 86)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    no_server = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                               timeout=120)
    assert no_server.stdout.split() == ["offline"], no_server.stderr
    assert no_server.stderr.count("normlab: warning: --log wandb: the W&B server does not answer") == 1


def test_a_wandb_check_that_hangs_is_cut_off(monkeypatch, tmp_path, capsys):
    """W&B's login, or its teardown after a failed one, can hang: the check's child process (and
    any process it started) is killed after CHECK_S, and the runs log offline."""
    needs("wandb")
    from normlab.loggers import wandb as wandb_logger
    monkeypatch.delenv("WANDB_MODE")
    marker = tmp_path / "grandchild.pid"
    monkeypatch.setattr(wandb_logger, "CHECK_S", 2)
    monkeypatch.setattr(wandb_logger, "LOGIN", (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(600)"))
    assert loggers.options(["wandb"], 10, tmp_path, "x").wandb_mode == "offline"
    err = capsys.readouterr().err
    assert err.count("the W&B server does not answer (no answer in 2 s)") == 1, err
    grandchild = int(marker.read_text())
    stat = Path(f"/proc/{grandchild}/stat")  # W&B's service would be such a grandchild
    for _ in range(50):
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break  # gone, or dead and not yet reaped
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the check's grandchild outlived it")

