"""Optuna's successive-halving pruner, made safe to ask twice.

`SuccessiveHalvingPruner.prune` stores the value of a rung it reaches as a trial system
attribute ('completed_rung_k') before it decides. Asked again at the same step, it finds that
rung done and judges the next one, which the trial has not reached: "go on". A search killed
between the decision and its record (the trial's 'pruned' state) resumes by asking again, so a
pruned trial would train on and the search's result would depend on when it was killed.

`ResumableHalvingPruner` answers a repeated question at a rung's step from the stored values:
the same rule, the trial's stored value against the competitors that had reached the rung. With
one worker nothing else reaches a rung in between, so a resumed search decides exactly as one
never stopped.
"""
from __future__ import annotations

import math

from optuna.pruners import SuccessiveHalvingPruner


def rung_key(rung: int) -> str:
    return f"completed_rung_{rung}"  # Optuna's name for a rung's stored value


def completed_rungs(trial) -> int:
    rung = 0
    while rung_key(rung) in trial.system_attrs:
        rung += 1
    return rung


def promotable(value: float, competing: list[float], reduction_factor: int) -> bool:
    """Optuna's rule for a minimised value: within the best 1/η of the rung's values (at least
    the best one)."""
    index = max(0, len(competing) // reduction_factor - 1)
    return value <= sorted(competing)[index]


class ResumableHalvingPruner(SuccessiveHalvingPruner):
    """SuccessiveHalvingPruner (minimising, no bootstrap) whose decision at a rung's step is the
    same however often it is asked."""

    def __init__(self, min_resource: int, reduction_factor: int):
        super().__init__(min_resource=min_resource, reduction_factor=reduction_factor)
        self.min_epochs, self.eta = min_resource, reduction_factor

    def rung_step(self, rung: int) -> int:
        return self.min_epochs * self.eta ** rung

    def prune(self, study, trial) -> bool:
        step, done = trial.last_step, completed_rungs(trial)
        if step is not None and done and step == self.rung_step(done - 1):
            return self.judge_again(study, trial, done - 1)  # asked again: the rung is recorded
        return super().prune(study, trial)

    def judge_again(self, study, trial, rung: int) -> bool:
        key = rung_key(rung)
        value = trial.system_attrs[key]
        if math.isnan(value):
            return True
        # as when first asked: the other trials' values at this rung, and this trial's
        competing = [t.system_attrs[key] for t in study.get_trials(deepcopy=False)
                     if key in t.system_attrs and t.number != trial.number] + [value]
        return not promotable(value, competing, self.eta)
