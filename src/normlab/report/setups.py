"""Setups: the runs of a results directory that may be compared with each other.

A claim compares points that differ in what it varies (the norm, with its group count or
variant such as PreciseBN, and the batch size) and in nothing else; the seed varies within a
point. Runs whose configs differ in anything else (devices, epochs, schedule, lr rule, weight
decay, --sync-bn, warm-up, data, model ...) belong to different setups, and the report gives
each setup its own findings, tables and figures, headed by what tells it apart
("resnet8, 8 devices × N" against "resnet8, 1 device × N"). `partition(runs)` is the entry point.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from ..config import RunConfig
from .runs import Run

# What a claim varies, and the seed: every other config field is the setup's.
VARIED = ("norm", "batch_size", "precise_bn", "seed")
# How a setting reads in a setup's title, and its tag in file names.
WORDS = {"epochs": ("{} epochs", "e{}"), "schedule": ("{} schedule", "{}"), "base_lr": ("base lr {}", "lr{}"),
         "base_batch": ("base batch {}", "bb{}"), "weight_decay": ("weight decay {}", "wd{}"),
         "warmup_epochs": ("{} warm-up epochs", "wu{}"), "warmup_steps": ("{} warm-up steps", "wus{}"),
         "data": ("{}", "{}"), "val_split": ("{} validation images", "val{}")}


@dataclass
class Setup:
    cfg: RunConfig      # one run's config: every field but VARIED is the whole setup's
    runs: list[Run]
    title: str          # the model, its devices × N, and whatever else tells it from the others
    slug: str           # for file names: the model, plus tags when the model has several setups

    @property
    def model(self) -> str:
        return self.cfg.model


def fields(cfg: RunConfig) -> dict:
    """The setup's settings: every config field but those a claim varies and the seed."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in VARIED}


def key(cfg: RunConfig) -> str:
    return json.dumps(fields(cfg), sort_keys=True, default=list)


def devices(cfg: RunConfig) -> str:
    """'1 device × N', '8 devices × N' (virtual GPUs or torchrun processes: the same run)."""
    return f"{cfg.virtual_gpus} device{'s' if cfg.virtual_gpus > 1 else ''} × N"


def phrase(name: str, value) -> tuple[str, str]:
    """(words for a title, tag for a file name) of one setting."""
    if name == "sync_bn":
        return ("SyncBN (BN over all devices)" if value else "BN per device"), ("sync" if value else "nosync")
    if name == "milestones":
        return f"lr / 10 at epochs {', '.join(map(str, value))}", "m" + "-".join(map(str, value))
    words, tag = WORDS.get(name, (name.replace("_", " ") + " {}", name.replace("_", "") + "{}"))
    text = value if not isinstance(value, bool) else ("on" if value else "off")
    return words.format(text), tag.format(text)


def model_order(model: str):
    digits = "".join(c for c in model if c.isdigit())
    return (int(digits) if digits else 0, model)


def partition(runs: list[Run]) -> list[Setup]:
    """The runs grouped into setups, ordered by model, then devices, then the rest; each titled
    with what tells it apart from the other setups of its model."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run.cfg), []).append(run)
    ordered = sorted(groups.values(), key=lambda rs: (model_order(rs[0].cfg.model), rs[0].cfg.virtual_gpus,
                                                       key(rs[0].cfg)))
    setups = []
    for group in ordered:
        cfg = group[0].cfg
        siblings = [g[0].cfg for g in ordered if g[0].cfg.model == cfg.model]
        differ = [name for name in fields(cfg) if name not in ("model", "virtual_gpus")
                  and len({json.dumps(fields(c)[name], default=list) for c in siblings}) > 1]
        words = [phrase(name, fields(cfg)[name]) for name in differ]
        title = ", ".join([cfg.model, devices(cfg)] + [w for w, _ in words])
        slug = cfg.model
        if len(siblings) > 1:
            tags = ([f"x{cfg.virtual_gpus}"] if len({c.virtual_gpus for c in siblings}) > 1 else []) + \
                   [t for _, t in words]
            tag = re.sub(r"[^a-z0-9.-]", "", "-".join(tags).lower())  # a file name's characters only
            slug += "-" + (tag or hashlib.sha1(key(cfg).encode()).hexdigest()[:6])
        setups.append(Setup(cfg, group, title, slug))
    seen: dict[str, int] = {}
    for s in setups:  # tags that read alike (long names cut by the filter) get a number
        seen[s.slug] = seen.get(s.slug, 0) + 1
        if seen[s.slug] > 1:
            s.slug += f"-{seen[s.slug]}"
    return setups
