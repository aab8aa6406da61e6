"""normlab train: one run (or, under torchrun, one run on K processes)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import NormlabError
from ..precision import describe as describe_precision
from .options import add_run_options, add_runtime_options, run_config, runtime_options


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
        opts = runtime_options(args)
        if group.device is not None:
            opts.device = str(group.device)
        opts.progress = opts.progress and group.writer
    run = start(group, [cfg], [Path(args.out) / cfg.run_id()], opts, args.force)
    if group.writer:
        print(describe_precision(run.amp, run.amp_reason))
    bar = tqdm(total=cfg.epochs * run.steps, unit="step", disable=not opts.progress,
               desc=cfg.run_id(), dynamic_ncols=True)

    def on_progress(r):
        bar.n = r.epoch * r.steps + r.step
        bar.set_postfix_str(f"epoch {r.epoch + 1}/{cfg.epochs}", refresh=False)
        bar.update(0)

    def on_epoch(r, member, row):
        bar.write(f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  train err {row['train_error']:5.2f}%  "
                  f"test err {row['test_error']:5.2f}%  {row['images_per_s']:.0f} img/s")

    with run:
        bar.n = run.epoch * run.steps
        status = run.run(on_progress, on_epoch if group.writer else None)[cfg.run_id()]
    bar.close()
    summary = status.get("summary", {})
    state = status["state"]
    where = Path(args.out) / cfg.run_id()
    if state == "diverged":
        print(f"normlab: error: {where} diverged in epoch {status.get('diverged_in_epoch')} (the loss "
              f"became NaN or infinite; earlier epochs are kept); lower --base-lr or add "
              f"--warmup-epochs, with --force to start it afresh", file=sys.stderr)
        return 2
    if group.writer:
        print(f"{where}: {state}; median test error of the final 5 epochs "
              f"{summary.get('median_final5_test_error', float('nan')):.2f}%")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one run", description="Train one CIFAR ResNet into "
                       "OUT/<run-id>/ (config.json, metrics.csv, checkpoint.pt, status.json). Running "
                       "the same command again resumes it, or does nothing if it finished.")
    add_run_options(p)
    add_runtime_options(p)
    p.add_argument("--out", default="runs", help="results directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr "
                   "is not a terminal; the line per epoch is always printed)")
    p.set_defaults(func=cmd_train)
