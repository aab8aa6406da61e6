"""CIFAR-10/100: loading from the python layout, download with checksum, the bundled sample,
and whole-batch augmentation on the training device.

Images stay uint8 [N, 3, 32, 32] on the device; a training batch is gathered, randomly
cropped from the 4-pixel zero-padded image and flipped with one indexing operation, then
normalized per channel. No per-sample Python, no loader processes.
"""
from __future__ import annotations

import functools
import hashlib
import io
import lzma
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import rundir
from .errors import NormlabError

SAMPLE_FILE = Path(__file__).parent / "assets" / "cifar10_sample.npz.xz"
DEFAULT_DATA_DIR = Path(os.environ.get("NORMLAB_DATA", Path.home() / ".cache" / "normlab" / "data"))


@dataclass(frozen=True)
class Source:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    archive_md5: str


SOURCES = {
    "cifar10": Source("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), "labels", 10,
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Source("cifar-100-python", ("train",), ("test",), "fine_labels", 100,
                       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85"),
}
DATA_CHOICES = ("sample", *SOURCES)
MAX_BATCH_BYTES = 256 * rundir.MiB  # the largest official batch file is 155 MiB (CIFAR-100 train)
SIZES = {"sample": (4000, 1000), "cifar10": (50000, 10000), "cifar100": (50000, 10000)}  # train, test


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    num_classes: int
    train: Split
    test: Split
    val: Split | None
    mean: tuple[float, float, float]  # per channel, of the training split, in [0, 1]
    std: tuple[float, float, float]
    location: str

    def to(self, device) -> "Dataset":
        val = self.val.to(device) if self.val is not None else None
        return Dataset(self.name, self.num_classes, self.train.to(device), self.test.to(device),
                       val, self.mean, self.std, self.location)


def load_dataset(name: str, data_dir: str | Path | None = None, val_split: int = 0,
                 download: bool = True) -> Dataset:
    """Load 'sample', 'cifar10' or 'cifar100'. val_split holds out that many training images
    (a fixed, class-mixed subset chosen with a fixed seed) as a validation set."""
    if name == "sample":
        train, test, num_classes, location = *load_sample(), 10, "bundled sample"
    elif name in SOURCES:
        source = SOURCES[name]
        folder = find_folder(source, data_dir, download)
        train = read_split(folder, source.train_files, source)
        test = read_split(folder, source.test_files, source)
        if not len(test):
            raise NormlabError(f"{folder / source.test_files[0]} holds no images; replace it with an intact "
                               f"copy (or delete {folder} to download the data set again)")
        num_classes, location = source.num_classes, str(folder.resolve())
    else:
        raise NormlabError(f"unknown data set '{name}'; use one of: {', '.join(DATA_CHOICES)}")
    val = None
    if val_split:
        if not 0 < val_split < len(train):
            raise NormlabError(f"--val-split {val_split} must be between 1 and {len(train) - 1} "
                               f"(the training set has {len(train)} images)")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
        val = Split(train.images[order[:val_split]], train.labels[order[:val_split]])
        keep = order[val_split:].sort().values
        train = Split(train.images[keep], train.labels[keep])
    pixels = train.images.double().div(255)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).tolist())
    return Dataset(name, num_classes, train, test, val, mean, std, location)


def load_sample() -> tuple[Split, Split]:
    """The bundled class-balanced sample of the real CIFAR-10 (see scripts/make_sample.py)."""
    arrays = _sample_arrays()
    return (Split(torch.tensor(arrays["train_images"]), torch.tensor(arrays["train_labels"]).long()),
            Split(torch.tensor(arrays["test_images"]), torch.tensor(arrays["test_labels"]).long()))


@functools.lru_cache(maxsize=1)
def _sample_arrays() -> dict[str, np.ndarray]:
    """The sample, decompressed once per process (lzma takes seconds; a process training many
    short runs, such as a search worker, would pay it for each). Read-only: callers copy."""
    arrays = np.load(io.BytesIO(lzma.decompress(SAMPLE_FILE.read_bytes())))
    out = {}
    for key in arrays.files:
        # Images are stored as differences along each row (compresses better); undo with a cumsum.
        value = np.cumsum(arrays[key], axis=-1, dtype=np.uint8) if key.endswith("images") else arrays[key]
        value.setflags(write=False)
        out[key] = value
    return out


def find_folder(source: Source, data_dir: str | Path | None, download: bool) -> Path:
    """The directory holding the batch files: DIR/<folder>, or DIR itself; downloads if absent."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
    for candidate in (root / source.folder, root):
        if (candidate / source.test_files[0]).exists():
            return candidate
    if root.exists() and root.is_file():
        raise NormlabError(f"--data-dir {root} is a file; pass the directory that holds "
                           f"{source.folder}/")
    if download and (not root.exists() or not any(root.iterdir())):
        fetch_archive(source, root)
        return root / source.folder
    raise NormlabError(f"no {source.folder}/ in {root}; download {source.url}, extract it there "
                       f"(or pass --data-dir pointing at the directory that holds "
                       f"{source.folder}/)")


def fetch_archive(source: Source, root: Path) -> None:
    """Download the official archive, check its MD5, extract it into root."""
    from tqdm import tqdm

    archive = root / Path(source.url).name
    partial = archive.with_suffix(".part")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)  # never through a link
        with urllib.request.urlopen(source.url, timeout=15) as response, open(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.md5()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {archive.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise NormlabError(f"{source.folder}/ is not in {root} and the download failed ({err}); "
                           f"download {source.url} by hand and extract it into {root}") from None
    if digest.hexdigest() != source.archive_md5:
        partial.unlink(missing_ok=True)
        raise NormlabError(f"checksum mismatch for the downloaded {archive.name} (MD5 "
                           f"{digest.hexdigest()}, expected {source.archive_md5}); the download is "
                           f"corrupt: run the command again, or download {source.url} by hand")
    partial.replace(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()


def read_split(folder: Path, files: tuple[str, ...], source: Source) -> Split:
    images, labels = [], []
    for name in files:
        x, y = read_batch_file(folder / name, source)
        images.append(x)
        labels.append(y)
    return Split(torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32),
                 torch.from_numpy(np.concatenate(labels)).long())


def read_batch_file(path: Path, source: Source) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch, checked for structure, shapes and label range (not for the official
    checksum: copies such as the shared one differ in file names yet hold the same images).
    Read with BatchUnpickler: nothing in the file can run code."""
    fix = f"replace {path} with an intact copy (or delete {path.parent} to download it again)"
    try:
        raw = rundir.read_bytes(path, MAX_BATCH_BYTES, follow=True)
    except FileNotFoundError:
        raise NormlabError(f"{path} is missing; {fix}") from None
    except NormlabError as err:
        raise NormlabError(f"{err}; {fix}") from None
    try:
        batch = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Forbidden as err:
        raise NormlabError(f"{path} is not a CIFAR batch: it asks to load {err}, which a CIFAR batch "
                           f"never holds, so it was not loaded (nothing in it ran); {fix}") from None
    except Exception as err:  # unpickling garbage can raise almost anything
        raise NormlabError(f"{path} is corrupt or truncated ({type(err).__name__}); {fix}") from None
    if not isinstance(batch, dict) or b"data" not in batch or source.label_key.encode() not in batch:
        raise NormlabError(f"{path} is corrupt or truncated (not a CIFAR batch: no {source.label_key} "
                           f"and data); {fix}")
    data, labels = batch[b"data"], batch[source.label_key.encode()]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", type(data).__name__)
        raise NormlabError(f"{path} holds images of shape {shape} and type {dtype}, "
                           f"expected (N, 3072) uint8; {fix}")
    if isinstance(labels, list) and all(type(v) is int for v in labels):
        labels = np.array(labels, dtype=np.int64) if all(-2**63 <= v < 2**63 for v in labels) else None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise NormlabError(f"{path} has labels that are not a list of whole numbers; {fix}")
    if labels.shape != (data.shape[0],):
        raise NormlabError(f"{path} has {labels.size} labels for {data.shape[0]} images; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= source.num_classes):
        raise NormlabError(f"{path} has labels outside 0..{source.num_classes - 1}; {fix}")
    return data, labels.astype(np.int64)


class Forbidden(Exception):
    """A pickle asked for something a CIFAR batch does not hold."""


def _reconstruct(subtype, shape, dtype):
    """numpy's ndarray reconstruction, as the official files call it: an empty array, filled
    by __setstate__ (which checks that the data fits the shape)."""
    if subtype is not np.ndarray or tuple(shape) != (0,) or dtype != b"b":
        raise Forbidden("an ndarray reconstruction with other arguments")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _dtype(name, align=False, copy=False):
    name = name.decode("latin1") if isinstance(name, bytes) else name
    if name not in ARRAY_TYPES or not isinstance(align, bool) or not isinstance(copy, bool):
        raise Forbidden(f"numpy.dtype({name!r})")
    return np.dtype(name)


def _frombuffer(buffer, dtype, shape, order):
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or order not in "CF":
        raise Forbidden("numpy's _frombuffer with other arguments")
    return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()


def _encode(text, encoding):
    if not isinstance(text, str) or encoding != "latin1":
        raise Forbidden("_codecs.encode with other arguments")
    return text.encode("latin1")


ARRAY_TYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")
# What the official batches (numpy.core) and copies re-pickled by newer numpy (numpy._core,
# protocol 2's bytes, protocol 5's buffers) name; nothing else is ever looked up.
ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
           ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
           ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype,
           ("numpy.core.numeric", "_frombuffer"): _frombuffer,
           ("numpy._core.numeric", "_frombuffer"): _frombuffer, ("_codecs", "encode"): _encode}


class BatchUnpickler(pickle.Unpickler):
    """The pickle format of a CIFAR batch and nothing else: dicts, lists, bytes, text, numbers
    and uint8/int arrays. Any other global (a function to call, a class to build) is refused
    before it is looked up, so no code in the file runs."""

    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise Forbidden(f"{module}.{name}")
        return found


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random pad-`pad` crop and horizontal flip of a uint8 batch [B, 3, H, W], on its device.

    Random numbers come from `generator` (CPU) for reproducibility.
    """
    offsets, flips = draw_augmentation(images.shape[0], generator, pad)
    return apply_augmentation(images, offsets, flips, pad)


def draw_augmentation(batch: int, generator: torch.Generator, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of a batch's augmentation: crop offsets [2, B] and flips [B], on the
    CPU. Drawn for a whole step, so that each rank of a data-parallel group can take its part."""
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator)
    flips = torch.randint(0, 2, (batch,), generator=generator).bool()
    return offsets, flips


def apply_augmentation(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
                       pad: int = 4) -> torch.Tensor:
    """Crop and flip with one gather: row index oy + i, column index ox + j (or ox + W-1-j when
    flipped) into the zero-padded batch."""
    b, c, h, w = images.shape
    device = images.device
    offsets, flips = offsets.to(device), flips.to(device)
    padded = F.pad(images, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = offsets[0, :, None] + ar_h
    cols = offsets[1, :, None] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)
    return padded[torch.arange(b, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class Normalizer:
    """uint8 images -> float, minus the per-channel mean, over the per-channel std."""

    def __init__(self, mean, std, device, dtype=torch.float32):
        self.scale = (1 / (255 * torch.tensor(std, dtype=dtype))).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean, dtype=dtype) / torch.tensor(std, dtype=dtype)).view(1, 3, 1, 1).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images.to(self.scale.dtype), self.scale)
