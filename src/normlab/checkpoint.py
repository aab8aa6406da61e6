"""checkpoint.pt: written with its SHA-256, read back only as data, never as code.

Results directories are shared (a colleague's half-finished study, a cluster's scratch space),
and a pickle can run code while it loads. So a checkpoint holds nothing but tensors and plain
Python values, is read with torch.load(weights_only=True), and must match the SHA-256 that
normlab recorded beside it (checkpoint.sha256, in `sha256sum` format) when it wrote it. Anything
else is refused with one line; `--force` starts the run afresh, keeping the old one aside.

The record and the checkpoint are two files, so a crash between their writes must not make a
good checkpoint look bad: while a new checkpoint replaces the old one, the record lists both.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from . import rundir
from .errors import NormlabError

RECORD = "checkpoint.sha256"


def save(path: Path, state: dict) -> None:
    """Write state (tensors and plain values only) to path, with its SHA-256 recorded."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    new = hashlib.sha256(data).hexdigest()
    staged = rundir.stage(path, data)
    record = path.with_name(RECORD)
    old = _recorded(record, path.name)
    _write_record(record, path.name, [new, *old])  # old or new file: both valid
    rundir.commit(staged, path)
    _write_record(record, path.name, [new])


def keep_copy(path: Path, copy: Path) -> None:
    """Keep the checkpoint in path also as `copy` (a hard link: no bytes copied), recorded, so
    that it can be loaded after path has been replaced."""
    record = path.with_name(RECORD)
    _write_record(record, copy.name, _recorded(record, path.name))
    try:
        copy.unlink(missing_ok=True)
        os.link(path, copy)
    except OSError as err:
        raise NormlabError(f"cannot write {copy} ({err.strerror}); choose a writable --out") from None


def drop_copy(copy: Path) -> None:
    """Forget a copy made by keep_copy."""
    copy.unlink(missing_ok=True)
    _write_record(copy.with_name(RECORD), copy.name, [])


def load(path: Path) -> dict:
    """The state in path, if its SHA-256 is the recorded one and it holds data only."""
    path = Path(path)
    fix = "run again with --force to start this run afresh (the old one is kept aside)"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise NormlabError(f"{path} cannot be read ({err.strerror}); {fix}") from None
    recorded = _recorded(path.with_name(RECORD), path.name)
    if not recorded:
        raise NormlabError(f"{path} has no SHA-256 record ({RECORD}): it was not written by this "
                           f"normlab (or by normlab 0.1), so it is not loaded; {fix}")
    if hashlib.sha256(data).hexdigest() not in recorded:
        raise NormlabError(f"{path} does not match the SHA-256 recorded when it was written (it was "
                           f"changed or damaged since), so it is not loaded; {fix}")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the safe unpickler refuses anything but data, with varied errors
        raise NormlabError(f"{path} holds objects other than tensors and plain values "
                           f"({type(err).__name__}), so it is not loaded; {fix}") from None


def _recorded(record: Path, name: str) -> list[str]:
    try:
        lines = record.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [parts[0] for parts in (line.split() for line in lines)
            if len(parts) == 2 and parts[1] == name and len(parts[0]) == 64]


def _write_record(record: Path, name: str, digests: list[str]) -> None:
    """Record `digests` as the valid ones for `name`, keeping the lines of other files."""
    try:
        lines = record.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    others = [line for line in lines if line.split()[1:] != [name] and line.strip()]
    ours = [f"{d}  {name}" for d in dict.fromkeys(digests)]
    rundir.atomic_write(record, "".join(f"{line}\n" for line in ours + others).encode())


# -- RNG states as plain values (numpy's holds an ndarray, which the safe loader refuses) --------
def numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_numpy_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["gauss"]))
