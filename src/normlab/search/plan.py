"""What a group search trains: its settings, rungs, trial order and cost, checked before anything
is written.

Successive halving over epochs: every candidate trains with seed 0 and reports its validation
error after each epoch; at each rung (min_epochs · η^k epochs, before the last epoch) only the
best 1/η of those that reached it go on. Seed 0 also selects the finalists (the best of those
that reach the last epoch) and the winner among them and the baselines (G = 16, LN, IN). The
finalists and the baselines are then trained with the final seeds 1..S, which took no part in
pruning or selection and alone decide the final ranking and the margins.
"""
from __future__ import annotations

import dataclasses
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, RuntimeOptions
from ..errors import NormlabError
from .candidates import Candidate, baselines

DEFAULT_VAL_SPLIT = {"sample": 1000, "cifar10": 5000, "cifar100": 5000}
# --quick: the bundled sample, sized to finish within 10 minutes on a 2-core CPU (see README).
QUICK = {"model": "resnet8", "epochs": 2, "seeds": 2, "workers": 2, "schedule": "cosine"}
# Chosen per run by the search, or set by an option of their own rather than by --set.
NOT_SETTABLE = {"norm": "--candidates", "seed": "--seeds", "model": "--model",
                "batch_size": "--batch-size", "data": "--data", "epochs": "--epochs",
                "val_split": "--val-split"}


@dataclass(frozen=True)
class SearchSpec:
    base: RunConfig                      # shared by every run; norm and seed are set per run
    candidates: tuple[Candidate, ...]
    seeds: int                           # final seeds (1..seeds), besides seed 0 which selects
    min_epochs: int                      # the first rung
    reduction_factor: int                # η: keep the best 1/η at each rung

    @property
    def epochs(self) -> int:
        return self.base.epochs

    def rungs(self) -> list[int]:
        """Epochs at which the halving decides: min_epochs · η^k, before the last epoch."""
        out, epoch = [], self.min_epochs
        while epoch < self.epochs:
            out.append(epoch)
            epoch *= self.reduction_factor
        return out

    def finalist_count(self) -> int:
        """How many reach the last epoch in synchronous halving: N / η^rungs, at least 1."""
        return max(1, len(self.candidates) // self.reduction_factor ** len(self.rungs()))

    def final_seeds(self) -> range:
        """The seeds that rank the finalists: never used for pruning or selection."""
        return range(1, self.seeds + 1)

    def baselines(self) -> list[Candidate]:
        return baselines(list(self.candidates))

    def config(self, norm: str, seed: int) -> RunConfig:
        return dataclasses.replace(self.base, norm=norm, seed=seed).normalized().validate()

    def queue(self) -> list[tuple[str, int]]:
        """The trials known from the start, in the order they are taken: the baselines first
        (so that later candidates meet competitors at every rung), the others in a fixed shuffled
        order (asynchronous halving favours early trials; no grouping should be favoured), then
        the baselines' final seeds. Finalists' final seeds are queued once the finalists are known."""
        first = self.baselines()
        rest = [c for c in self.candidates if c not in first]
        random.Random(0).shuffle(rest)
        return ([(c.spec, 0) for c in first + rest] +
                [(c.spec, s) for c in first for s in self.final_seeds()])

    def to_dict(self) -> dict:
        base = {k: v for k, v in self.base.to_dict().items() if k not in ("norm", "seed")}
        return {"base": base, "candidates": [c.spec for c in self.candidates], "seeds": self.seeds,
                "final_seeds": list(self.final_seeds()), "min_epochs": self.min_epochs,
                "reduction_factor": self.reduction_factor}


def make_spec(*, candidates: list[Candidate], seeds: int, min_epochs: int | None,
              reduction_factor: int, val_split: int | None, overrides: dict,
              **fields) -> SearchSpec:
    """Check the search's settings; NormlabError naming the fix for each bad one. `fields` are
    RunConfig fields (model, batch_size, data, epochs); `overrides` come from --set."""
    for key in overrides:
        if key in NOT_SETTABLE:
            raise NormlabError(f"--set {key}=... is not for search-groups; use {NOT_SETTABLE[key]}")
    data = fields.get("data", RunConfig.data)
    if val_split is None:
        val_split = DEFAULT_VAL_SPLIT.get(data, 0)
    if val_split == 0:
        raise NormlabError(f"search-groups selects on a held-out validation split, never on the test "
                           f"set: give --val-split M (e.g. {DEFAULT_VAL_SPLIT['sample']} for the sample, "
                           f"{DEFAULT_VAL_SPLIT['cifar10']} for cifar10), or leave it out for that default")
    if seeds < 2:
        raise NormlabError(f"--seeds must be 2 or more (the final ranking's intervals and the margins "
                           f"need two seeds per candidate besides the selecting seed 0), got {seeds}")
    if reduction_factor < 2:
        raise NormlabError(f"--reduction-factor must be 2 or more (each rung keeps the best 1/η), "
                           f"got {reduction_factor}")
    values = {**overrides, **fields, "val_split": val_split, "norm": candidates[0].spec}
    base = RunConfig.from_dict(values, where="--set").normalized().validate()
    if min_epochs is None:  # three halvings before the end when the budget allows
        min_epochs = max(1, base.epochs // reduction_factor ** 3)
    if min_epochs < 1:
        raise NormlabError(f"--min-epochs must be a positive whole number, got {min_epochs}")
    spec = SearchSpec(base, tuple(candidates), seeds, min_epochs, reduction_factor)
    if not spec.rungs():
        raise NormlabError(f"a budget of {base.epochs} epochs is too small for one rung: the first "
                           f"halving comes after --min-epochs {min_epochs} and must come before the "
                           f"last epoch; raise --epochs above {min_epochs} or lower --min-epochs")
    return spec


def probe(spec: SearchSpec, opts: RuntimeOptions) -> dict:
    """Load the data and build one run as training would (every data and size error shows here,
    before anything is written); returns the split sizes and the images trained per epoch."""
    from ..train import Trainer

    run = Trainer([spec.config(spec.candidates[0].spec, 0)], [Path("unused")], dataclasses.replace(opts, progress=False))
    return {"train": len(run.data.train), "val": len(run.data.val), "test": len(run.data.test),
            "images_per_epoch": run.steps * spec.base.images_per_step}


def estimated_run_epochs(spec: SearchSpec) -> int:
    """Run-epochs of the search if halving kept exactly the best 1/η of the non-baselines at
    each rung (at least one); asynchronous halving may promote a few more early trials."""
    first = spec.baselines()
    alive = len(spec.candidates) - len(first)
    total, done = len(first) * (1 + spec.seeds) * spec.epochs, 0
    for rung in spec.rungs():
        total += alive * (rung - done)
        done, alive = rung, max(1, alive // spec.reduction_factor)
    return total + alive * (spec.epochs - done) + alive * spec.seeds * spec.epochs


def describe(spec: SearchSpec, sizes: dict) -> str:
    """The plan and its cost, for --dry-run and the start of a search."""
    b = spec.base
    per_epoch = sizes["images_per_epoch"]
    grid = len(spec.candidates) * (spec.seeds + 1) * spec.epochs
    estimate = estimated_run_epochs(spec)
    rungs = ", ".join(str(r) for r in spec.rungs())
    lines = [
        f"search-groups: {b.model}, batch {b.batch_size}, {b.data} ({sizes['train']:,} training / "
        f"{sizes['val']:,} validation images; the {sizes['test']:,} test images only for the winner), "
        f"{spec.epochs} epochs, {b.schedule} schedule",
        f"{len(spec.candidates)} candidates (effective groups of the 16/32/64-channel stages): "
        + ", ".join(f"{c.spec}({'/'.join(map(str, c.groups))})" for c in spec.candidates),
        f"successive halving on the validation error of seed 0: rungs after epoch {rungs} keep the best "
        f"1/{spec.reduction_factor}; seed 0 selects the finalists and the winner; finalists and the baselines "
        f"({', '.join(c.spec for c in spec.baselines())}) train {spec.epochs} epochs with {spec.seeds} more "
        f"seeds ({', '.join(map(str, spec.final_seeds()))}), which alone rank them",
        f"cost: about {estimate} run-epochs = {estimate * per_epoch:,} training images "
        f"({100 * estimate / grid:.0f} % of the full grid of {len(spec.candidates)} candidates x "
        f"{spec.seeds + 1} seeds x {spec.epochs} epochs = {grid} run-epochs = {grid * per_epoch:,} images; "
        f"at most the full grid)",
    ]
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="  ", break_on_hyphens=False)
                     for line in lines)
