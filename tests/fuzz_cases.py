"""Hostile inputs for tests/test_fuzz.py, made by seeded random generation: mutations of real
run directories, checkpoints, data batches, presets and search journals.

Every mutation may plant a pickle whose execution would create the canary file, and links
whose targets lie in `outside/` (whose content the fuzz test checks afterwards). Each
generator takes a random.Random and returns bytes (or an instruction for a special file)."""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

INJECT = ["|", "\n## Owned\n", "<script>alert(1)</script>", "=HYPERLINK(\"http://x\")", "$\\frac{", "`",
          "\r", "\x1b[31m", "\u2028", "_hidden", "../../outside", "%s%n", "\x00", "💥" * 3]


class Planted:
    """Unpickling this object calls open(canary, 'w')."""

    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (builtins.open, (self.canary, "w"))


def weird_value(rng: random.Random, canary: str, depth: int = 0):
    """A value of any JSON/YAML/pickle-able type, often hostile."""
    kind = rng.randrange(16 if depth < 3 else 11)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**32, 2**63, -2**63 - 1, 10**40, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf"), rng.random() * 100])
    if kind == 4:
        return rng.choice(INJECT) * rng.randrange(1, 4)
    if kind == 5:
        return "x" * rng.choice([0, 1, 1000, 100_000])
    if kind == 6:
        return rng.choice(["done", "running", "failed", "diverged", "interrupted", "new", "busy"])
    if kind == 7:
        return rng.choice(["bn", "gn:4", "ln", "in", "gn:cpg=4", "frn", "foo", "gn:5", "gn:0", "gn:-1"])
    if kind == 8:
        return rng.choice(["resnet8", "resnet20", "resnet6000002", "resnet7", "vgg", ""])
    if kind == 9:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(1, 30)))
    if kind == 10:
        return rng.choice([[], {}, "", 0])
    if kind in (11, 12):
        return [weird_value(rng, canary, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 13:
        return {str(weird_value(rng, canary, depth + 1))[:20]: weird_value(rng, canary, depth + 1)
                for _ in range(rng.randrange(0, 5))}
    if kind == 14:
        n = rng.choice([100, 2000, 50_000])
        return json.loads("[" * n + "]" * n) if n < 900 else ["deep"]
    return rng.choice(["MT19937", "x", "1e999", "NaN", "-Infinity"])


def mutate_json(rng: random.Random, value, canary: str):
    """value (a JSON object) with one random change: a key dropped, a value replaced, a whole
    other shape, or text that is not JSON."""
    choice = rng.randrange(8)
    if choice == 0:
        return json.dumps(weird_value(rng, canary)).encode()
    if choice == 1:
        n = rng.choice([1000, 100_000])
        return ("[" * n + "]" * n).encode()
    if choice == 2:
        return b"{" + b'"a": 1' + b"9" * rng.choice([5000, 50_000]) + b"}"
    if choice == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    value = json.loads(json.dumps(value))
    paths = list(walk(value))
    if not paths:
        return json.dumps(weird_value(rng, canary)).encode()
    parent, key = rng.choice(paths)
    if choice == 4 and isinstance(parent, dict):
        parent.pop(key, None)
    else:
        parent[key] = weird_value(rng, canary)
    text = json.dumps(value, allow_nan=True)
    return text.encode() if rng.random() < 0.9 else text[: rng.randrange(len(text) + 1)].encode()


def walk(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield value, k
            yield from walk(v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield value, i
            yield from walk(v)


def mutate_csv(rng: random.Random, text: str, canary: str) -> bytes:
    lines = text.splitlines()
    choice = rng.randrange(7)
    if choice == 0 and len(lines) > 1:  # a cell
        i = rng.randrange(len(lines))
        cells = lines[i].split(",")
        cells[rng.randrange(len(cells))] = str(weird_value(rng, canary)).replace("\n", " ")[:1000]
        lines[i] = ",".join(cells)
    elif choice == 1:
        lines.append(",".join(["1"] * rng.randrange(0, 20)))
    elif choice == 2 and lines:
        del lines[rng.randrange(len(lines))]
    elif choice == 3 and lines:
        lines.insert(rng.randrange(len(lines)), lines[rng.randrange(len(lines))])
    elif choice == 4:
        lines = [rng.choice(INJECT) + ",".join(lines[:1])] + lines[1:]
    elif choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
    else:
        return ("\n".join(lines) + "\n").replace("\n", "\r\n" if rng.random() < 0.5 else "\n\n").encode()
    return ("\n".join(lines) + "\n").encode()


def mutate_state(rng: random.Random, state: dict, canary: str) -> dict:
    """A checkpoint state with one hostile change (normlab's own structure otherwise)."""
    state = dict(state)
    key = rng.choice(sorted(state))
    choice = rng.randrange(10)
    if choice == 0:
        state.pop(key)
    elif choice == 1:
        state[key] = weird_value(rng, canary)
    elif choice == 2:
        state["order"] = torch.zeros(1, dtype=torch.int64).expand(rng.choice([10**6, 10**9]))
        state["step"] = 1
    elif choice == 3:
        name = rng.choice(list(state["model"]))
        model = dict(state["model"])
        t = model[name]
        model[name] = rng.choice([t.double(), t.flatten(), torch.zeros(3), t.expand(2, *t.shape) if t.dim() < 5 else t,
                                  t.t() if t.dim() == 2 else t[..., :0], torch.zeros(1).expand(10**8)])
        state["model"] = model
    elif choice == 4:
        state["epoch"], state["step"] = rng.choice([(-1, 0), (10**6, 0), (0, 10**6), (0, -5), (1, 3), (True, 0)])
    elif choice == 5:
        state["rows"] = rng.choice([[], [{"epoch": 1}], [{"x": float("nan")}] * 3, "rows", [weird_value(rng, canary)]])
    elif choice == 6:
        state["python_rng"] = rng.choice([(3, tuple(range(625)), None), (2, (), None), "x", (3, (2**40,) * 625, None)])
    elif choice == 7:
        state["numpy_rng"] = {**state["numpy_rng"], rng.choice(["kind", "keys", "pos", "has_gauss", "gauss"]): weird_value(rng, canary)}
    elif choice == 8:
        opt = {"state": {rng.choice([0, 99, -1]): {"momentum_buffer": torch.zeros(rng.choice([1, 3, 10**6]))}},
               "param_groups": state["optimizer"]["param_groups"]}
        state["optimizer"] = rng.choice([opt, {"state": {}, "param_groups": []}, []])
    else:
        state["sums"] = rng.choice([torch.zeros(3), torch.zeros(3, dtype=torch.float64).expand(3), torch.zeros(10**6, dtype=torch.float64), 3])
    return state


def checkpoint_bytes(rng: random.Random, state: dict, canary: str) -> bytes:
    """A mutated checkpoint: torch.save of a mutated state, a planted pickle, or random bytes."""
    choice = rng.randrange(6)
    buffer = io.BytesIO()
    if choice == 0:
        torch.save({**state, "model": Planted(canary)}, buffer)
    elif choice == 1:
        pickle.dump(Planted(canary), buffer)
    elif choice == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 2000)))
    else:
        torch.save(mutate_state(rng, state, canary), buffer)
    data = buffer.getvalue()
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data))]
    return data


def batch_bytes(rng: random.Random, canary: str) -> bytes:
    """A CIFAR batch file: planted, of the wrong structure, or not a pickle at all."""
    n = rng.choice([0, 1, 5, 20])
    good = {b"data": np.zeros((n, 3072), np.uint8), b"labels": [0] * n}
    choice = rng.randrange(9)
    if choice == 0:
        value = {b"data": Planted(canary), b"labels": [0]}
    elif choice == 1:
        value = Planted(canary)
    elif choice == 2:
        value = {**good, b"data": rng.choice([np.zeros((n, 3072), np.float64), np.zeros((n, 3071), np.uint8),
                                                np.zeros((n, 3072), object), np.zeros(0), "data", [[1] * 3072] * n])}
    elif choice == 3:
        value = {**good, b"labels": rng.choice([[10] * n, [-1] * n, [True] * n, ["x"] * n, [2**70] * n,
                                                  np.zeros(n, np.float32), None, [0] * (n + 1)])}
    elif choice == 4:
        value = rng.choice([[], {}, "x", 1, {b"data": 1}])
    elif choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 500)))
    elif choice == 6:  # numpy's reconstruction asked for a huge array
        return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85c_codecs\nencode\n"
                b"X\x01\x00\x00\x00bX\x06\x00\x00\x00latin1\x86R\x87R.").replace(b"K\x00\x85", b"J\x00\xca\x9a;\x85")
    elif choice == 7:
        value = {b"data": np.zeros((n, 3072), np.uint8), b"labels": [0] * n, b"extra": rng.choice([os.system, print, len])}
    else:
        value = good
    try:
        data = pickle.dumps(value, protocol=rng.choice([2, 4, 5]))
    except (pickle.PicklingError, TypeError, AttributeError):
        data = pickle.dumps(good)
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]
    return data


KEYS = ["model", "norm", "batch_size", "virtual_gpus", "epochs", "base_lr", "seed", "val_split", "data",
        "milestones", "schedule", "precise_bn", "sync_bn", "colour", "brn_r_max", "warmup_epochs"]


def preset_text(rng: random.Random, canary: str) -> str:
    """A preset: mostly valid in form, with hostile values, sizes, aliases, tags and nesting."""
    choice = rng.randrange(10)
    if choice == 0:
        return "\n".join(["a: &a [bn, bn, bn, bn, bn, bn, bn, bn, bn, bn]"] +
                         [f"{k}: &{k} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]" for p, k in zip("abcdefg", "bcdefgh")]
                         + ["studies: {s: [{norm: *h}]}"])
    if choice == 1:
        return f"!!python/object/apply:os.system ['touch {canary}']\n"
    if choice == 2:
        return "studies: {s: [{" + ", ".join(f"{k}: {list(range(1, rng.randrange(2, 20)))}" for k in KEYS[2:8]) + "}]}\n"
    if choice == 3:
        n = rng.choice([50, 500, 5000])
        return "studies: " + "[" * n + "]" * n + "\n"
    if choice == 4:
        return "base: {epochs: " + "9" * rng.choice([20, 5000]) + "}\nstudies: {s: [{norm: [bn]}]}\n"
    if choice == 5:
        return "".join(chr(rng.randrange(0, 0x250)) for _ in range(rng.randrange(0, 200)))
    base = {k: weird_value(rng, canary) for k in rng.sample(KEYS, rng.randrange(0, 4))}
    grid = {k: [weird_value(rng, canary) for _ in range(rng.randrange(1, 4))] for k in rng.sample(KEYS, rng.randrange(1, 3))}
    preset = {"name": weird_value(rng, canary) if rng.random() < 0.3 else "fuzz",
              "seeds": rng.choice([1, 2, 0, -1, 10**9, "x", 1.5]) if rng.random() < 0.3 else 1,
              "base": {"model": "resnet8", "epochs": 1, **base},
              "studies": {rng.choice(["norms", "x\ny", "groups", "batch-size"]): [grid]}}
    if rng.random() < 0.2:
        preset[rng.choice(["workers", "description", "wokers"])] = weird_value(rng, canary)
    try:
        return json.dumps(preset, allow_nan=False)  # JSON is YAML
    except (ValueError, TypeError):
        return json.dumps({"studies": {"s": [{"norm": ["bn"]}]}})


def journal_lines(rng: random.Random, lines: list[str], canary: str) -> str:
    """A search journal with one hostile change."""
    lines = list(lines)
    choice = rng.randrange(6)
    i = rng.randrange(len(lines) + 1)
    if choice == 0:
        lines.insert(i, rng.choice(["{not json", "[]", "1", '"x"', "{}", '{"op_code": "x"}']))
    elif choice == 1 and lines:
        entry = json.loads(lines[rng.randrange(len(lines))])
        parent, key = rng.choice(list(walk(entry)))
        parent[key] = weird_value(rng, canary)
        lines.insert(i, json.dumps(entry))
    elif choice == 2:
        lines.insert(i, json.dumps({"op_code": rng.randrange(-2, 14), "worker_id": "w",
                                    **{k: weird_value(rng, canary) for k in ("study_id", "trial_id", "value", "key", "state")}}))
    elif choice == 3 and lines:
        del lines[rng.randrange(len(lines))]
    elif choice == 4 and lines:
        j = rng.randrange(len(lines))
        lines[j] = lines[j][: rng.randrange(len(lines[j]) + 1)]
    else:
        n = rng.choice([1000, 100_000])
        lines.insert(i, "[" * n + "]" * n)
    return "\n".join(lines) + "\n"


def special(rng: random.Random, path: Path, outside: Path) -> bool:
    """Put a link (to a file or directory in `outside`), a FIFO, a directory or a huge sparse
    file at path instead of a regular file. Returns False (did nothing) most of the time."""
    choice = rng.randrange(12)
    if choice > 5:
        return False
    if path.is_dir() and not path.is_symlink():
        return False
    path.unlink(missing_ok=True)
    if choice == 0:
        path.symlink_to(outside / "victim.txt")
    elif choice == 1:
        path.symlink_to(outside / "victim-dir", target_is_directory=True)
    elif choice == 2:
        path.symlink_to(outside / "dangling-target")
    elif choice == 3:
        os.mkfifo(path)
    elif choice == 4:
        path.mkdir()
    else:
        with open(path, "wb") as f:
            f.truncate(rng.choice([300 << 20, 2 << 30]))
    return True
