import subprocess
import sys

import pytest

from normlab.cli import main

from conftest import interrupted, stop_after_epoch


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(list(args)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_train_end_to_end_and_help(capsys, cifar_fixture, tmp_path):
    code, stdout, _ = run_cli(capsys, "train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "20",
                              "--epochs", "2", "--data", "cifar10", "--data-dir", str(cifar_fixture),
                              "--out", str(tmp_path / "runs"), "--quiet")
    assert code == 0 and "done" in stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("resnet8-gn4-b20-s0-")
    assert (run / "metrics.csv").read_text().count("\n") == 3
    code, stdout, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "--virtual-gpus" in stdout and "default" in stdout


def test_train_says_when_it_resumes(capsys, cifar_fixture, tmp_path):
    from normlab.config import RunConfig, RuntimeOptions
    from normlab.train import train

    cfg = RunConfig(model="resnet8", norm="gn:4", batch_size=20, epochs=2, data="cifar10")
    out = tmp_path / "runs"
    interrupted(train, cfg, out / cfg.run_id(), RuntimeOptions(data_dir=str(cifar_fixture), progress=False),
                on_epoch=stop_after_epoch(1))
    args = ["train", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "20", "--epochs", "2",
            "--data", "cifar10", "--data-dir", str(cifar_fixture), "--out", str(out), "--quiet"]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and f"{out / cfg.run_id()}: resuming from epoch 2 of 2 (1 finished)" in stdout
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and "already done: nothing to train" in stdout and "resuming" not in stdout


def test_each_preset_has_its_own_default_out(capsys):
    for preset in ("quick", "zoo-quick"):
        code, stdout, _ = run_cli(capsys, "reproduce", "--preset", preset, "--dry-run")
        assert code == 0 and f"runs into results/{preset}/" in stdout.splitlines()[0]


def test_module_entry_point_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "normlab", "train", "--norm", "gn:7", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("normlab: error:") and "Traceback" not in result.stderr


def test_output_into_a_closed_pipe_ends_quietly():
    # `normlab reproduce --dry-run | head`: the reader is gone before normlab writes
    proc = subprocess.Popen([sys.executable, "-m", "normlab", "reproduce", "--preset", "paper", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_output_that_is_not_a_terminal_has_no_progress_bar_but_a_line_per_run(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: p\nworkers: 1\nbase: {model: resnet8, epochs: 1, batch_size: 500}\n"
                      "studies:\n  norms:\n    - {norm: [bn, 'gn:4']}\n")
    result = subprocess.run([sys.executable, "-m", "normlab", "reproduce", "--preset", str(preset), "--out",
                             str(tmp_path / "out"), "--threads", "1"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "img/s" not in result.stderr and "it/s" not in result.stderr
    finished = [line for line in result.stdout.splitlines() if ": done, test error" in line]
    assert len(finished) == 2
