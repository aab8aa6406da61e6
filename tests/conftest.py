import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="the device that tests taking the `device` "
                     "fixture run on: cpu (default), cuda or cuda:K; `pytest -m gpu --device cuda` "
                     "is the GPU subset (scripts/gpu-check.sh)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: the subset run on CUDA by scripts/gpu-check.sh "
                            "(pytest -m gpu --device cuda); each takes the `device` fixture")
    if config.getoption("--device").startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of --device. On CUDA, TF32 is off, so that float32 means float32 in the
    comparisons (cuDNN's convolutions use TF32 by default)."""
    name = request.config.getoption("--device")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name}: use cpu, cuda or cuda:K") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {name}, but CUDA is not available here")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return chosen


@pytest.fixture
def exact(device):
    """The device, with deterministic algorithms for the test (on CUDA, bit-identical results
    need them), restored afterwards."""
    from normlab.train.build import set_deterministic

    set_deterministic(device.type == "cuda")
    yield device
    set_deterministic(False)


@pytest.fixture
def shared_cifar():
    if not (SHARED_CIFAR / "cifar-10-batches-py" / "test_batch").exists():
        pytest.skip(f"the shared CIFAR-10 is not at {SHARED_CIFAR}")
    return SHARED_CIFAR


def write_cifar_fixture(root: Path, n_per_file: int = 20, seed: int = 0) -> Path:
    """A tiny data set in the official CIFAR-10 python layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n_per_file)],
                 b"batch_label": name.encode(), b"filenames": [b"x.png"] * n_per_file}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture
def cifar_fixture(tmp_path):
    return write_cifar_fixture(tmp_path / "data")


TINY_STUDY = ("name: tiny\nworkers: 1\nbase: {model: resnet8, data: cifar10, epochs: 3, batch_size: 10}\n"
              "studies:\n  norms:\n    - {norm: [bn, 'gn:4', ln]}\n")


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """A three-run study (ResNet-8, 3 epochs, 1,000 images) trained by the local runner, one
    thread per run: what the cluster backends must reproduce. Returns (preset, data dir, results).
    Its runs must last long enough for the tests to catch them mid-run on a fast CPU."""
    from normlab.config import RuntimeOptions
    from normlab.study import expand, run_study

    root = tmp_path_factory.mktemp("tiny")
    data = write_cifar_fixture(root / "data", n_per_file=200)
    preset = root / "tiny.yaml"
    preset.write_text(TINY_STUDY)
    results = run_study(expand(str(preset)), root / "local", RuntimeOptions(data_dir=str(data), threads=1,
                                                                          progress=False))
    assert all(r["state"] == "done" for r in results.values())
    return preset, data, root / "local"


TIMING = ("seconds", "images_per_s")  # metrics.csv's columns that differ between equal runs


def strip(rows: list[dict], drop=TIMING) -> list[dict]:
    """Metrics rows without the `drop` columns (by default the timing ones), to compare runs."""
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def stop_after_epoch(n: int):
    """An on_epoch hook that stops training (normlab's STOP) once epoch n is finished."""
    from normlab.train import STOP

    def on_epoch(trainer, member, row):
        if row["epoch"] == n:
            STOP.set()
    return on_epoch


def interrupted(train_fn, *args, **kwargs):
    """train_fn(*args, **kwargs), whose hook sets STOP, must stop with Interrupted; STOP is
    cleared afterwards, whatever happened, so that the next training in the process runs."""
    from normlab.train import STOP, Interrupted

    try:
        with pytest.raises(Interrupted):
            train_fn(*args, **kwargs)
    finally:
        STOP.clear()


def same_metrics(out: Path, reference: Path) -> None:
    """Every run of `reference` is done in `out` with the same metrics, timing columns aside."""
    from normlab import rundir

    runs = sorted(p.name for p in reference.iterdir() if (p / rundir.CONFIG).exists())
    assert runs
    for name in runs:
        assert rundir.read_json(out / name / rundir.STATUS)["state"] == "done", name
        assert strip(rundir.read_metrics(out / name / rundir.METRICS)) == \
            strip(rundir.read_metrics(reference / name / rundir.METRICS)), name
