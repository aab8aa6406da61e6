"""Study records: which runs each study of a results directory holds.

`normlab reproduce` writes one record per study (preset) into OUT/studies/<name>.json: its
name, description, sub-studies (norms, batch-size, ...: run ids) and every run's config. Several
studies can share one results directory without overwriting each other's record; running a
study again replaces its own record only. The report reads every record under a results
directory (and the single OUT/study.json that earlier versions wrote, where no record of the
same name replaces it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .errors import NormlabError

FOLDER, LEGACY = "studies", "study.json"


def safe_name(name: str) -> str:
    """A study name as a file or folder name: 'my study/v2' -> 'my-study-v2'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "study"


def record_path(out: Path, name: str) -> Path:
    return Path(out) / FOLDER / f"{safe_name(name)}.json"


def write_record(out: Path, name: str, description: str, membership: dict[str, list[str]],
                 runs: dict[str, dict]) -> Path:
    """Write (atomically) the record of one study into out/studies/<name>.json. Sub-studies
    that an earlier record of the same name holds and this one does not (a run with --only)
    are kept, with their runs; those it runs again are replaced."""
    path = record_path(out, name)
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as err:
        raise NormlabError(f"cannot write to {path.parent} ({err.strerror}); choose a writable --out") from None
    rundir.remove_stale_temps(path.parent)  # left by a study killed while writing its record
    old = rundir.read_json(path)
    if isinstance(old, dict) and isinstance(old.get("studies"), dict) and isinstance(old.get("runs"), dict):
        kept = {k: v for k, v in old["studies"].items() if k not in membership and isinstance(v, list)}
        membership = {**kept, **membership}
        runs = {**{i: old["runs"][i] for ids in kept.values() for i in ids if i in old["runs"]}, **runs}
    rundir.write_json(path, {"name": name, "description": description, "studies": membership, "runs": runs})
    return path


@dataclass
class Record:
    name: str
    description: str
    studies: dict[str, list[str]]         # sub-study name -> run ids, in the study's order
    path: Path | None = None              # None: inferred from runs that no record holds
    planned: list[str] = field(default_factory=list)   # every run id the study trains

    @property
    def run_ids(self) -> set[str]:
        return set(self.planned) | {i for ids in self.studies.values() for i in ids}


def read_records(root: Path) -> list[Record]:
    """Every study record under root: studies/*.json, and study.json where no record of that
    name exists. A record that is not valid JSON is refused (it was edited or damaged by hand:
    every write is atomic)."""
    root = Path(root)
    found: dict[str, Record] = {}
    legacy = []
    for path in sorted(root.rglob(f"{FOLDER}/*.json")) + sorted(root.rglob(LEGACY)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temporary files and directories set aside
        value = rundir.read_json(path)
        if not isinstance(value, dict) or not isinstance(value.get("studies", {}), dict):
            raise NormlabError(f"{path} is not valid JSON (edited or damaged by hand?); restore it, or "
                               f"delete it and the report infers the studies from the runs")
        studies = {str(k): [str(i) for i in v] for k, v in (value.get("studies") or {}).items()
                   if isinstance(v, list)}
        runs = value.get("runs")
        record = Record(str(value.get("name") or path.parent.name), str(value.get("description") or ""),
                        studies, path, [str(i) for i in runs] if isinstance(runs, dict) else [])
        if path.name == LEGACY:
            legacy.append(record)
        else:
            found.setdefault(record.name, record)
    for record in legacy:
        found.setdefault(record.name, record)
    return list(found.values())
