import pickle

import numpy as np
import pytest
import torch

from normlab.data import Normalizer, SAMPLE_FILE, augment, load_dataset
from normlab.errors import NormlabError


def test_loads_cifar_format_fixture(cifar_fixture):
    data = load_dataset("cifar10", cifar_fixture)
    assert data.train.images.shape == (100, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (20, 3, 32, 32) and data.num_classes == 10
    # the same bytes as in the file: 1024 red, then green, then blue, row-major
    with open(cifar_fixture / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(data.train.images[0, 1].flatten(), torch.from_numpy(raw[0, 1024:2048]))
    # a directory that is the batches folder itself works too
    assert len(load_dataset("cifar10", cifar_fixture / "cifar-10-batches-py").test) == 20


def test_val_split_is_held_out(cifar_fixture):
    data = load_dataset("cifar10", cifar_fixture, val_split=30)
    assert len(data.val) == 30 and len(data.train) == 70
    with pytest.raises(NormlabError, match="val-split"):
        load_dataset("cifar10", cifar_fixture, val_split=100)


def corrupt(folder, name, value):
    with open(folder / "cifar-10-batches-py" / name, "wb") as f:
        if isinstance(value, bytes):
            f.write(value)
        else:
            pickle.dump(value, f)


@pytest.mark.parametrize("bad,match", [
    (b"\x80\x04\x95garbage", "corrupt or truncated"),
    ({b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5}, "shape"),
    ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 10]}, "labels outside"),
    ({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 4}, "4 labels for 5 images"),
    ({b"nothing": 1}, "corrupt or truncated"),
])
def test_corrupt_files_are_named(cifar_fixture, bad, match):
    corrupt(cifar_fixture, "data_batch_3", bad)
    with pytest.raises(NormlabError, match=match) as err:
        load_dataset("cifar10", cifar_fixture)
    assert "data_batch_3" in str(err.value)


def test_truncated_file(cifar_fixture):
    path = cifar_fixture / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(NormlabError, match="test_batch is corrupt or truncated"):
        load_dataset("cifar10", cifar_fixture)


def test_missing_data_says_where_to_put_it(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("not empty, so no download is tried")
    with pytest.raises(NormlabError, match="cifar-10-batches-py.*download"):
        load_dataset("cifar10", tmp_path / "other")


def test_offline_download_fails_cleanly(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(NormlabError, match="download failed.*by hand"):
        load_dataset("cifar10", tmp_path / "empty")
    assert not any((tmp_path / "empty").glob("*.part"))


def test_bundled_sample_is_balanced_real_cifar():
    assert SAMPLE_FILE.stat().st_size <= 12 * 2**20
    data = load_dataset("sample")
    assert len(data.train) == 4000 and len(data.test) == 1000
    assert data.train.labels.bincount().tolist() == [400] * 10
    assert data.test.labels.bincount().tolist() == [100] * 10


def test_sample_matches_shared_cifar(shared_cifar):
    full = load_dataset("cifar10", shared_cifar)
    sample = load_dataset("sample")
    # the sample's first training image of class 0 is the data set's first one
    first = int(torch.nonzero(full.train.labels == 0)[0])
    assert torch.equal(sample.train.images[sample.train.labels == 0][0], full.train.images[first])
    first_test = int(torch.nonzero(full.test.labels == 3)[0])
    assert torch.equal(sample.test.images[sample.test.labels == 3][0], full.test.images[first_test])


def test_shared_cifar_loads(shared_cifar):
    data = load_dataset("cifar10", shared_cifar)
    assert len(data.train) == 50000 and len(data.test) == 10000
    assert data.train.labels.bincount().tolist() == [5000] * 10
    assert [round(m, 4) for m in data.mean] == [0.4914, 0.4822, 0.4465]


def test_augment_crops_of_the_padded_image_and_flips():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        found = False
        for flip in (False, True):
            target = out[i].flip(-1) if flip else out[i]
            for oy in range(9):
                for ox in range(9):
                    if torch.equal(padded[i, :, oy:oy + 32, ox:ox + 32], target):
                        found, flips = True, flips + flip
                        break
                if found:
                    break
            if found:
                break
        assert found, f"image {i} is not a crop of its padded image, flipped or not"
    assert 10 < flips < 54  # about half are flipped


def test_augment_offsets_are_uniform():
    gen = torch.Generator().manual_seed(1)
    images = torch.zeros(9000, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 0, :] = 255  # a white top row: padded row 4 lands in output row 4 - offset
    column = augment(images, gen)[:, 0, :, 5]
    visible = column.amax(1) == 255  # offsets 0..4 keep the row in view (5 of 9)
    assert abs(visible.float().mean().item() - 5 / 9) < 0.03
    rows = column[visible].float().argmax(1)
    counts = torch.bincount(rows, minlength=5)
    assert counts.shape[0] == 5 and counts.min() > 850 and counts.max() < 1150  # 1000 each


def test_normalizer():
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu")
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(norm(x), torch.full((1, 3, 2, 2), 2.0))
