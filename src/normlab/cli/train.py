"""normlab train: one run (or, under torchrun, one run on K processes)."""
from __future__ import annotations

import sys
import dataclasses
from pathlib import Path

from .. import rundir
from ..errors import NormlabError
from ..precision import describe as describe_precision
from .options import add_log_options, add_run_options, add_runtime_options, check_data_dir, log_options, run_config, runtime_options


def cmd_train(args) -> int:
    from ..train import ranks as distributed

    group = distributed.join(args.device)  # under torchrun: this process's rank
    try:
        code = train_run(args, group)
    except Exception as err:
        if group.world > 1 and distributed.lost_peer(err):  # a broken group is not torn down
            raise NormlabError(f"rank {group.rank}: another process of this torchrun group failed or "
                               f"was killed ({distributed.first_line(err)}); run the same torchrun "
                               f"command again to resume from the last checkpoint") from None
        group.close()  # every rank is here: errors and stops are agreed
        raise
    group.close()
    return code


def train_run(args, group) -> int:
    from tqdm import tqdm

    from ..train import start

    with group.agreed():
        cfg = run_config(args, group.world)
        cfgs = [dataclasses.replace(cfg, seed=s) for s in args.seeds] if args.seeds else [cfg]
        for c in cfgs:
            c.validate()
        check_data_dir(args.data_dir, [cfg.data], "add --data cifar10 (or cifar100)")
        opts = runtime_options(args)
        if group.device is not None:
            opts.device = str(group.device)
        opts.progress = opts.progress and group.writer
        if group.writer:  # under torchrun only rank 0 logs
            opts.log = log_options(args, args.out, "train")
    out = Path(args.out)
    rundir.confine(out)  # no link followed below the results directory
    run = start(group, cfgs, [out / c.run_id() for c in cfgs], opts, args.force)
    if group.writer:
        print(describe_precision(run.amp, run.amp_reason))
        if len(cfgs) > 1:
            print(f"training seeds {', '.join(str(c.seed) for c in cfgs)} as one array of {len(cfgs)} runs")
        for member in run.members:
            said = resumed(member, run.steps, cfg.epochs)
            if said:
                print(f"{member.dir}: {said}", flush=True)
    name = cfgs[0].run_id() if len(cfgs) == 1 else f"{len(cfgs)} runs"
    bar = tqdm(total=cfg.epochs * run.steps, unit="step", disable=not opts.progress, desc=name,
               dynamic_ncols=True)

    def on_progress(r):
        bar.n = r.epoch * r.steps + r.step
        bar.set_postfix_str(f"epoch {r.epoch + 1}/{cfg.epochs}", refresh=False)
        bar.update(0)

    def on_epoch(r, member, row):
        who = f"seed {member.cfg.seed}  " if len(cfgs) > 1 else ""
        bar.write(f"{who}epoch {row['epoch']:>3}  lr {row['lr']:.4g}  train err {row['train_error']:5.2f}%  "
                  f"test err {row['test_error']:5.2f}%  {row['images_per_s']:.0f} img/s")

    from ..train.control import working
    with run, working():  # a signal now checkpoints the runs (exit 75)
        bar.n = run.epoch * run.steps
        statuses = run.run(on_progress, on_epoch if group.writer else None)
    bar.close()
    code = 0
    for c in cfgs:
        status = statuses[c.run_id()]
        summary = status.get("summary", {})
        where = out / c.run_id()
        if status["state"] == "diverged":
            print(f"normlab: error: {where} diverged in epoch {status.get('diverged_in_epoch')} (the loss "
                  f"became NaN or infinite; earlier epochs are kept); lower --base-lr or add "
                  f"--warmup (e.g. --warmup 1), with --force to start it afresh", file=sys.stderr)
            code = 2
        elif group.writer:
            k = summary.get("final_epochs", 5)
            print(f"{where}: {status['state']}; test error {summary.get('median_final5_test_error', float('nan')):.2f}% "
                  f"({'the final epoch' if k == 1 else f'median of the final {k} epochs'})")
    return code


def seed_list(text: str) -> list[int]:
    """--seeds 0,1,2: distinct whole numbers."""
    import argparse

    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds separated by commas, e.g. 0,1,2, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds separated by commas, e.g. 0,1,2, got '{text}'")
    return seeds


def resumed(member, steps: int, epochs: int) -> str | None:
    """'resuming from epoch 4 of 7 (3 finished)', 'already done: nothing to train', or None for
    a new run, from what the trainer read when it opened the run's directory."""
    from .. import rundir
    from ..train.state import position

    status = member.status() or {}
    if member.resume_state is None:
        return None
    if status.get("state") in rundir.FINISHED:
        return f"already {status['state']}: nothing to train"
    epoch, step = position(member.resume_state)
    return (f"resuming from epoch {epoch + 1} of {epochs} ({epoch} finished"
            + (f", {step} of its {steps} steps done)" if step else ")"))


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one run", description="Train one CIFAR ResNet into "
                       "OUT/<run-id>/ (config.json, metrics.csv, checkpoint.pt, status.json). Running "
                       "the same command again resumes it, or does nothing if it finished.")
    add_run_options(p)
    add_runtime_options(p)
    add_log_options(p)
    p.add_argument("--seeds", type=seed_list, metavar="S,S,...", help="train these seeds (e.g. 0,1,2) "
                   "at once as one array: one network holding every run side by side, each run in its own "
                   "directory exactly as if trained alone (up to float rounding); instead of --seed")
    p.add_argument("--out", default="runs", help="results directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr "
                   "is not a terminal; the line per epoch is always printed)")
    p.set_defaults(func=cmd_train)
