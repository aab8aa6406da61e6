"""Live curves where researchers already look: TensorBoard, MLflow and Weights & Biases.

`--log tensorboard|mlflow|wandb` (any combination) on train, reproduce and search-groups.
Each tool is used through its own library (the extras normlab[tensorboard], normlab[mlflow],
normlab[wandb]) behind one small interface (base.Logger), one module per tool, where each says
where it logs and how a resumed run continues without duplicate points.

The training loop holds one Loggers per run and calls it at start, every --log-every steps
(training loss and lr), after every epoch (every column of metrics.csv) and at the end (the
final numbers: the median errors of the final 5 epochs). A logger that fails (library missing,
no server, no login, disk full) prints one warning and is dropped: training goes on. Names are
the same in every tool: epoch/<column> against the epoch, step/train_loss and step/lr against
the global step, summary/<name>.
"""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
from pathlib import Path

from .. import rundir
from .base import DEFAULT_EVERY, SUMMARY_EPOCHS, Logger, LogOptions, RunInfo, describe, warn
from .mlflow import MlflowLogger
from .tensorboard import TensorBoardLogger
from .wandb import WandbLogger

__all__ = ["DEFAULT_EVERY", "KEY_FILE", "LOGGERS", "TOOLS", "LogOptions", "Loggers", "RunInfo",
           "log_report", "options"]

LOGGERS: dict[str, type[Logger]] = {t.name: t for t in (TensorBoardLogger, MlflowLogger, WandbLogger)}
TOOLS = tuple(LOGGERS)
KEY_FILE = "loggers.json"  # in a run directory (and a study's): the key that finds its run in a tool


def options(tools, every: int, out: str | Path, study: str) -> LogOptions:
    """A command's logging options, checked where it starts: a tool whose library is missing or
    whose store cannot be reached is dropped here with one warning, instead of failing in every
    run; W&B's mode is settled, and the local MLflow store is created, once."""
    root = Path(out).absolute()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    opts = LogOptions(tuple(dict.fromkeys(tools)), every, str(root), f"normlab-{study}",
                      uri or f"sqlite:///{root / 'mlflow.db'}", None if uri else (root / "mlartifacts").as_uri())
    if opts.tools:
        root.mkdir(parents=True, exist_ok=True)
    usable = []
    for tool in opts.tools:
        try:
            opts = LOGGERS[tool].check(opts)
            usable.append(tool)
        except Exception as err:
            warn(f"--log {tool}: {describe(tool, err)}; going on without it")
    return dataclasses.replace(opts, tools=tuple(usable))


def run_key(directory: Path) -> str:
    """The directory's logging key, created on first use (a run started afresh with --force
    gets a new directory, hence a new key and a new run in each tool)."""
    path = Path(directory) / KEY_FILE
    key = (rundir.read_json(path) or {}).get("key")
    if not isinstance(key, str) or not key.isalnum():
        key = secrets.token_hex(4)
        rundir.write_json(path, {"key": key})
    return key


def study_records(out: Path) -> list:
    """The study records of a results directory (none where they cannot be read: tags only)."""
    from ..errors import NormlabError
    from ..records import read_records

    try:
        return read_records(out)
    except (NormlabError, OSError):
        return []


def run_info(cfg: dict, run_dir: Path, log: LogOptions) -> RunInfo:
    """A run as the tools see it: its id, key, config, tags, and the group of its seeds."""
    from ..config import RunConfig

    run = RunConfig.from_dict(cfg)
    run_id = run.run_id()
    studies = [part for record in study_records(Path(run_dir).parent)
               for part, ids in record.studies.items() if run_id in ids]
    tags = {"model": run.model, "norm": run.norm, "batch_size": str(run.batch_size),
            "virtual_gpus": str(run.virtual_gpus), "seed": str(run.seed), "data": run.data,
            **({"studies": ",".join(studies)} if studies else {})}
    group = dataclasses.replace(run, seed=0).run_id().replace("-s0-", "-")
    return RunInfo(run_id, run_key(run_dir), run.to_dict(), tags, group, log.experiment)


class Loggers:
    """A run's loggers, as the training loop calls them. Every call is guarded: a logger that
    raises prints one warning and is dropped, and training goes on. Empty without --log, and
    on every torchrun rank but 0 (enabled=False)."""

    def __init__(self, log: LogOptions | None, cfg: dict | None = None, run_dir: Path | None = None,
                 enabled: bool = True):
        self.log = log if log is not None and enabled else LogOptions()
        self.cfg, self.run_dir = cfg, run_dir
        self.active: list[Logger] = []
        self.name = "?"

    def __bool__(self) -> bool:
        return bool(self.active)

    def start(self, resume_step: int, rows: list[dict], run: RunInfo | None = None) -> None:
        """Open the run in each tool (run: what to tell them; by default the run's config)."""
        if not self.log.tools:
            return
        try:
            run = run or run_info(self.cfg, self.run_dir, self.log)
        except Exception as err:
            warn(f"--log: cannot keep the logging key in {self.run_dir} ({describe('', err)}); "
                 f"training goes on without logging")
            return
        self.name = run.run_id
        for tool in self.log.tools:
            try:
                logger = LOGGERS[tool](self.log)
                logger.start(run, resume_step, rows)
                self.active.append(logger)
            except Exception as err:
                self.fail(tool, err)

    def due(self, step: int) -> bool:
        """Log at this global step? The loop reads the loss only then: no sync otherwise."""
        return bool(self.active) and step % self.log.every == 0

    def step(self, step: int, values: dict[str, float]) -> None:
        self.call("log_step", step, values)

    def epoch(self, epoch: int, row: dict) -> None:
        self.call("log_epoch", epoch, row)

    def artifacts(self, paths) -> None:
        self.call("artifacts", [Path(p) for p in paths])

    def finish(self, state: str, rows: list[dict]) -> None:
        """The final numbers, when the run has ended with some, then close."""
        if state in ("done", "diverged") and rows:
            final = {k: v for k, v in rundir.summarize(rows, SUMMARY_EPOCHS).items()
                     if k != "epochs_done" and math.isfinite(v)}
            self.call("summary", final)
        self.close(state)

    def close(self, state: str) -> None:
        self.call("close", state)
        self.active = []

    def call(self, method: str, *args) -> None:
        for logger in list(self.active):
            try:
                getattr(logger, method)(*args)
            except Exception as err:
                self.active.remove(logger)
                self.fail(logger.name, err)
                if method != "close":  # let the tool end its run if it still can
                    try:
                        logger.close("failed")
                    except Exception:
                        pass

    def fail(self, tool: str, err: BaseException) -> None:
        warn(f"{tool} logging of {self.name} stopped ({describe(tool, err)}); training goes on")


def log_report(log: LogOptions, out: Path, paths) -> None:
    """The report's figures (and report.md where the tool keeps files), as a run named
    `report` in the study's experiment, replaced each time the report is written."""
    run = RunInfo("report", run_key(out), {}, {"kind": "report"}, "report", log.experiment)
    loggers = Loggers(log)
    loggers.start(0, [], run)
    loggers.artifacts(paths)
    loggers.close("done")
