import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
