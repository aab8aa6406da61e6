"""The studies of a results directory as the report sees them: each study record (see
normlab.records) with the runs it holds, and the runs no record holds as one more study whose
parts are inferred from their configs. The report has a section per study."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from .. import rundir
from ..records import Record, read_records, safe_name
from .runs import Run, infer_membership

OUTSIDE = "runs outside any study"


@dataclass
class Study:
    name: str
    description: str
    members: dict[str, set[str]]   # part (norms, batch-size, groups, zoo, ...) -> run ids
    runs: list[Run]                # the runs of it found on disk
    planned: int                   # how many runs the study trains (its record's count)
    inferred: bool = False         # no record: the parts were inferred from the configs

    @property
    def folder(self) -> str:
        """Its figures' folder under figures/."""
        return safe_name(self.name)

    def finished(self) -> int:
        return sum(r.state in rundir.FINISHED for r in self.runs)

    def progress(self) -> str | None:
        """'Under way: 5 of 9 runs finished (2 running, 2 not started)'; None when every run
        has finished."""
        done, total = self.finished(), max(self.planned, len(self.runs))
        if done == total:
            return None
        states = collections.Counter(r.state for r in self.runs if r.state not in rundir.FINISHED)
        parts = [f"{n} {state}" for state, n in sorted(states.items())]
        if total > len(self.runs):
            parts.append(f"{total - len(self.runs)} not started")
        return f"under way: {done} of {total} runs finished ({', '.join(parts)})"


def studies_of(root: Path, runs: list[Run], records: list[Record] | None = None) -> list[Study]:
    """The studies of the runs under root: one per record (read_records(root) unless given), in
    name order, then the runs that no record names (with the directory's name when there is no
    record at all)."""
    by_id = {r.id: r for r in runs}
    out = []
    for record in sorted(read_records(root) if records is None else records, key=lambda r: r.name):
        ids = record.run_ids
        members = {name: set(ids_) for name, ids_ in record.studies.items()}
        out.append(Study(record.name, record.description, members,
                         [by_id[i] for i in sorted(ids) if i in by_id], len(ids)))
    held = {r.id for s in out for r in s.runs}
    rest = [r for r in runs if r.id not in held]
    if rest:
        name = OUTSIDE if out else (Path(root).resolve().name or "runs")
        out.append(Study(name, "", infer_membership(rest), rest, len(rest), inferred=True))
    return out


def membership(studies: list[Study]) -> dict[str, list[str]]:
    """Run id -> 'study/part' names, for results.csv."""
    names: dict[str, list[str]] = collections.defaultdict(list)
    for study in studies:
        for part, ids in study.members.items():
            for i in ids:
                names[i].append(f"{study.name}/{part}")
    return names
