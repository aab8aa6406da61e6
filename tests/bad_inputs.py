"""The catalogue of inputs normlab refuses: one source for tests/test_bad_input.py (which runs
every Case and checks the refusal) and for docs/bad-input.md (scripts/bad_input_catalogue.py
writes it, with the line each Case really gets).

A Case is a command line, with an optional set-up that makes the files it needs; `{tmp}` in its
arguments is a fresh directory, `{data}` a tiny CIFAR-10 copy in it, `{file}` a plain file. A
refusal is: exit code 2, one line on stderr that contains `expect`, no traceback, and no new
file anywhere under {tmp}. Inputs that need another process, a signal or a cluster to refuse
are tested elsewhere: the entry names the test, and test_bad_input.py checks that it exists.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from conftest import write_cifar_fixture

TRAIN = ["train", "--epochs", "1", "--out", "{tmp}/runs"]
REPRODUCE = ["reproduce", "--dry-run", "--out", "{tmp}/results"]
SEARCH = ["search-groups", "--quick", "--epochs", "2", "--out", "{tmp}/search"]


@dataclass
class Case:
    id: str
    what: str
    args: list[str]
    expect: str
    setup: Callable[[Path], None] | None = None
    area: str = "command line"


@dataclass
class Elsewhere:
    id: str
    what: str
    expect: str
    test: str               # tests/<file>.py::<test function>
    area: str = "command line"
    notes: list[str] = field(default_factory=list)


def data(tmp: Path) -> Path:
    return write_cifar_fixture(tmp / "data")


def damaged_batch(content) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        with open(data(tmp) / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
            f.write(content) if isinstance(content, bytes) else pickle.dump(content, f)
    return setup


def preset(text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "mine.yaml").write_text(text)
    return setup


def study_json(text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "results").mkdir()
        (tmp / "results" / "study.json").write_text(text)
    return setup


def results_directory(tmp: Path) -> None:
    (tmp / "results").mkdir()


def preset_directory(tmp: Path) -> None:
    (tmp / "presets").mkdir()


def missing_data_dir(tmp: Path) -> None:
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("not empty, so no download is tried")


# -- what an attacker plants (issue 18): links to a victim's file, FIFOs, huge sparse files, pickles
class Planted:
    """Unpickling this object calls open(canary, 'w'): it would create a file (the catalogue
    checks that no new file appears)."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def replace_batch(how: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        batch = data(tmp) / "cifar-10-batches-py" / "data_batch_2"
        batch.unlink()
        if how == "planted":
            batch.write_bytes(pickle.dumps({b"data": Planted(tmp / "canary"), b"labels": [0]}, protocol=2))
        elif how == "fifo":
            os.mkfifo(batch)
        else:
            with open(batch, "wb") as f:
                f.truncate(300 << 20)  # sparse: no disk used
    return setup


def default_run(tmp: Path) -> Path:
    """The run directory TRAIN would train into."""
    from normlab.config import RunConfig
    return tmp / "runs" / RunConfig(epochs=1).normalized().run_id()


def run_with(name: str, how: str) -> Callable[[Path], None]:
    """TRAIN's run directory with `name` planted: a link to a victim's file or directory, or text."""
    def setup(tmp: Path) -> None:
        run = default_run(tmp)
        victim = tmp / "victim"
        victim.mkdir()
        (victim / "thesis.txt").write_text("a victim's file")
        if name == "run":
            run.parent.mkdir()
            run.symlink_to(victim, target_is_directory=True)
            return
        run.mkdir(parents=True)
        if how == "link":
            (run / name).symlink_to(victim / "thesis.txt")
        else:
            (run / name).write_text(how)
            (run / ".lock").write_text("")  # as a run that was opened before leaves it
    return setup


def figures_link(tmp: Path) -> None:
    from normlab import rundir
    from normlab.config import RunConfig
    cfg = RunConfig(model="resnet56", epochs=1)
    run = tmp / "results" / cfg.run_id()
    run.mkdir(parents=True)
    rundir.write_json(run / rundir.CONFIG, {"run_id": cfg.run_id(), "config": cfg.to_dict()})
    rundir.write_metrics(run / rundir.METRICS, [{"epoch": 1, "train_error": 50.0, "test_error": 50.0}])
    rundir.write_json(run / rundir.STATUS, {"state": "done"})
    (tmp / "thesis").mkdir()
    (tmp / "thesis" / "figure.png").write_bytes(b"a thesis figure")
    (tmp / "results" / "figures").symlink_to(tmp / "thesis", target_is_directory=True)


def damaged_journal(tmp: Path) -> None:
    search = tmp / "search"
    (search / "locks").mkdir(parents=True)
    for name in ("journal.lock", "queue.lock"):
        (search / "locks" / name).write_text("")
    (search / "optuna.journal").write_text('{"op_code": 0, "worker_id": "w", "study_name": "search-groups", '
                                           '"directions": [1]}\n{not json\n{"op_code": 0}\n')


def fifo_preset(tmp: Path) -> None:
    os.mkfifo(tmp / "mine.yaml")


ALIASES = "\n".join(["a: &a [bn, bn, bn, bn, bn, bn, bn, bn, bn, bn]"] +
                    [f"{k}: &{k} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                     for p, k in zip("abcdefgh", "bcdefghi")] + ["studies: {s: [{norm: *i}]}"])
HUGE_GRID = "studies:\n  s:\n    - {" + ", ".join(f"{k}: [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]" for k in (
    "epochs", "batch_size", "base_batch", "step_size", "seed", "val_split", "warmup_epochs", "base_lr",
    "momentum", "weight_decay")) + "}\n"


CASES: list[Case | Elsewhere] = [
    # -- what to train ---------------------------------------------------------------------
    Case("model-unknown", "a model that is not a CIFAR ResNet of depth 6n+2", TRAIN + ["--model", "resnet21"], "unknown model 'resnet21'"),
    Case("model-other", "a model of another family", TRAIN + ["--model", "vgg"], "unknown model 'vgg'"),
    Case("norm-unknown", "an unknown norm spec", TRAIN + ["--norm", "foo"], "unknown norm 'foo'"),
    Case("norm-indivisible", "a group count that does not divide a layer", TRAIN + ["--norm", "gn:5"], "divides the 16 channels"),
    Case("norm-cpg-indivisible", "channels per group that do not divide a layer", TRAIN + ["--norm", "gn:cpg=3"], "choose cpg from"),
    Case("norm-argument", "an argument on a norm that takes none", TRAIN + ["--norm", "ln:4"], "takes no such argument"),
    Case("norm-no-such-argument", "an argument on a norm that takes none (FRN)", TRAIN + ["--norm", "frn:4"],
         "norm 'frn:4' takes no such argument"),
    Case("evonorm-indivisible", "an EvoNorm-S0 group count that does not divide a layer", TRAIN + ["--norm", "evonorm-s0:5"],
         "divides the 16 channels of a layer (layer norm1); choose G from: 1, 2, 4, 8, 16"),
    Case("ws-unknown-base", "+ws on an unknown norm", TRAIN + ["--norm", "foo+ws"], "+ws modifies one of"),
    Case("ablation-elsewhere", "an ablation on a norm that has none (Batch Renorm)", TRAIN + ["--norm", "brn:mean-only"],
         "mean-only applies to bn, gn, ln and in only"),
    Case("ablation-twice", "two ablations on one norm", TRAIN + ["--norm", "bn:mean-only:scale-only"],
         "takes one ablation, at the end"),
    Case("none-ws", "Weight Standardization without a norm", TRAIN + ["--norm", "none+ws"],
         "WS without a norm after the conv"),
    Case("none-argument", "an argument on none other than skipinit", TRAIN + ["--norm", "none:4"],
         "use none or none:skipinit"),
    Case("brn-one-image", "Batch Renorm at 1 image per device", TRAIN + ["--norm", "brn", "--batch-size", "1"],
         "BRN cannot train on 1 image"),
    Case("evonorm-b0-one-image", "EvoNorm-B0 at 1 image per device", TRAIN + ["--norm", "evonorm-b0", "--batch-size", "1"],
         "EvoNorm-B0 cannot train on 1 image"),
    Case("brn-option-elsewhere", "a Batch Renorm setting for another norm", TRAIN + ["--norm", "bn", "--brn-r-max", "2"],
         "--brn-r-max applies to Batch Renorm only"),
    Case("brn-d-max-negative", "a negative Batch Renorm d_max", TRAIN + ["--norm", "brn", "--brn-d-max", "-1"], "--brn-d-max >= 0"),
    Case("precise-bn-no-statistics", "--precise-bn with a norm without running statistics",
         TRAIN + ["--norm", "gn:16", "--precise-bn", "512"], "which gn:16 does not keep"),
    Case("precise-bn-zero", "--precise-bn 0", TRAIN + ["--norm", "bn", "--precise-bn", "0"],
         "--precise-bn must be a positive number of training images, got 0"),
    Case("precise-bn-negative", "a negative --precise-bn", TRAIN + ["--norm", "bn", "--precise-bn", "-3"],
         "--precise-bn must be a positive number"),
    Case("precise-bn-too-many", "--precise-bn above the training set", TRAIN + ["--norm", "bn", "--precise-bn", "1000000"],
         "needs between 32 (one device batch) and 4000"),
    Case("batch-zero", "batch size 0", TRAIN + ["--batch-size", "0"], "--batch-size must be a positive"),
    Case("batch-negative", "a negative batch size", TRAIN + ["--batch-size", "-3"], "--batch-size must be a positive"),
    Case("batch-not-a-number", "a batch size that is not a number", TRAIN + ["--batch-size", "x"], "invalid int value"),
    Case("batch-larger-than-data", "a batch larger than the training set", TRAIN + ["--batch-size", "5000"], "lower --batch-size"),
    Case("batch-larger-than-data-virtual", "virtual GPUs whose step is larger than the training set",
         TRAIN + ["--batch-size", "600", "--virtual-gpus", "8"], "one step needs 4,800 images (8 x 600)"),
    Case("bn-one-image", "BN at 1 image per device", TRAIN + ["--norm", "bn", "--batch-size", "1"], "BN cannot train on 1 image"),
    Case("seed-out-of-range", "a seed of 2^32 or more", TRAIN + ["--seed", "4294967296"], "--seed must be from 0 to 4294967295"),
    Case("seed-negative", "a negative seed", TRAIN + ["--seed", "-1"], "--seed must be from 0 to 4294967295"),
    Case("model-too-deep", "a model deeper than resnet1202", TRAIN + ["--model", "resnet6000002"], "deeper than any normlab builds"),
    Case("number-too-large", "a whole number of 40 digits", TRAIN + ["--batch-size", "9" * 40], "beyond any sensible value"),
    Case("epochs-zero", "0 epochs", TRAIN + ["--epochs", "0"], "--epochs must be a positive"),
    Case("epochs-absurd", "an absurd number of epochs", TRAIN + ["--epochs", "1000000000"], "beyond any sensible run"),
    Case("lr-zero", "learning rate 0", TRAIN + ["--base-lr", "0"], "--base-lr must be a positive"),
    Case("lr-negative", "a negative learning rate", TRAIN + ["--base-lr", "-0.1"], "--base-lr must be a positive"),
    Case("lr-nan", "a learning rate that is NaN", TRAIN + ["--base-lr", "nan"], "--base-lr must be a finite number"),
    Case("momentum-negative", "a negative momentum", TRAIN + ["--momentum", "-0.9"], "--momentum must not be negative"),
    Case("weight-decay-inf", "an infinite weight decay", TRAIN + ["--weight-decay", "inf"], "--weight-decay must be a finite number"),
    Case("virtual-gpus-zero", "0 virtual GPUs", TRAIN + ["--virtual-gpus", "0"], "--virtual-gpus must be a positive"),
    Case("milestones-missing", "the multistep schedule without milestones", TRAIN + ["--schedule", "multistep"], "needs --milestones"),
    Case("schedule-unknown", "an unknown schedule", TRAIN + ["--schedule", "linear"], "invalid choice"),
    Case("warmup-form", "a warm-up in neither epochs nor steps", TRAIN + ["--warmup", "400x"], "--warmup 400x: give a length"),
    Case("warmup-shape", "an unknown warm-up shape", TRAIN + ["--warmup", "2:cosine"], "optionally followed by :linear or :constant"),
    Case("warmup-too-long", "a warm-up longer than the run", TRAIN + ["--warmup", "5"], "is longer than the run"),
    Case("warmup-factor-zero", "a warm-up factor of 0", TRAIN + ["--warmup", "1", "--warmup-factor", "0"],
         "the warm-up factor must be in (0, 1]"),
    Case("val-split-all", "a validation split that leaves no training images", TRAIN + ["--val-split", "4000"], "leaves no training images"),
    Case("sync-bn-no-batch-statistics", "--sync-bn with a norm that has no batch statistics",
         TRAIN + ["--norm", "gn:4", "--sync-bn", "--virtual-gpus", "2"], "--sync-bn synchronises BN's batch statistics"),
    Case("sync-bn-not-bn", "--sync-bn with a batch-dependent norm other than BN",
         TRAIN + ["--norm", "brn", "--sync-bn", "--virtual-gpus", "2"], "but norm 'brn' is not BN"),
    Case("sync-bn-precise-bn", "--sync-bn with --precise-bn",
         TRAIN + ["--norm", "bn", "--sync-bn", "--virtual-gpus", "2", "--precise-bn", "512"], "--precise-bn with --sync-bn"),
    Case("sync-bn-ablation", "--sync-bn with an ablation of BN",
         TRAIN + ["--norm", "bn:mean-only", "--sync-bn", "--virtual-gpus", "2"], "is BN's mean-only ablation"),
    Case("sync-bn-one-device", "--sync-bn on one device", TRAIN + ["--norm", "bn", "--sync-bn"], "--sync-bn needs several devices"),
    # -- how to run --------------------------------------------------------------------------
    Case("threads-zero", "0 CPU threads", TRAIN + ["--threads", "0"], "--threads must be positive"),
    Case("checkpoint-every-zero", "checkpoints every 0 minutes", TRAIN + ["--checkpoint-every", "0"], "--checkpoint-every must be a positive"),
    Case("log-unknown", "a tracking tool normlab does not log to", TRAIN + ["--log", "comet"], "unknown tool 'comet'"),
    Case("log-unknown-in-list", "an unknown tool in a list", REPRODUCE + ["--log", "tensorboard,neptune"],
         "unknown tool 'neptune'"),
    Case("log-every-zero", "training-loss points every 0 steps", TRAIN + ["--log-every", "0"],
         "--log-every must be a positive"),
    Case("device-unknown", "an unknown device", TRAIN + ["--device", "tpu"], "unknown device 'tpu'"),
    Case("device-cuda-missing", "--device cuda without CUDA (or cuda:7 on a one-GPU machine)",
         TRAIN + ["--device", "cuda:7"], "use --device"),
    # -- GPU ----------------------------------------------------------------------------------------
    Case("device-cuda-unavailable", "--device cuda on a machine without CUDA", TRAIN + ["--device", "cuda"],
         "CUDA is not available; use --device cpu", area="GPU"),
    Elsewhere("device-index-beyond-gpus", "--device cuda:7 on a one-GPU machine",
              "this machine has 1 GPU(s), cuda:0 to cuda:0; use one of those",
              "tests/test_gpu.py::test_a_gpu_index_beyond_the_machines_is_refused", area="GPU"),
    Elsewhere("gpu-out-of-memory", "a step (or an evaluation batch) too large for the GPU's memory, found by one "
              "trial step before any run directory exists (scripts/gpu-check.sh tries it on a GPU)",
              "out of GPU memory on cuda:K (its size) in one training step: MODEL at K x N images per step does not "
              "fit; lower --batch-size or --virtual-gpus",
              "tests/test_gpu.py::test_out_of_memory_is_refused_in_one_line_and_leaves_the_model_as_it_was", area="GPU"),
    Case("fast-path-off-cuda", "--fast-path graph on the CPU", TRAIN + ["--device", "cpu", "--fast-path", "graph"],
         "--fast-path graph needs a CUDA device", area="GPU"),
    Case("fast-path-unknown", "an unknown fast path", TRAIN + ["--fast-path", "warp"], "invalid choice", area="GPU"),
    Case("out-under-a-file", "an output directory under a plain file", ["train", "--epochs", "1", "--out", "{file}/runs"],
         "choose a writable --out", area="files"),
    # -- data ----------------------------------------------------------------------------------
    Case("data-unknown", "an unknown data set", TRAIN + ["--data", "imagenet"], "invalid choice", area="data"),
    Case("data-offline", "no data and no network to download it",
         TRAIN + ["--data", "cifar10", "--data-dir", "{tmp}/nowhere/cifar"], "download", area="data"),
    Case("data-dir-is-a-file", "--data-dir pointing at a file", TRAIN + ["--data", "cifar10", "--data-dir", "{file}"],
         "is a file", area="data"),
    Case("data-missing", "a data directory without the data set", TRAIN + ["--data", "cifar10", "--data-dir", "{tmp}/other"],
         "no cifar-10-batches-py/ in", missing_data_dir, area="data"),
    Case("data-corrupt", "a batch file that is not a pickle", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "data_batch_2 is corrupt or truncated", damaged_batch(b"garbage"), area="data"),
    Case("data-shape", "images of the wrong shape", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "expected (N, 3072) uint8", damaged_batch({b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5}), area="data"),
    Case("data-labels", "labels outside the classes", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "labels outside 0..9", damaged_batch({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 10]}), area="data"),
    Case("data-label-count", "fewer labels than images", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "4 labels for 5 images", damaged_batch({b"data": np.zeros((5, 3072), np.uint8), b"labels": [0] * 4}), area="data"),
    Case("data-dir-sample", "--data-dir for a run on the bundled sample (it would be ignored)",
         TRAIN + ["--data-dir", "{data}"], "add --data cifar10 (or cifar100), or leave out --data-dir", area="data"),
    Case("data-dir-sample-study", "--data-dir for a study on the bundled sample",
         REPRODUCE + ["--data-dir", "{data}"], "add --set data=cifar10 (or cifar100), or leave out --data-dir", area="data"),
    Case("data-dir-sample-search", "--data-dir for a search on the bundled sample",
         SEARCH + ["--data-dir", "{data}"], "these runs train on the bundled sample", area="data"),
    Case("data-planted-pickle", "a batch file holding a pickle that would run code", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "is not a CIFAR batch: it asks to load io.open", replace_batch("planted"), area="data"),
    Case("data-fifo", "a batch file that is a FIFO (never waited on)", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "data_batch_2 is a FIFO, not a regular file", replace_batch("fifo"), area="data"),
    Case("data-huge", "a batch file of 300 MiB (sparse)", TRAIN + ["--data", "cifar10", "--data-dir", "{data}"],
         "more than the 256.0 MiB normlab reads of it", replace_batch("huge"), area="data"),
    Elsewhere("data-checksum", "a downloaded archive whose MD5 is wrong", "checksum mismatch for the downloaded",
           "tests/test_faults.py::test_checksum_mismatch_on_download", area="data"),
    # -- studies and presets -------------------------------------------------------------------
    Case("preset-unknown", "an unknown preset", REPRODUCE + ["--preset", "nope"], "unknown preset 'nope'", area="presets"),
    Case("preset-directory", "a preset that is a directory", REPRODUCE + ["--preset", "{tmp}/presets"], "is a directory",
         preset_directory, area="presets"),
    Case("preset-yaml", "a preset that is not valid YAML", REPRODUCE + ["--preset", "{tmp}/mine.yaml"], "is not valid YAML",
         preset("base: [\n"), area="presets"),
    Case("preset-key", "an unknown key in a preset", REPRODUCE + ["--preset", "{tmp}/mine.yaml"], "unknown key 'wokers'",
         preset("studies: {a: [{norm: [bn]}]}\nwokers: 2\n"), area="presets"),
    Case("preset-run-key", "an unknown run setting in a preset", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "unknown key 'modle'", preset("base: {modle: resnet20}\nstudies: {a: [{norm: [bn]}]}\n"), area="presets"),
    Case("preset-type", "a run setting of the wrong type in a preset", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "'epochs' must be int", preset("base: {epochs: ten}\nstudies: {a: [{norm: [bn]}]}\n"), area="presets"),
    Case("preset-studies", "a preset whose studies are not a mapping", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "'studies' must map", preset("studies: [1, 2]\n"), area="presets"),
    Case("preset-probes", "a preset whose probes setting is not true or false", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "'probes' must be true or false", preset("probes: sometimes\nstudies: {a: [{norm: [bn]}]}\n"), area="presets"),
    Case("preset-rule", "a preset rule naming an unknown setting", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "'modle', which is not a run setting",
         preset("rules: [{when: {modle: resnet8}, set: {epochs: 2}}]\nstudies: {a: [{norm: [bn]}]}\n"), area="presets"),
    Case("preset-aliases", "a preset with YAML aliases (600 bytes standing for billions of values)",
         REPRODUCE + ["--preset", "{tmp}/mine.yaml"], "aliases (*name) are not supported", preset(ALIASES), area="presets"),
    Case("preset-too-many-runs", "a preset whose grid has 10^10 runs", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "more than the 10,000 runs normlab runs in one study", preset(HUGE_GRID), area="presets"),
    Case("preset-huge-number", "a number of 5,000 digits in a preset", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "holds a value normlab cannot read", preset("base: {epochs: 1" + "0" * 5000 + "}\nstudies: {s: [{norm: [bn]}]}\n"),
         area="presets"),
    Case("preset-nesting", "a preset nested 5,000 deep", REPRODUCE + ["--preset", "{tmp}/mine.yaml"], "nested too deeply",
         preset("[" * 5000 + "]" * 5000 + "\n"), area="presets"),
    Case("preset-fifo", "a preset that is a FIFO (never waited on)", REPRODUCE + ["--preset", "{tmp}/mine.yaml"],
         "mine.yaml is a FIFO, not a regular file", fifo_preset, area="presets"),
    Case("preset-seed-range", "a preset whose seeds run past 2^32 - 1", REPRODUCE + ["--preset", "{tmp}/mine.yaml", "--seeds", "2"],
         "--seed must be from 0 to 4294967295", preset("base: {seed: 4294967295}\nstudies: {s: [{norm: [bn]}]}\n"),
         area="presets"),
    Case("seeds-too-many", "--seeds 100000000", REPRODUCE + ["--seeds", "100000000"], "at most 1,000", area="presets"),
    Case("seeds-zero", "0 seeds", REPRODUCE + ["--seeds", "0"], "--seeds must be a positive", area="presets"),
    Case("workers-zero", "0 workers", REPRODUCE + ["--workers", "0"], "--workers must be a positive", area="presets"),
    Case("only-unknown", "a study the preset does not have", REPRODUCE + ["--only", "colours"], "no study 'colours'", area="presets"),
    Case("set-key", "--set of an unknown setting", REPRODUCE + ["--set", "colour=red"], "unknown key 'colour'", area="presets"),
    Case("set-type", "--set of a value of the wrong type", REPRODUCE + ["--set", "epochs=x"], "'epochs' must be int", area="presets"),
    Case("set-form", "--set without '='", REPRODUCE + ["--set", "epochs"], "--set expects key=value", area="presets"),
    Case("set-nan", "--set of a NaN", REPRODUCE + ["--set", "base_lr=.nan"], "--base-lr must be a finite number", area="presets"),
    Case("set-inf", "--set of an infinite value", REPRODUCE + ["--set", "momentum=.inf"], "--momentum must be a finite number", area="presets"),
    Case("set-epochs-absurd", "--set of an absurd number of epochs", REPRODUCE + ["--set", "epochs=1000000000"],
         "beyond any sensible run", area="presets"),
    Case("set-virtual-gpus-zero", "--set virtual_gpus=0", REPRODUCE + ["--set", "virtual_gpus=0"], "--virtual-gpus must be a positive", area="presets"),
    Case("batch-sizes-zero", "a batch size 0 in --batch-sizes", REPRODUCE + ["--batch-sizes", "32,0"], "--batch-sizes must be positive", area="presets"),
    Case("reproduce-out-under-a-file", "a study's output under a plain file",
         ["reproduce", "--out", "{file}/results", "--quiet"], "writable --out", area="files"),
    # -- run and results directories ------------------------------------------------------------
    Elsewhere("run-other-config", "a run directory holding another config", "holds a run with a different config",
           "tests/test_faults.py::test_changed_config_is_refused_then_forced", area="files"),
    Elsewhere("run-busy", "a run another process is training", "is being trained by another process",
           "tests/test_distributed.py::test_errors_of_rank_0_alone_stop_every_rank", area="files"),
    Elsewhere("checkpoint-planted", "a checkpoint holding code (a planted pickle)", "holds objects other than tensors",
           "tests/test_checkpoint.py::test_a_planted_pickle_never_runs", area="files"),
    Elsewhere("checkpoint-changed", "a checkpoint that does not match its recorded SHA-256",
           "does not match the SHA-256 recorded", "tests/test_checkpoint.py::test_a_changed_checkpoint_is_refused", area="files"),
    Elsewhere("disk-full", "a full disk", "no space left to write",
           "tests/test_faults.py::test_full_disk_is_one_line_and_keeps_existing_results", area="files"),
    Elsewhere("diverged", "a run whose loss becomes NaN (exit 2, its epochs kept)", "diverged in epoch",
           "tests/test_faults.py::test_diverging_train_is_one_line_exit_2", area="files"),
    Case("run-lock-link", "a run's .lock that is a symbolic link (its target would be truncated)", TRAIN,
         ".lock is a symbolic link", run_with(".lock", "link"), area="files"),
    Case("run-directory-link", "a run directory that is a symbolic link (to another project's)", TRAIN,
         "is a symbolic link", run_with("run", "link"), area="files"),
    Case("run-config-not-normlabs", "a run's config.json that is JSON but not an object (a list)", TRAIN,
         "config.json is not normlab's", run_with("config.json", "[1, 2]"), area="files"),
    Elsewhere("run-file-huge", "a config.json, metrics.csv, status.json or checkpoint.pt of hundreds of MiB (sparse)",
              "more than the", "tests/test_hostile_files.py::test_a_huge_sparse_checkpoint_is_refused_before_it_is_read", area="files"),
    Elsewhere("checkpoint-structure", "a checkpoint of the wrong structure with a matching SHA-256 (keys, types, "
              "shapes, views of a tiny storage, epochs, data order, optimizer, generator, another run's config)",
              "is not a checkpoint of this run", "tests/test_hostile_inputs.py::test_a_checkpoint_of_the_wrong_structure_is_one_line",
              area="files"),
    Elsewhere("search-link", "the search's trials.log, optuna.journal or locks/ that is a symbolic link", "is a symbolic link",
              "tests/test_hostile_files.py::test_the_search_never_writes_through_a_link", area="files"),
    Case("search-journal-damaged", "a line of the search's journal that is not Optuna's", SEARCH,
         "optuna.journal holds a line that is not JSON", damaged_journal, area="files"),
    Case("report-figures-link", "a report's figures/ that is a symbolic link (to a thesis' figures)", ["report", "{tmp}/results"],
         "figures is a symbolic link", figures_link, area="report"),
    Case("report-missing", "a results directory that does not exist", ["report", "{tmp}/nowhere"], "is not a directory", area="report"),
    Case("report-file", "a results directory that is a file", ["report", "{file}"], "is not a directory", area="report"),
    Case("report-empty", "a results directory without runs", ["report", "{tmp}/results"], "no runs in", results_directory, area="report"),
    Case("report-study-json", "a study.json that is not valid JSON", ["report", "{tmp}/results"], "study.json is not valid JSON",
         study_json("{ not json"), area="report"),
    Case("report-references-missing", "--references naming no file", ["report", "{tmp}/results", "--references", "{tmp}/refs.yaml"],
         "--references", results_directory, area="report"),
    Case("report-flat-margin", "a flat margin of 0 or less", ["report", "{tmp}/results", "--flat-margin", "0"],
         "--flat-margin must be a positive", results_directory, area="report"),
    Elsewhere("report-read-only", "a results directory the report cannot write into", "cannot write the report into",
           "tests/test_bad_input.py::test_a_read_only_results_directory_is_reported_elsewhere", area="report"),
    # -- torchrun -----------------------------------------------------------------------------
    Elsewhere("torchrun-small-data", "torchrun with a training set smaller than one step of all ranks",
           "one step needs 32 images (2 devices x 16)", "tests/test_distributed.py::test_bad_input_on_two_ranks", area="torchrun"),
    Elsewhere("torchrun-virtual-gpus", "--virtual-gpus other than the number of processes under torchrun",
           "--virtual-gpus 3 under torchrun with 2 processes", "tests/test_distributed.py::test_bad_input_on_two_ranks", area="torchrun"),
    Elsewhere("torchrun-uneven-data", "ranks reading different data (they would take different numbers of steps)",
           "rank 1 has training images 25 but rank 0 has 20", "tests/test_distributed.py::test_bad_input_on_two_ranks", area="torchrun"),
    # -- bench and search ------------------------------------------------------------------------
    Case("bench-steps-zero", "0 timed steps", ["bench", "--steps", "0"], "--steps must be a positive", area="bench"),
    Case("bench-force", "bench with an option of the training commands (--force, --checkpoint-every, --data-dir)",
         ["bench", "--force"], "unrecognized arguments: --force", area="bench"),
    Case("bench-warmup-negative", "negative warm-up steps", ["bench", "--warmup", "-1"], "--warmup must be 0 or more", area="bench"),
    Case("search-one-candidate", "a search with fewer than two candidates", SEARCH + ["--candidates", "ln,gn:1"],
         "needs at least two", area="search"),
    Case("search-no-validation", "a search without a validation split", SEARCH + ["--val-split", "0"],
         "held-out validation split", area="search"),
    Case("search-budget", "a budget too small for one rung", SEARCH + ["--epochs", "1"], "too small for one rung", area="search"),
    Case("search-seeds", "a search with one seed", SEARCH + ["--seeds", "1"], "--seeds must be 2 or more", area="search"),
]


def run(case: Case, tmp: Path) -> tuple[int, str, list[Path]]:
    """Run a case in tmp (offline): (exit code, stderr, files it created)."""
    from normlab.cli import main

    (tmp / "file").write_text("a plain file")
    if case.setup:
        case.setup(tmp)
    names = {"{tmp}": str(tmp), "{data}": str(tmp / "data"), "{file}": str(tmp / "file")}
    args = []
    for arg in case.args:
        for key, value in names.items():
            arg = arg.replace(key, value)
        args.append(arg)
    before = {p for p in tmp.rglob("*") if p.is_file()}
    stdout, stderr = io.StringIO(), io.StringIO()
    online = urllib.request.urlopen
    urllib.request.urlopen = offline
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(args)
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
    finally:
        urllib.request.urlopen = online
    created = sorted(p for p in tmp.rglob("*") if p.is_file() and p not in before)
    return code, stderr.getvalue(), created


def offline(*args, **kwargs):
    raise OSError("offline (the bad-input catalogue never downloads)")
