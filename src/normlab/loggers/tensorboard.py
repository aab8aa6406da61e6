"""TensorBoard, through torch.utils.tensorboard (which needs the tensorboard package).

One TensorBoard run per normlab run, OUT/tensorboard/<run-id>/ (epoch curves against the
epoch, the config as hyper-parameters, the final number), with the step curves in its own
sub-run <run-id>/steps/ (against the global step: another x axis); the report's figures go to
OUT/tensorboard/report/. `tensorboard --logdir OUT/tensorboard` shows them live.

On resume, new event files carry a purge step, TensorBoard's own mechanism for restarted jobs:
its readers hide what earlier attempts logged from that step on. The epochs are all logged
again from the checkpoint's rows (a handful of numbers each), the steps from the checkpoint on.
"""
from __future__ import annotations

from pathlib import Path

from .base import FINAL, Logger, figure_name, flat, numbers


class TensorBoardLogger(Logger):
    name = "tensorboard"

    @staticmethod
    def check(opts):
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (fails without tensorboard)
        return opts

    def start(self, run, resume_step, rows):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = Path(self.opts.root) / "tensorboard" / run.run_id
        self.epochs = SummaryWriter(str(self.dir), purge_step=1)
        self.purge_steps = resume_step + 1
        self.steps = None  # opened at the first step point: the report's run has none
        self.last_epoch = 0
        self.session_end = None
        experiment, session_start, session_end = hparams(
            flat({**run.config, **{f"tag.{k}": v for k, v in run.tags.items()}}), {f"summary/{FINAL}": 0.0})
        if run.config:  # the report's run has none
            for summary in (experiment, session_start):
                self.epochs.file_writer.add_summary(summary)
            self.session_end = session_end
        for row in rows:
            self.log_epoch(row["epoch"], row)
        self.epochs.flush()

    def log_step(self, step, values):
        from torch.utils.tensorboard import SummaryWriter

        if self.steps is None:
            self.steps = SummaryWriter(str(self.dir / "steps"), purge_step=self.purge_steps)
        for name, value in values.items():
            self.steps.add_scalar(f"step/{name}", value, step)
        self.steps.flush()  # a write, no fsync: what is logged survives a killed process

    def log_epoch(self, epoch, row):
        for name, value in numbers(row).items():
            self.epochs.add_scalar(f"epoch/{name}", value, epoch)
        self.epochs.flush()
        self.last_epoch = epoch

    def summary(self, values):
        for name, value in values.items():
            self.epochs.add_scalar(f"summary/{name}", value, self.last_epoch)

    def artifacts(self, paths):
        from matplotlib.image import imread

        step = max(1, self.last_epoch)
        for path in paths:  # TensorBoard takes images (one tag per figure) and Markdown text
            if path.suffix == ".png":
                self.epochs.add_image(figure_name(path), imread(path), step, dataformats="HWC")
            elif path.suffix == ".md":
                self.epochs.add_text(path.stem, path.read_text(), step)

    def close(self, state):
        if state in ("done", "diverged") and self.session_end is not None:
            self.epochs.file_writer.add_summary(self.session_end)
        self.epochs.close()
        if self.steps is not None:
            self.steps.close()
