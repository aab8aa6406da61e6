"""Weights & Biases, through its SDK.

Online where a login is set up ($WANDB_API_KEY, `wandb login`), else W&B's offline mode: runs
in $WANDB_DIR or OUT/wandb/, watched with `wandb leet` and uploaded with `wandb sync`. A server
that cannot be reached (checked once, where the command starts) means offline too, with one
warning. Project $WANDB_PROJECT, else normlab-<study>; the seeds of one setting form a group;
the W&B run id is <run-id>-<key>, the key kept in the run directory, so that a resumed run is
the same W&B run (online: W&B resumes it; offline: each attempt writes its own offline run
file, and `wandb sync` appends them in order).

W&B keeps one step counter per run, so the curves name their own x axes (define_metric):
epoch/* against `epoch`, step/* against `global_step`. A resumed run asks W&B how far it got
(the run's summary; offline, the summaries of its earlier offline files, read by W&B's own
reader `wandb leet inspect`) and logs only what comes after.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .base import Logger, figure_name, numbers, warn

OFFLINE = ("offline", "dryrun", "disabled")
CHECK_S = 30      # W&B's own login check gives up after 10 s; its teardown gets the rest
NO_LOGIN = 3
# The child's verdict on stdout; os._exit skips W&B's teardown, which can hang after a failure.
# Its error line is base.describe's, written out: importing normlab there would import torch (2 s).
LOGIN = f"""
import os, wandb
from wandb.errors import UsageError
try:
    wandb.login(verify=True, timeout=10)
    print("online", flush=True)
    os._exit(0)
except UsageError:
    os._exit({NO_LOGIN})
except Exception as err:
    lines = str(err).strip().splitlines()
    print(type(err).__name__ + ": " + (lines[0] if lines else ""), flush=True)
    os._exit(4)
"""


class WandbLogger(Logger):
    name = "wandb"

    @staticmethod
    def check(opts):
        """Online only with a login and a server that answers; else offline for every run.

        W&B's login runs in a child process of its own session, killed after CHECK_S: in this
        process a failed login can leave W&B's service busy, and the process then hangs at exit
        (seen for minutes on a loaded machine)."""
        importlib.import_module("wandb")  # missing library: one warning from options()

        if os.environ.get("WANDB_MODE") in OFFLINE:
            return opts
        child = subprocess.Popen([sys.executable, "-c", LOGIN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            said, _ = child.communicate(timeout=CHECK_S)
        except subprocess.TimeoutExpired:
            said = f"no answer in {CHECK_S} s"
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # W&B's service too, if it stayed
            except (ProcessLookupError, PermissionError):
                pass
            child.wait()
        if child.returncode == 0 and said.strip() == "online":
            return opts
        if child.returncode == NO_LOGIN:
            return dataclasses.replace(opts, wandb_mode="offline")
        reason = (said.strip().splitlines() or [f"the check ended with code {child.returncode}"])[-1][:300]
        warn(f"--log wandb: the W&B server does not answer ({reason}); logging "
             f"offline in {wandb_dir(opts) / 'wandb'}, for `wandb sync` later")
        return dataclasses.replace(opts, wandb_mode="offline")

    def start(self, run, resume_step, rows):
        import wandb
        from wandb.errors import UsageError

        self.dir = wandb_dir(self.opts)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.id = f"{run.run_id}-{run.key}"
        args = dict(id=self.id, name=run.run_id, group=run.group, config=run.config, resume="allow",
                    tags=[f"{k}={v}"[:64] for k, v in run.tags.items()], dir=str(self.dir),
                    reinit="create_new",  # a process may train several runs, even at once
                    settings=wandb.Settings(silent=True, console="off"))
        if not os.environ.get("WANDB_PROJECT"):
            args["project"] = run.experiment
        if self.opts.wandb_mode and not os.environ.get("WANDB_MODE"):
            args["mode"] = self.opts.wandb_mode
        try:
            self.run = wandb.init(**args)
        except UsageError:  # no login where this run trains: offline
            self.run = wandb.init(**{**args, "mode": "offline"})
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        held = self.held()
        self.held_step = held.get("global_step", -1)
        for row in rows:
            if row["epoch"] > held.get("epoch", 0):
                self.log_epoch(row["epoch"], row)

    def held(self) -> dict[str, float]:
        """The last epoch and step that W&B holds for this run."""
        keys = ("epoch", "global_step")
        held = {k: self.run.summary.get(k) for k in keys if self.run.summary.get(k) is not None}
        if self.run.settings.mode not in ("offline", "dryrun"):  # online, or disabled (WANDB_MODE)
            return held
        current = Path(self.run.settings.sync_file).resolve()
        for path in sorted((self.dir / "wandb").glob(f"offline-run-*/run-{self.id}.wandb")):
            if path.resolve() != current:
                summary = file_summary(path)
                for k in keys:
                    if isinstance(summary.get(k), (int, float)):
                        held[k] = max(held.get(k, -1), summary[k])
        return held

    def log_step(self, step, values):
        if step > self.held_step:
            self.run.log({"global_step": step, **{f"step/{k}": v for k, v in values.items()}})

    def log_epoch(self, epoch, row):
        self.run.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in numbers(row).items()}})

    def summary(self, values):
        self.run.summary.update({f"summary/{k}": v for k, v in values.items()})

    def artifacts(self, paths):
        import wandb

        images = {figure_name(p): wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            self.run.log(images)

    def close(self, state):
        if state == "interrupted":
            self.run.mark_preempting()  # W&B's word for a run that stops to be resumed
        self.run.finish(exit_code=0 if state in ("done", "diverged") else 1)


def wandb_dir(opts) -> Path:
    return Path(os.environ.get("WANDB_DIR") or opts.root)


def file_summary(path: Path) -> dict:
    """The last values an offline run file holds, read by W&B's own reader."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                             str(path)], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout).get("summary") or {}
