"""checkpoint.pt: written with its SHA-256, read back only as data, never as code, and checked
against the run before anything in it is used.

Results directories are shared (a colleague's half-finished study, a cluster's scratch space),
and a pickle can run code while it loads. So a checkpoint holds nothing but tensors and plain
Python values, is read with torch.load(weights_only=True), and must match the SHA-256 that
normlab recorded beside it (checkpoint.sha256, in `sha256sum` format) when it wrote it. Anyone
who can write the directory can also write a matching record, so `verify` then checks the
state against what the run expects (keys, types, shapes, dtypes, storage, ranges) before any
of it is used: a wrong one is refused with one line instead of crashing mid-run, or using
memory no real checkpoint needs. `--force` starts the run afresh, keeping the old one aside.

The record and the checkpoint are two files, so a crash between their writes must not make a
good checkpoint look bad: while a new checkpoint replaces the old one, the record lists both.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import rundir
from .errors import NormlabError

RECORD = "checkpoint.sha256"
FIX = "run again with --force to start this run afresh (the old one is kept aside)"


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
    rundir.hard_link(path, copy)


def drop_copy(copy: Path) -> None:
    """Forget a copy made by keep_copy."""
    rundir.remove(copy)
    _write_record(copy.with_name(RECORD), copy.name, [])


def load(path: Path, limit: int = 1 << 30) -> dict:
    """The state in path, if it is at most `limit` bytes, its SHA-256 is the recorded one and it
    holds data only (check it with `verify` before using it)."""
    path = Path(path)
    try:
        data = rundir.read_bytes(path, limit)
    except rundir.Unreadable as err:
        raise NormlabError(f"{err}; {FIX}") from None
    recorded = _recorded(path.with_name(RECORD), path.name)
    if not recorded:
        raise NormlabError(f"{path} has no SHA-256 record ({RECORD}): it was not written by this "
                           f"normlab (or by normlab 0.1), so it is not loaded; {FIX}")
    if hashlib.sha256(data).hexdigest() not in recorded:
        raise NormlabError(f"{path} does not match the SHA-256 recorded when it was written (it was "
                           f"changed or damaged since), so it is not loaded; {FIX}")
    _check_archive(path, data, limit)
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the safe unpickler refuses anything but data, with varied errors
        raise NormlabError(f"{path} holds objects other than tensors and plain values "
                           f"({type(err).__name__}), so it is not loaded; {FIX}") from None


def _check_archive(path: Path, data: bytes, limit: int) -> None:
    """torch.save writes a zip of uncompressed records: refuse compressed ones (a small file
    could then unpack to any size) and records that add up to more than the file."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        raise NormlabError(f"{path} holds objects other than tensors and plain values (it is not a "
                           f"torch.save archive), so it is not loaded; {FIX}") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or sum(e.file_size for e in entries) > limit:
        raise NormlabError(f"{path} holds compressed or oversized records, which torch.save never "
                           f"writes, so it is not loaded; {FIX}")


def _recorded(record: Path, name: str) -> list[str]:
    try:
        lines = rundir.read_text(record).splitlines()
    except (OSError, NormlabError):
        return []
    return [parts[0] for parts in (line.split() for line in lines)
            if len(parts) == 2 and parts[1] == name and len(parts[0]) == 64]


def _write_record(record: Path, name: str, digests: list[str]) -> None:
    """Record `digests` as the valid ones for `name`, keeping the lines of other files."""
    try:
        lines = rundir.read_text(record).splitlines()
    except (OSError, NormlabError):
        lines = []
    others = [line for line in lines if line.split()[1:] != [name] and line.strip()]
    ours = [f"{d}  {name}" for d in dict.fromkeys(digests)]
    rundir.atomic_write(record, "".join(f"{line}\n" for line in ours + others).encode())


# -- what a run expects of its checkpoint -------------------------------------------------------
@dataclass
class Expected:
    """What a checkpoint of one run must hold: `template` is the state_dict() of the run as
    built (epoch 0, no optimizer state), `params` the shapes of its parameters in the
    optimizer's order, then the run's epochs, steps per epoch, training images and the
    columns of a metrics row."""
    template: dict
    params: list[tuple[int, ...]]
    epochs: int
    steps: int
    images: int
    columns: tuple[str, ...]

    def max_bytes(self) -> int:
        """The largest checkpoint this run can write, with room to spare: every tensor of the
        template, a momentum buffer per parameter, the data order and the metrics rows."""
        tensors = sum(t.numel() * t.element_size() for t in _tensors(self.template))
        momentum = sum(math.prod(s) * 4 for s in self.params)
        return 2 * (tensors + momentum + 8 * self.images + 64 * len(self.columns) * self.epochs) + (8 << 20)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class Wrong(Exception):
    """What is wrong with a checkpoint (`verify` turns it into one NormlabError line)."""


def verify(path: Path, state, expected: Expected, run_id: str = "") -> dict:
    """The state if it has the structure `expected` describes (and, written by an array that
    held run `run_id`, lists it); otherwise one line naming the first problem. Nothing in the
    state is used before this passes."""
    try:
        optional = {}  # what a run writes only sometimes: the array it trained in, its probes
        if isinstance(state, dict) and "array" in state and "array" not in expected.template:
            optional["array"] = array = state.pop("array")
            if not isinstance(array, list) or len(array) > 1000 or run_id not in array \
                    or not all(isinstance(a, str) and len(a) < 200 for a in array):
                raise Wrong("its array of runs does not hold this run")
        if isinstance(state, dict) and "probes" in state and "probes" not in expected.template:
            optional["probes"] = _probes(state.pop("probes"), expected.epochs)
        _verify(state, expected)
        state.update(optional)
    except Wrong as err:
        raise NormlabError(f"{path} is not a checkpoint of this run ({err}), so it is not used; "
                           f"{FIX}") from None
    return state


def _verify(state, e: Expected) -> None:
    t = e.template
    if not isinstance(state, dict) or set(state) != set(t):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise Wrong(f"it holds {keys}, expected the keys {sorted(t)}")
    if state["config"] != t["config"]:
        raise Wrong("its config is another run's")
    _same_tensors(state["model"], t["model"], "model")
    _optimizer(state["optimizer"], t["optimizer"], e.params)
    epoch, step = state["epoch"], state["step"]
    _whole(epoch, "epoch", 0, e.epochs)
    _whole(step, "step", 0, e.steps - 1 if epoch < e.epochs else 0)
    order = state["order"]
    if order is None:
        if step:
            raise Wrong(f"it is at step {step} of an epoch but holds no data order")
    else:
        _tensor(order, (e.images,), torch.int64, "order")
        if not torch.equal(order.sort().values, torch.arange(e.images)):
            raise Wrong(f"its data order is not an order of the {e.images} training images")
    _tensor(state["sums"], (3,), torch.float64, "sums")
    _number(state["epoch_seconds"], "epoch_seconds", low=0)
    _rows(state["rows"], epoch, e.columns)
    for key in ("generator", "torch_rng"):
        _tensor(state[key], tuple(t[key].shape), t[key].dtype, key)
    _cuda_rng(state["cuda_rng"], t["cuda_rng"])
    _python_rng(state["python_rng"])
    _numpy_rng(state["numpy_rng"])


def _probes(packed, epochs: int) -> dict:
    """The probes' rows as probes.pack writes them: names, depths and index tensors that agree."""
    if not isinstance(packed, dict) or set(packed) != {"layers", "depths", "probes", "epoch", "key", "value"}:
        raise Wrong("its probes are not the probes' table")
    names = packed["layers"], packed["probes"]
    if not all(isinstance(n, list) and len(n) <= 10_000 and all(isinstance(x, str) and len(x) <= 200 for x in n)
               for n in names) or not isinstance(packed["depths"], list) \
            or not all(type(d) is int and -1 <= d < 10_000 for d in packed["depths"]) \
            or not len(names[0]) == len(names[1]) == len(packed["depths"]):
        raise Wrong("its probes' names are not lists of text of one length")
    rows = packed["epoch"].shape[0] if type(packed["epoch"]) is torch.Tensor else -1
    if not 0 <= rows <= 10_000 * (epochs + 1):
        raise Wrong("its probes hold too many rows")
    _tensor(packed["epoch"], (rows,), torch.int64, "probes' epochs")
    _tensor(packed["key"], (rows,), torch.int64, "probes' keys")
    _tensor(packed["value"], (rows,), torch.float64, "probes' values")
    if rows and not (0 <= int(packed["epoch"].min()) and int(packed["epoch"].max()) <= epochs
                     and 0 <= int(packed["key"].min()) and int(packed["key"].max()) < len(names[0])):
        raise Wrong("its probes' epochs or keys are out of range")
    return packed


def _tensor(value, shape: tuple, dtype: torch.dtype, what: str) -> None:
    """A plain, dense CPU tensor of this shape and dtype, whose storage holds exactly it (no
    view of a tiny storage expanded to many elements)."""
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise Wrong(f"{what} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise Wrong(f"{what} is {value.dtype} of shape {tuple(value.shape)}, expected {dtype} of "
                    f"shape {tuple(shape)}")
    if value.layout != torch.strided or value.device.type != "cpu" or value.requires_grad:
        raise Wrong(f"{what} is not a plain tensor")
    # as many elements as its storage holds, and within it: never a view of a small storage
    # expanded to many elements (any memory format: channels_last, a chunk of an array's state)
    storage = value.untyped_storage().nbytes()
    extent = value.storage_offset() + sum((n - 1) * s for n, s in zip(value.shape, value.stride())) + 1
    if value.numel() and storage < max(value.numel(), extent) * value.element_size():
        raise Wrong(f"{what} is not a dense tensor over its own storage")


def _same_tensors(state, template: dict, what: str) -> None:
    if not isinstance(state, dict) or list(state) != list(template):
        raise Wrong(f"{what} does not hold this model's tensors")
    for name, ref in template.items():
        _tensor(state[name], tuple(ref.shape), ref.dtype, f"{what} tensor {name}")


def _optimizer(state, template: dict, params: list[tuple[int, ...]]) -> None:
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise Wrong("optimizer is not an SGD state")
    groups, ref_groups = state["param_groups"], template["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(ref_groups):
        raise Wrong("optimizer has other parameter groups")
    for group, ref in zip(groups, ref_groups):  # keys another torch version lacks may be missing
        if not isinstance(group, dict) or not set(group) <= set(ref) or "params" not in group:
            raise Wrong("optimizer has other parameter groups")
        for key, value in group.items():
            if key == "lr":
                _number(value, "optimizer lr", low=0)
            elif value != ref[key] or type(value) is not type(ref[key]):
                raise Wrong(f"optimizer's {key} differs from this run's")
    buffers = state["state"]
    if not isinstance(buffers, dict) or not all(type(k) is int and 0 <= k < len(params) for k in buffers):
        raise Wrong("optimizer state is not one entry per parameter")
    for index, entry in buffers.items():
        if not isinstance(entry, dict) or set(entry) != {"momentum_buffer"}:
            raise Wrong(f"optimizer state of parameter {index} is not a momentum buffer")
        if entry["momentum_buffer"] is not None:
            _tensor(entry["momentum_buffer"], params[index], torch.float32, f"momentum of parameter {index}")


def _whole(value, what: str, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise Wrong(f"{what} is {value!r}, expected a whole number from {low} to {high}")


def _number(value, what: str, low: float | None = None) -> None:
    if type(value) not in (int, float) or not math.isfinite(value) or (low is not None and value < low):
        raise Wrong(f"{what} is {value!r}, expected a finite number" + (f" >= {low}" if low is not None else ""))


NAN_COLUMNS = ("images_per_s", "test_loss", "test_error")


def _rows(rows, epoch: int, columns: tuple[str, ...]) -> None:
    if not isinstance(rows, list) or len(rows) != epoch:
        raise Wrong(f"it holds {len(rows) if isinstance(rows, list) else 'no'} metrics rows for {epoch} epochs")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or tuple(row) != columns or row["epoch"] != i:
            raise Wrong(f"metrics row {i} is not this run's")
        for key, value in row.items():
            # NaN only where a run writes it: a rate not measured, a test set kept for later
            if type(value) not in (int, float) or (math.isnan(value) and key not in NAN_COLUMNS):
                raise Wrong(f"metrics row {i} has {key} = {value!r}")


def _cuda_rng(value, template) -> None:
    if value is None:
        return
    if not isinstance(value, list) or len(value) > 64:
        raise Wrong("cuda_rng is not a list of generator states")
    for i, item in enumerate(value):
        ref = template[i] if isinstance(template, list) and i < len(template) else None
        shape = tuple(ref.shape) if ref is not None else tuple(getattr(item, "shape", ()))
        if not shape or math.prod(shape) > 1 << 20:
            raise Wrong(f"cuda_rng {i} is not a generator state")
        _tensor(item, shape, torch.uint8, f"cuda_rng {i}")


def _python_rng(value) -> None:
    if not (isinstance(value, tuple) and len(value) == 3 and value[0] == 3 and isinstance(value[1], tuple)
            and len(value[1]) == 625 and all(type(v) is int and 0 <= v < 2**32 for v in value[1])
            and value[1][-1] <= 624 and (value[2] is None or type(value[2]) is float)):
        raise Wrong("python_rng is not a state of Python's random module")


def _numpy_rng(value) -> None:
    if not isinstance(value, dict) or set(value) != {"kind", "keys", "pos", "has_gauss", "gauss"}:
        raise Wrong("numpy_rng is not a state of numpy's random module")
    if value["kind"] != "MT19937":
        raise Wrong("numpy_rng is not an MT19937 state")
    _tensor(value["keys"], (624,), torch.int64, "numpy_rng keys")
    if not bool(((value["keys"] >= 0) & (value["keys"] < 2**32)).all()):
        raise Wrong("numpy_rng keys are out of range")
    _whole(value["pos"], "numpy_rng pos", 0, 624)
    _whole(value["has_gauss"], "numpy_rng has_gauss", 0, 1)
    _number(value["gauss"], "numpy_rng gauss")


# -- RNG states as plain values (numpy's holds an ndarray, which the safe loader refuses) --------
def numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_numpy_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["gauss"]))
