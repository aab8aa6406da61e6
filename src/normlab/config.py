"""The run config: everything that defines one training job, its id and its learning rate.

A run is fully described by a RunConfig (what is trained). How it is executed (device,
threads, speed options, where the data lives) is in RuntimeOptions and never changes a
run's identity or its results beyond floating-point noise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .data import DATA_CHOICES, SIZES
from .errors import NormlabError
from .models import check_norm_fits, parse_model
from .norms import RenormRamp, canonical_norm, label, parse_norm

if TYPE_CHECKING:
    from .loggers import LogOptions

SCHEDULES = ("step", "multistep", "cosine")
FAST_PATHS = ("off", "graph", "compile")  # --fast-path (train/fast.py)
WARMUP_SHAPES = ("linear", "constant")
MAX_EPOCHS = 10_000
MAX_RUNS = 10_000        # runs in one study (the paper's has 54): checked before expansion
MAX_SEEDS = 1_000        # seeds per point
SEED_RANGE = 2**32       # seeds are in [0, 2^32): numpy's generators take no more
MAX_MILESTONES = 100
MAX_INT = 2**63 - 1      # any whole-number setting: what a tensor index or a C long can hold
RAMP = RenormRamp()  # the paper's ramp, scaled to the run's length
# RunConfig fields added after normlab 0.1. Left out of a config's dict (and so of its run id
# and of the config check on resume) while at their defaults, so that every run of 0.1 keeps
# its id and its results directory resumes: declare new fields with later(default).
LATER = "added_after_0_1"


def later(default):
    """A RunConfig field added after 0.1 (see LATER)."""
    return dataclasses.field(default=default, metadata={LATER: True})


@dataclass(frozen=True)
class RunConfig:
    model: str = "resnet20"
    norm: str = "bn"
    batch_size: int = 32          # images normalized together on one (virtual) device
    virtual_gpus: int = 1         # devices simulated in one step: K*N images per step
    epochs: int = 100
    base_lr: float = 0.1          # lr = base_lr * batch_size / base_batch
    base_batch: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4
    wd_on_norm: bool = True       # decay gamma, beta and biases too (as the GN paper does)
    schedule: str = "step"        # step | multistep | cosine
    step_size: int = 30           # step: lr / 10 every step_size epochs
    milestones: tuple[int, ...] = ()  # multistep: lr / 10 at these epochs
    warmup_epochs: float = 0.0    # warm-up over this many epochs (or warmup_steps steps)
    warmup_factor: float = 0.1    # the warm-up starts at (linear) or stays at (constant) factor * lr
    data: str = "sample"
    val_split: int = 0
    shortcut: str = "A"
    zero_init_residual: bool = True
    seed: int = 0
    sync_bn: bool = later(False)  # BN statistics over all K*N images of a step, not per device
    # Batch Renorm's r_max / d_max ramp, in fractions of the run's total steps (norms/batch.py)
    brn_r_max: float = later(RAMP.r_max)
    brn_d_max: float = later(RAMP.d_max)
    brn_start: float = later(RAMP.start)   # r_max = 1, d_max = 0 (plain BN) until here
    brn_r_end: float = later(RAMP.r_end)   # r_max reaches brn_r_max here
    brn_d_end: float = later(RAMP.d_end)   # d_max reaches brn_d_max here
    precise_bn: int = later(0)             # PreciseBN: statistics over this many images (0: off)
    warmup_steps: int = later(0)           # a warm-up counted in steps instead of epochs
    warmup_shape: str = later("linear")    # linear: factor * lr rising to lr; constant: factor * lr,
    #                                        then lr (He et al.'s ResNet-110: 0.01 for 400 steps, then 0.1)

    @property
    def lr(self) -> float:
        """The paper's linear scaling rule with N the per-device batch."""
        return self.base_lr * self.batch_size / self.base_batch

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.virtual_gpus

    def normalized(self) -> "RunConfig":
        """Canonical spellings, so that equal runs get equal ids ('GN:1' -> 'ln')."""
        return dataclasses.replace(self, model=self.model.lower(), norm=canonical_norm(self.norm),
                                   shortcut=self.shortcut.upper(),
                                   milestones=tuple(int(m) for m in self.milestones))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        for f in dataclasses.fields(self):
            if f.metadata.get(LATER) and out[f.name] == f.default:
                del out[f.name]  # keeps the ids of runs made before the field existed
        return out

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "RunConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - set(names))
        if unknown:
            raise NormlabError(f"{where}: unknown key {brief(unknown[0])}; known keys: {', '.join(names)}")
        clean = {}
        for key, value in values.items():
            clean[key] = coerce(key, value, type(getattr(cls(), key)), where)
        return cls(**clean)

    def run_id(self) -> str:
        """Readable and unique: resnet56-gn16-b32-s0-1a2b3c (x8 for virtual GPUs)."""
        cfg = self.normalized()
        vg = f"x{cfg.virtual_gpus}" if cfg.virtual_gpus > 1 else ""
        digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
        precise = "-pbn" if cfg.precise_bn else ""
        return f"{cfg.model}-{parse_norm(cfg.norm).tag()}{precise}-b{cfg.batch_size}{vg}-s{cfg.seed}-{digest}"

    def renorm_ramp(self) -> RenormRamp:
        return RenormRamp(self.brn_r_max, self.brn_d_max, self.brn_start, self.brn_r_end, self.brn_d_end)

    def validate(self) -> "RunConfig":
        """Check every field; raise NormlabError naming the field and the fix."""
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            for value in values if isinstance(values, tuple) else (values,):
                if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
                    raise NormlabError(f"{flag(f.name)} {short_number(value)} is beyond any sensible value")
        if len(self.milestones) > MAX_MILESTONES:
            raise NormlabError(f"--milestones: {len(self.milestones)} of them; use at most {MAX_MILESTONES}")
        if not 0 <= self.seed < SEED_RANGE:
            raise NormlabError(f"--seed must be from 0 to {SEED_RANGE - 1} (2^32 - 1), got {short_number(self.seed)}")
        parse_model(self.model)
        norm = parse_norm(self.norm)
        check_norm_fits(norm)
        for name in ("batch_size", "virtual_gpus", "epochs", "base_batch"):
            value = getattr(self, name)
            if value < 1:
                raise NormlabError(f"{flag(name)} must be a positive whole number, got {value}")
        if self.epochs > MAX_EPOCHS:
            raise NormlabError(f"--epochs {self.epochs} is beyond any sensible run (He et al. train "
                               f"164, the GN paper 100); use at most {MAX_EPOCHS}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise NormlabError(f"{flag(f.name)} must be a finite number, got {value}")
        for name in ("base_lr",):
            if not getattr(self, name) > 0:
                raise NormlabError(f"{flag(name)} must be a positive number, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "warmup_steps", "val_split", "seed"):
            if getattr(self, name) < 0:
                raise NormlabError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        self.validate_warmup()
        if self.sync_bn and (norm.kind != "bn" or norm.mode):
            what = f"is BN's {norm.mode} ablation" if norm.mode else "is not BN" if norm.batch_dependent else "has none"
            raise NormlabError(f"--sync-bn synchronises BN's batch statistics, but norm '{self.norm}' "
                               f"{what}; drop --sync-bn, or use bn")
        if self.sync_bn and self.virtual_gpus == 1:
            raise NormlabError("--sync-bn needs several devices (--virtual-gpus K, or K torchrun "
                               "processes): on one device BN already sees all its images; drop --sync-bn")
        if norm.batch_dependent and self.batch_size == 1 and not self.sync_bn:
            raise NormlabError(f"{label(norm)} cannot train on 1 image per device (its batch statistics "
                               f"would be one image's, unlike at evaluation); use --batch-size 2 or more, "
                               f"{'--sync-bn, ' if norm.kind == 'bn' else ''}or a batch-independent norm "
                               f"(gn, ln, in, frn, evonorm-s0)")
        self.validate_norm_options(norm)
        if self.schedule not in SCHEDULES:
            raise NormlabError(f"unknown schedule '{self.schedule}'; use one of: {', '.join(SCHEDULES)}")
        if self.schedule == "step" and self.step_size < 1:
            raise NormlabError(f"--step-size must be a positive number of epochs, got {self.step_size}")
        if self.schedule == "multistep" and not self.milestones:
            raise NormlabError("the multistep schedule needs --milestones, e.g. --milestones 82 123")
        if self.data not in DATA_CHOICES:
            raise NormlabError(f"unknown data set '{self.data}'; use one of: {', '.join(DATA_CHOICES)}")
        train_images = SIZES[self.data][0] - self.val_split
        if train_images < 1:
            raise NormlabError(f"--val-split {self.val_split} leaves no training images ({self.data} has "
                               f"{SIZES[self.data][0]}); hold out fewer")
        if self.images_per_step > train_images:
            raise NormlabError(f"one step needs {self.images_per_step:,} images ({self.virtual_gpus} x "
                               f"{self.batch_size}) but {self.data} has {train_images:,} training images; "
                               f"lower --batch-size or --virtual-gpus")
        if self.shortcut.upper() not in ("A", "B"):
            raise NormlabError(f"unknown shortcut '{self.shortcut}'; use A or B")
        return self

    def validate_warmup(self) -> None:
        if self.warmup_epochs and self.warmup_steps:
            raise NormlabError(f"a warm-up is counted in epochs or in steps, not both (got {self.warmup_epochs:g} "
                               f"epochs and {self.warmup_steps} steps); give one, e.g. --warmup 400steps")
        if self.warmup_epochs > self.epochs:
            raise NormlabError(f"a warm-up of {self.warmup_epochs:g} epochs is longer than the run ({self.epochs} "
                               f"epochs); shorten it, or count it in steps (e.g. --warmup 400steps)")
        if self.warmup_shape not in WARMUP_SHAPES:
            raise NormlabError(f"unknown warm-up shape '{self.warmup_shape}'; use one of: {', '.join(WARMUP_SHAPES)}")
        if not 0 < self.warmup_factor <= 1:
            raise NormlabError(f"the warm-up factor must be in (0, 1] (the warm-up's lr is factor x lr), "
                               f"got {self.warmup_factor}")

    def validate_norm_options(self, norm) -> None:
        ramp = [f for f in dataclasses.fields(self) if f.name.startswith("brn_")]
        changed = [f.name for f in ramp if getattr(self, f.name) != f.default]
        if changed and norm.kind != "brn":
            raise NormlabError(f"{flag(changed[0])} applies to Batch Renorm only; use --norm brn, or drop it")
        for f in ramp:
            if not math.isfinite(getattr(self, f.name)):
                raise NormlabError(f"{flag(f.name)} must be a finite number, got {getattr(self, f.name)}")
        if self.brn_r_max < 1 or self.brn_d_max < 0:
            raise NormlabError(f"Batch Renorm needs --brn-r-max >= 1 and --brn-d-max >= 0, got "
                               f"{self.brn_r_max} and {self.brn_d_max}")
        if not 0 <= self.brn_start <= min(self.brn_r_end, self.brn_d_end) or max(self.brn_r_end, self.brn_d_end) > 1:
            raise NormlabError(f"the Batch Renorm ramp needs 0 <= --brn-start <= --brn-r-end, --brn-d-end <= 1 "
                               f"(fractions of the run), got {self.brn_start}, {self.brn_r_end}, {self.brn_d_end}")
        if self.precise_bn < 0:
            raise NormlabError(f"--precise-bn must be a positive number of training images, got {self.precise_bn}")
        if self.precise_bn and self.sync_bn:
            raise NormlabError("--precise-bn with --sync-bn is not supported (the synchronised layers "
                               "would not be recomputed); drop one of them")
        if self.precise_bn and not norm.has_running_stats:
            raise NormlabError(f"--precise-bn recomputes running statistics, which {norm.canonical()} does not "
                               f"keep; use it with bn, brn or evonorm-b0 (or their +ws forms), or drop it")

    def lr_at(self, epoch: float, steps_per_epoch: int | None = None) -> float:
        """Learning rate at a fractional epoch (0 = start of training); a warm-up counted in
        steps needs the run's steps per epoch."""
        if self.schedule == "step":
            factor = 0.1 ** int(epoch // self.step_size)
        elif self.schedule == "multistep":
            factor = 0.1 ** sum(epoch >= m for m in self.milestones)
        else:
            factor = 0.5 * (1 + math.cos(math.pi * min(epoch / self.epochs, 1.0)))
        return self.lr * factor * self.warmup_at(epoch, steps_per_epoch)

    def warmup_at(self, epoch: float, steps_per_epoch: int | None = None) -> float:
        """The warm-up's factor on the lr at a fractional epoch: 1 once it is over."""
        if self.warmup_steps:
            if not steps_per_epoch:
                raise ValueError("a warm-up in steps needs the run's steps per epoch")
            done, length = round(epoch * steps_per_epoch), self.warmup_steps  # whole steps taken
        else:
            done, length = epoch, self.warmup_epochs
        if done >= length:
            return 1.0
        if self.warmup_shape == "constant":
            return self.warmup_factor
        return self.warmup_factor + (1 - self.warmup_factor) * done / length


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def short_number(value: int) -> str:
    """A whole number as an error message shows it: huge ones by their size."""
    return str(value) if abs(value) < 10**30 else f"(a number of about {value.bit_length() * 0.30103:.0f} digits)"


def brief(value) -> str:
    """A value from a file as an error message shows it: one short line."""
    if isinstance(value, int) and not isinstance(value, bool):
        return short_number(value)
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def coerce(key: str, value, kind: type, where: str):
    """Check a YAML/JSON value against the field's type, naming the key on mismatch."""
    def bad():
        return NormlabError(f"{where}: '{key}' must be {kind.__name__}, got {brief(value)}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        try:
            return float(value)
        except OverflowError:
            raise NormlabError(f"{where}: '{key}' is too large a number") from None
    if kind is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise NormlabError(f"{where}: '{key}' must be a list of whole numbers, got {brief(value)}")
        return tuple(value)
    if not isinstance(value, str):
        raise bad()
    return value


@dataclass
class RuntimeOptions:
    """How to run, not what: never part of a run's identity."""

    device: str = "auto"          # auto | cpu | cuda | cuda:K
    threads: int | None = None    # CPU threads for this run (None: torch's default)
    data_dir: str | None = None
    eval_batch_size: int = 1000
    channels_last: bool | None = None   # None: chosen per device
    amp: bool | None = None             # None: bf16 autocast on CUDA and on CPUs with native bf16
    compile: bool = False
    checkpoint_minutes: float | None = None  # also checkpoint within an epoch this often
    progress: bool = True
    log: "LogOptions | None" = None     # --log: live curves in TensorBoard, MLflow, W&B (loggers/)
    deterministic: bool = False   # deterministic algorithms (exact resume on CUDA), at a cost
    fast_path: str = "off"        # off | graph | compile: whole-step CUDA paths (train/fast.py)
    probes: bool | None = False   # probes.py after every epoch, into probes.csv; None: where they
                                  # cost at most 5 % of the run's training (probes.by_default)
    test_set: bool = True               # evaluate the test set every epoch; off: its columns are NaN
    #                                     (search-groups: read once, for the winner, by Trainer.read_test)
