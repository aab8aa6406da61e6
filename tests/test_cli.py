import subprocess
import sys

import pytest

from normlab.cli import main


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(list(args)))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


BAD = [
    (["--model", "resnet21"], "unknown model"),
    (["--model", "vgg"], "unknown model"),
    (["--norm", "foo"], "unknown norm"),
    (["--norm", "gn:5"], "divides the 16 channels"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--batch-size", "-3"], "--batch-size must be a positive"),
    (["--epochs", "0"], "--epochs must be a positive"),
    (["--base-lr", "0"], "--base-lr must be a positive"),
    (["--base-lr", "-0.1"], "--base-lr must be a positive"),
    (["--virtual-gpus", "0"], "--virtual-gpus must be a positive"),
    (["--norm", "bn", "--batch-size", "1"], "BN cannot train on 1 image"),
    (["--batch-size", "x"], "invalid int value"),
    (["--data", "imagenet"], "invalid choice"),
    (["--data", "cifar10", "--data-dir", "/nonexistent/nowhere/cifar"], "download"),
    (["--schedule", "multistep"], "needs --milestones"),
    (["--batch-size", "5000"], "lower --batch-size"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(capsys, tmp_path, monkeypatch, args, message):
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    out = tmp_path / "runs"
    code, stdout, stderr = run_cli(capsys, "train", "--epochs", "1", *args, "--out", str(out))
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists() or not any(out.rglob("*.json"))


def test_corrupt_data_is_refused(capsys, cifar_fixture, tmp_path):
    (cifar_fixture / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    code, _, stderr = run_cli(capsys, "train", "--data", "cifar10", "--data-dir", str(cifar_fixture),
                              "--out", str(tmp_path / "o"))
    assert code == 2 and "data_batch_2 is corrupt or truncated" in stderr
    assert not (tmp_path / "o").exists()


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
