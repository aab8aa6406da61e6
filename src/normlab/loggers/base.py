"""What every logger shares: the options that travel with a run, what the tools are told about
it, the interface each tool implements, and how values are named."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EVERY = 50  # steps between training-loss points (PyTorch Lightning's log_every_n_steps)
SUMMARY_EPOCHS = 5  # the final number: the median test error of the final 5 epochs
FINAL = f"median_final{SUMMARY_EPOCHS}_test_error"


@dataclass(frozen=True)
class LogOptions:
    """Where and what to log. Part of the runtime options, so that it travels to Ray and SLURM
    nodes: paths are absolute, and the choices that need a look around (the MLflow store, W&B's
    mode) are made once, where the command started."""

    tools: tuple[str, ...] = ()
    every: int = DEFAULT_EVERY
    root: str = "."                       # the results directory: local logs go in here
    experiment: str = "normlab"           # the study: MLflow experiment, W&B project
    mlflow_uri: str | None = None
    mlflow_artifacts: str | None = None   # normlab's local MLflow store keeps them beside it
    wandb_mode: str | None = None         # None: W&B decides (online with a login, else offline)


@dataclass(frozen=True)
class RunInfo:
    """What the tools are told about a run."""

    run_id: str
    key: str                  # random, kept with the run: the same run in the tool on resume
    config: dict              # the hyper-parameters
    tags: dict[str, str]      # model, norm, batch size, seed, studies, ...
    group: str                # the run's setting without its seed: its seeds form a group
    experiment: str


class Logger:
    """One tool. The loop's calls, in order: start; log_step and log_epoch as training goes;
    summary and artifacts at the end; close. Any call may raise: the caller (Loggers) then
    drops the logger with one warning."""

    name = "?"

    @staticmethod
    def check(opts: LogOptions) -> LogOptions:
        """Raise if the tool cannot be used; called once where the command starts."""
        return opts

    def __init__(self, opts: LogOptions):
        self.opts = opts

    def start(self, run: RunInfo, resume_step: int, rows: list[dict]) -> None:
        """Open the run, or reopen it on resume. resume_step: the steps the checkpoint holds;
        rows: its epochs (metrics.csv), logged here where the tool lacks them."""

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Training loss and lr at a global step (steps done since the run began)."""

    def log_epoch(self, epoch: int, row: dict) -> None:
        """A row of metrics.csv."""

    def summary(self, values: dict[str, float]) -> None:
        """The final numbers (median of the final epochs)."""

    def artifacts(self, paths: list[Path]) -> None:
        """Files (the report's figures) where the tool takes them."""

    def close(self, state: str) -> None:
        """state: done, diverged, interrupted or failed."""


def warn(message: str) -> None:
    print(f"normlab: warning: {message}", file=sys.stderr, flush=True)


def describe(tool: str, err: BaseException) -> str:
    """An error in one line, with the fix where there is one."""
    if isinstance(err, ImportError):
        return f"its library is not installed ({err}); pip install 'normlab[{tool}]'"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def flat(config: dict) -> dict:
    """Hyper-parameters as the tools take them: numbers, booleans and text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}


def numbers(row: dict) -> dict[str, float]:
    """A metrics row's values, without the epoch (the x axis)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}


def figure_name(path: Path) -> str:
    """A report figure's name in a tool: figures/<study>/<name> (or figures/<name>)."""
    return f"figures/{path.stem}" if path.parent.name == "figures" else f"figures/{path.parent.name}/{path.stem}"
