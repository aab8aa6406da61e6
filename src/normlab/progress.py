"""The live display of a study: runs done / total, each running run's epoch, and an ETA."""
from __future__ import annotations

from tqdm import tqdm

from . import rundir
from .study import Study, images_per_run


class StudyDisplay:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def start(self, study: Study, results: dict, pending: list[str]) -> None:
        self.study = study
        self.total_runs = len(study.runs)
        self.finished = self.total_runs - len(pending)
        self.running: dict[str, str] = {}
        self.done_images: dict[str, int] = {}
        self.start_epoch, self.estimate = {}, {}
        for rid in pending:
            cfg = study.runs[rid]
            trained, _ = images_per_run(cfg)  # from the data set's nominal size
            self.start_epoch[rid] = results[rid].get("epoch") or 0
            self.estimate[rid] = trained * (cfg.epochs - self.start_epoch[rid]) // cfg.epochs
        total = sum(self.estimate.values())
        print(f"{study.name}: {self.total_runs} runs, {self.finished} already finished, "
              f"{len(pending)} to run ({total / 1e6:.2f} M training images)")
        self.bar = tqdm(total=total, unit="img", unit_scale=True, dynamic_ncols=True,
                        disable=not self.enabled or not pending, smoothing=0.05)
        self._describe()

    def _describe(self) -> None:
        self.bar.set_description(f"{self.finished}/{self.total_runs} runs done", refresh=False)
        self.bar.set_postfix_str("  ".join(f"{rid.rsplit('-', 1)[0]} {state}"
                                           for rid, state in self.running.items()), refresh=False)
        self.bar.refresh()

    def begin(self, run_id: str) -> None:
        self.running[run_id] = "starting"
        self._describe()

    def progress(self, run_id: str, epoch: int, step: int, steps: int) -> None:
        cfg = self.study.runs[run_id]
        if run_id in self.estimate:  # now the real steps per epoch are known: correct the total
            start = self.start_epoch.get(run_id, 0)
            self.bar.total += (cfg.epochs - start) * steps * cfg.images_per_step - self.estimate.pop(run_id)
        images = ((epoch - self.start_epoch.get(run_id, 0)) * steps + step) * cfg.images_per_step
        self.bar.update(max(0, images - self.done_images.get(run_id, 0)))
        self.done_images[run_id] = max(images, self.done_images.get(run_id, 0))
        self.running[run_id] = f"ep {min(epoch + 1, cfg.epochs)}/{cfg.epochs}"
        self._describe()

    def defer(self, run_id: str) -> None:
        """The run is being trained by another process: this one waits for it."""
        self.running.pop(run_id, None)
        self.bar.write(f"{run_id}: being trained by another process; waiting for it")
        self._describe()

    def end(self, run_id: str, status: dict) -> None:
        self.running.pop(run_id, None)
        state = status.get("state")
        if state in rundir.FINISHED:
            self.finished += 1
        summary = status.get("summary") or {}
        detail = ""
        if "median_final5_test_error" in summary:
            k = summary.get("final_epochs", 5)
            detail = (f", test error {summary['median_final5_test_error']:.2f}% "
                      f"({'the final epoch' if k == 1 else f'median of the final {k} epochs'})")
        if status.get("error"):
            detail = f": {status['error']}"
        self.bar.write(f"{run_id}: {state}{detail}")
        self._describe()

    def close(self) -> None:
        if hasattr(self, "bar"):
            self.bar.close()
