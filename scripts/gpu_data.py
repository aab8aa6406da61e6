"""The real-data subset that travels with scripts/gpu-check.sh to a GPU machine.

A GPU machine lent through the device tool receives at most 64 MiB of working tree and cannot
download, so the check's real-data study runs on a class-balanced subset of CIFAR-10 carried
in an ignored folder: by default 15,000 training images (the first 1,500 of each class in the
data batches' order) and 5,000 test images (the first 500 of each class), stored losslessly as
row differences in an xz-compressed npz (as the bundled sample is), about 44 MB.

    python scripts/gpu_data.py                      # gpu-data/cifar10-subset.npz.xz from ../shared
    python scripts/gpu_data.py --source DIR --train 15000 --test 5000 --out gpu-data
    python scripts/gpu_data.py --from-sample --train 500 --test 200 --out DIR   # tiny, for tests

It refuses to write a subset that would take what travels past 64 MiB (the tracked files plus
the subset). gpu_check.py unpacks it into the official python layout (unpack() below), which
`normlab ... --data cifar10 --data-dir DIR` reads.
"""
from __future__ import annotations

import argparse
import io
import lzma
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NAME = "cifar10-subset.npz.xz"
LIMIT = 64 * 2**20  # what the device tool carries per call
MARGIN = 4 * 2**20  # for files that other work adds to the tree before the call


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    index = [np.flatnonzero(labels == k)[:per_class] for k in range(10)]
    if min(len(i) for i in index) < per_class:
        raise SystemExit(f"the source has fewer than {per_class} images of some class")
    return np.sort(np.concatenate(index))


def read_source(source: str | None, from_sample: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's images [N, 3, 32, 32] uint8 and labels, from a python-layout CIFAR-10 or
    from normlab's bundled sample."""
    from normlab.data import SOURCES, find_folder, load_sample, read_split

    if from_sample:
        train, test = load_sample()
    else:
        cifar = SOURCES["cifar10"]
        folder = find_folder(cifar, source, download=False)
        train, test = read_split(folder, cifar.train_files, cifar), read_split(folder, cifar.test_files, cifar)
    return {"train": (train.images.numpy(), train.labels.numpy()), "test": (test.images.numpy(), test.labels.numpy())}


def make_subset(splits: dict, train: int, test: int) -> bytes:
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        if count % 10:
            raise SystemExit(f"--{split} {count}: give a multiple of 10 (the subset is class-balanced)")
        images, labels = splits[split]
        index = first_per_class(labels, count // 10)
        # Differences along each row: the same pixels, smaller once compressed (as the sample).
        arrays[f"{split}_images"] = np.diff(images[index], axis=-1, prepend=np.uint8(0)).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[index].astype(np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return lzma.compress(buffer.getvalue(), preset=9)


def tracked_bytes() -> int:
    """The size of the files git tracks here: what travels besides the subset."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file())


def unpack(archive: Path, dest: Path) -> Path:
    """Write the subset as the official python layout under dest/cifar-10-batches-py (five
    training batches and test_batch); returns dest, the --data-dir to give normlab."""
    arrays = np.load(io.BytesIO(lzma.decompress(archive.read_bytes())))
    folder = dest / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = np.cumsum(arrays["train_images"], axis=-1, dtype=np.uint8).reshape(-1, 3072)
    test = np.cumsum(arrays["test_images"], axis=-1, dtype=np.uint8).reshape(-1, 3072)
    parts = np.array_split(np.arange(len(train)), 5)
    files = [(f"data_batch_{i + 1}", train[p], arrays["train_labels"][p]) for i, p in enumerate(parts)]
    for name, data, labels in files + [("test_batch", test, arrays["test_labels"])]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in labels]}, f)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "cifar10"),
                   help="a CIFAR-10 python-layout directory (default: %(default)s)")
    p.add_argument("--from-sample", action="store_true", help="take the images from the bundled sample")
    p.add_argument("--train", type=int, default=15000, help="training images (default: %(default)s)")
    p.add_argument("--test", type=int, default=5000, help="test images (default: %(default)s)")
    p.add_argument("--out", default=str(ROOT / "gpu-data"), help="folder to write %s into "
                   "(default: %%(default)s, ignored by git)" % NAME)
    p.add_argument("--no-size-check", action="store_true", help="write it even if it would not travel")
    args = p.parse_args(argv)
    data = make_subset(read_source(args.source, args.from_sample), args.train, args.test)
    if not args.no_size_check:
        total = tracked_bytes() + len(data)
        if total > LIMIT - MARGIN:
            raise SystemExit(f"the subset ({len(data) / 2**20:.1f} MiB) and the tracked files would make "
                             f"{total / 2**20:.1f} MiB, over the {(LIMIT - MARGIN) / 2**20:.0f} MiB that can "
                             f"travel; use fewer images (--train, --test)")
    out = Path(args.out) / NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"wrote {out}: {args.train:,} training and {args.test:,} test images, {len(data) / 2**20:.1f} MiB"
          + ("" if args.no_size_check else f"; with the tracked files {total / 2**20:.1f} MiB of the "
             f"{LIMIT / 2**20:.0f} MiB that travel"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
