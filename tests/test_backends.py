"""The backends' shared pieces: options for other nodes, SLURM's formats, misplaced options."""
import pytest

from normlab.backends.base import options_for_nodes
from normlab.backends.slurm import _gpus, minutes
from normlab.cli import main
from normlab.config import RuntimeOptions


def test_options_for_other_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = RuntimeOptions(device="auto", data_dir="data", amp=True, checkpoint_minutes=5)
    remote = options_for_nodes(opts, threads=4, gpus=0.5)
    # a relative data directory means nothing on a node with another working directory
    assert remote.data_dir == str(tmp_path / "data") and remote.threads == 4 and remote.device == "auto"
    assert (remote.amp, remote.checkpoint_minutes, remote.progress) == (True, 5, False)
    assert options_for_nodes(opts, threads=4, gpus=0).device == "cpu"  # no GPU reserved: none used
    assert options_for_nodes(RuntimeOptions(threads=2), threads=4, gpus=0).threads == 2  # --threads wins
    monkeypatch.setenv("NORMLAB_DATA", "shared/cifar")  # workers do not see this process's environment
    assert options_for_nodes(RuntimeOptions(), threads=1, gpus=0).data_dir == str(tmp_path / "shared/cifar")


@pytest.mark.parametrize("text,expected", [
    ("90", 90), ("1:30", 2), ("04:00:00", 240), ("00:00:30", 1), ("1-00:00:00", 1440), ("2-12", 3600),
    ("1-02:30", 1590), ("infinite", None), ("UNLIMITED", None),
])
def test_slurm_time_formats(text, expected):
    assert minutes(text) == expected


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "-5", ""])
def test_slurm_time_formats_refused(text):
    with pytest.raises(ValueError):
        minutes(text)


@pytest.mark.parametrize("gres,count", [
    ("(null)", 0), ("gpu:4", 4), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2(S:0),gpu:v100:2(S:1)", 4),
    ("shard:8", 0), ("gpu:h100:8(S:0-1),shard:64", 8),
])
def test_gpus_of_a_node(gres, count):
    assert _gpus(gres) == count


@pytest.mark.parametrize("args,message", [
    (["--address", "auto"], "--address is for --backend ray, not local"),
    (["--partition", "gpu"], "--partition is for --backend slurm, not local"),
    (["--gpus-per-run", "1"], "--gpus-per-run is for --backend ray or slurm, not local"),
    (["--no-wait"], "--no-wait is for --backend slurm, not local"),
    (["--backend", "ray", "--no-wait"], "--no-wait is for --backend slurm, not ray"),
])
def test_options_of_another_backend(capsys, tmp_path, args, message):
    code = main(["reproduce", "--out", str(tmp_path / "o"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
