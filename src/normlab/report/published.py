"""Published numbers beside the study's own: table columns, rows and footnotes, figure series.

Every published number is labelled with its setting ("GN paper, ImageNet ResNet-50 [1]") and a
footnote gives its full setup, metric and source; numbers of another setting than the study's
(model, data set, devices × per-device batch, epochs and lr schedule: Published.same_setting)
are flagged as such: compare their trends, not their levels.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..config import RunConfig
from ..references import Published, find, settings
from .labels import family, label, sweep_value

DATA_NAMES = {"imagenet": "ImageNet", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
              "sample": "the CIFAR-10 sample"}


def model_name(model: str) -> str:
    return model.replace("resnet", "ResNet-") if model.startswith("resnet") else model


def short_setting(p: Published) -> str:
    """'GN paper, ImageNet ResNet-50': enough in a header to never mistake the setting."""
    return f"{p.name}, {DATA_NAMES.get(p.data, p.data)} {model_name(p.model)}"


@dataclass
class Notes:
    """Footnotes of one table: each setting gets a number the first time it is used."""
    cfg: RunConfig                                   # the study's setup (norm, batch and seed aside)
    numbers: dict = field(default_factory=dict)      # setting -> (number, an example Published)

    def mark(self, p: Published) -> str:
        if p.setting not in self.numbers:
            self.numbers[p.setting] = (len(self.numbers) + 1, p)
        return f"{short_setting(p)} [{self.numbers[p.setting][0]}]"

    def lines(self) -> list[str]:
        out = []
        for number, p in self.numbers.values():
            same = p.same_setting(self.cfg)
            where = ("The same setting as this study's (model, data set, devices × batch per device, "
                     "epochs and lr schedule)." if same else
                     "Another setting than this study's: compare trends, not levels.")
            out.append(f"[{number}] {p.name}: {p.setup}; {p.metric}; {p.cite}. {where}")
        return out


def notes_for(points) -> Notes:
    return Notes(points[0].cfg)


def columns(published: list[Published], norms_batches: list[tuple[str, int]], notes: Notes):
    """Headers and, per row (norm, batch), the cells of one column per setting that has an
    exact match for some row. Returns (headers, rows of cells)."""
    by_setting = settings(published)
    headers, cells = [], [[] for _ in norms_batches]
    for numbers in by_setting.values():
        found = [find(numbers, norm, batch) for norm, batch in norms_batches]
        if not any(found):
            continue
        headers.append(f"published: {notes.mark(numbers[0])}")
        for row, p in zip(cells, found):
            row.append(p.text() + (f" ({p.note})" if p.note else "") if p else "-")
    return headers, cells


def sweep_gn(numbers: list[Published]) -> str | None:
    """The GN variant a source measured at the most batch sizes (the GN paper's G = 32)."""
    counts = collections.Counter(p.norm for p in numbers if family(p.norm) == "gn")
    return counts.most_common(1)[0][0] if counts else None


def batch_rows(published: list[Published], norms: list[str], sizes: list[int], notes: Notes,
               gn: str | None) -> list[list[str]]:
    """Rows for the wide norm x batch-size table: per setting, its BN, LN, IN and GN numbers at
    the study's batch sizes (its own GN variant, named) and its BN − GN."""
    rows = []
    for numbers in settings(published).values():
        theirs_gn = sweep_gn(numbers)
        mine = {}
        for norm in norms:
            theirs = theirs_gn if family(norm) == "gn" else norm
            values = [find(numbers, theirs, s) if theirs else None for s in sizes]
            if any(values) and (family(norm) != "gn" or norm == gn):
                mine[theirs] = values
        if not mine:
            continue
        name = notes.mark(numbers[0])
        for theirs, values in mine.items():
            rows.append([f"{name}: {label(theirs)}"] + [v.text() if v else "-" for v in values])
        if "bn" in mine and theirs_gn in mine and any(a and b for a, b in zip(mine["bn"], mine[theirs_gn])):
            diffs = [f"{a.error - b.error:+.1f}" if a and b else "-" for a, b in zip(mine["bn"], mine[theirs_gn])]
            rows.append([f"{name}: BN − {label(theirs_gn)}"] + diffs)
    return rows


def batch_series(published: list[Published]) -> list[tuple[Published, str, list[tuple[int, float]]]]:
    """Per setting and norm (BN, and the source's batch-sweep GN): (example, name, [(batch, error)])."""
    out = []
    for numbers in settings(published).values():
        for norm in ("bn", sweep_gn(numbers)):
            pts = sorted(((p.batch_size, p.error) for p in numbers if p.norm == norm), reverse=True)
            if norm and pts:  # a single number is a marker: He et al.'s BN at batch 128
                out.append((next(p for p in numbers if p.norm == norm), label(norm), pts))
    return out


def sweep_series(published: list[Published], key: str, batch: int) -> list[tuple[Published, str, list[tuple[int, float]]]]:
    """Per setting: the group sweep (key 'groups') or channels-per-group sweep ('per_group') at
    this batch size, as (example, name, [(G or channels per group, error)])."""
    out = []
    for numbers in settings(published).values():
        pts = sorted((sweep_value(p.norm, key), p.error) for p in numbers
                     if p.batch_size == batch and sweep_value(p.norm, key))
        if len(pts) >= 2:
            out.append((numbers[0], "GN, G groups" if key == "groups" else "GN, channels per group", pts))
    return out
