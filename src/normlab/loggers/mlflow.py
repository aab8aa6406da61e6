"""MLflow, through its client (MlflowClient: no global active run, so that a process can log
several runs at once).

The store is $MLFLOW_TRACKING_URI (a tracking server), else a local one in the results
directory, sqlite:///OUT/mlflow.db with artifacts in OUT/mlartifacts (MLflow's own default
store is SQLite; its file store is retired). One experiment per study ($MLFLOW_EXPERIMENT_NAME,
else normlab-<study>), one MLflow run per normlab run, named by its run id, with its config as
parameters and tags for model, norm, batch size, seed and studies.

An MLflow run's id is chosen by MLflow, so the run is found again by the tag normlab.key (the
key kept in the run directory). MLflow keeps every point it is sent, so a resumed run asks it
how far it got (the metrics' histories) and sends only what comes after.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

from .base import Logger, figure_name, flat, numbers

STATUS = {"done": "FINISHED", "diverged": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


@contextlib.contextmanager
def patient(retries: str, timeout: str):
    """MLflow's HTTP retries, unless the user set them: its defaults retry a dead server for
    about 4 minutes, too long to find out, once, whether there is one."""
    given = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)
    try:
        yield
    finally:
        for k, v in given.items():
            if v is None:
                os.environ.pop(k, None)


class MlflowLogger(Logger):
    name = "mlflow"

    @staticmethod
    def check(opts):
        with patient("1", "10"):  # creates the local store's tables once, not in every run
            MlflowLogger(opts).experiment_id(opts.experiment)
        return opts

    def __init__(self, opts):
        super().__init__(opts)
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # their start-up lines would break into the display
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=opts.mlflow_uri)
        self.pending = []
        self.last_epoch = 0

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.opts.mlflow_artifacts)
        except MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, run, resume_step, rows):
        from mlflow.entities import Param

        experiment = self.experiment_id(run.experiment)
        found = self.client.search_runs([experiment], f"tags.`normlab.key` = '{run.key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {**{f"normlab.{k}": v for k, v in run.tags.items()}, "normlab.key": run.key,
                    "normlab.run_id": run.run_id, "normlab.group": run.group}
            self.run_id = self.client.create_run(experiment, run_name=run.run_id, tags=tags).info.run_id
            params = [Param(k, str(v)) for k, v in flat(run.config).items()]
            for first in range(0, len(params), 100):  # at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[first:first + 100])
        self.held_step = self.last_step("step/train_loss")
        held_epoch = self.last_step("epoch/test_error")
        for row in rows:
            if row["epoch"] > held_epoch:
                self.log_epoch(row["epoch"], row)
        self.last_epoch = rows[-1]["epoch"] if rows else 0

    def last_step(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def metrics(self, prefix: str, values: dict, step: int) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(f"{prefix}/{k}", v, now, step) for k, v in values.items()]

    def log_step(self, step, values):
        if step > self.held_step:  # sent in the background: the training step never waits
            self.pending.append(self.client.log_batch(self.run_id, self.metrics("step", values, step),
                                                      synchronous=False))

    def log_epoch(self, epoch, row):
        self.client.log_batch(self.run_id, self.metrics("epoch", numbers(row), epoch))
        self.wait()
        self.last_epoch = epoch

    def wait(self) -> None:
        """Wait for the step points sent so far; raises what they met."""
        pending, self.pending = self.pending, []
        for operation in pending:
            operation.wait()

    def summary(self, values):
        self.client.log_batch(self.run_id, self.metrics("summary", values, self.last_epoch))

    def artifacts(self, paths):
        for path in paths:
            folder = figure_name(path).rsplit("/", 1)[0] if path.suffix == ".png" else "figures"
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, state):
        self.wait()
        self.client.set_tag(self.run_id, "normlab.state", state)
        self.client.set_terminated(self.run_id, status=STATUS.get(state, "FAILED"))
