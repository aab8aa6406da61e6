"""The command line: normlab train | reproduce | report | bench | data.

Every user error is one line on stderr and exit code 2; an interrupted run exits with 75
after writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from . import __version__
from .config import RunConfig, RuntimeOptions
from .data import DATA_CHOICES
from .errors import NormlabError
from .norms import SPEC_HELP

DEFAULTS = RunConfig()


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with a pointer to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_run_options(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    g = p.add_argument_group("what to train")
    g.add_argument("--model", default=d.model, help="CIFAR ResNet of depth 6n+2: resnet20, resnet32, "
                   "resnet44, resnet56, resnet110, resnet1202 (default: %(default)s)")
    g.add_argument("--norm", default=d.norm, help=f"normalization: {SPEC_HELP} (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                   help="images per (virtual) device, the N that BN normalizes over and that sets the "
                        "lr (default: %(default)s)")
    g.add_argument("--virtual-gpus", type=int, default=d.virtual_gpus, metavar="K",
                   help="simulate K devices: K*N images per step, BN statistics per chunk of N "
                        "(the GN paper's 8-GPU setting on one device) (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    g.add_argument("--base-lr", type=float, default=d.base_lr,
                   help="lr = base-lr * N / base-batch (default: %(default)s)")
    g.add_argument("--base-batch", type=int, default=d.base_batch, help="(default: %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    g.add_argument("--no-wd-norm", dest="wd_on_norm", action="store_false",
                   help="no weight decay on norm parameters and biases (default: decay all, as the "
                        "GN paper)")
    g.add_argument("--schedule", default=d.schedule, choices=["step", "multistep", "cosine"],
                   help="step: lr/10 every --step-size epochs (the report's); multistep: lr/10 at "
                        "--milestones (He et al.); cosine (default: %(default)s)")
    g.add_argument("--step-size", type=int, default=d.step_size, help="(default: %(default)s)")
    g.add_argument("--milestones", type=int, nargs="+", default=list(d.milestones),
                   help="epochs at which multistep divides the lr by 10, e.g. 82 123")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up from 0.1*lr over this many epochs (default: %(default)s)")
    g.add_argument("--data", default=d.data, choices=DATA_CHOICES,
                   help="sample: 4,000/1,000 real CIFAR-10 images bundled with normlab; cifar10, "
                        "cifar100: the full sets from --data-dir (default: %(default)s)")
    g.add_argument("--val-split", type=int, default=d.val_split, metavar="M",
                   help="hold out M training images for validation, e.g. 5000 (default: none)")
    g.add_argument("--shortcut", default=d.shortcut, choices=["A", "B"],
                   help="A: zero-padding (He et al.), B: 1x1 projection (default: %(default)s)")
    g.add_argument("--no-zero-init", dest="zero_init_residual", action="store_false",
                   help="keep gamma = 1 in each block's last norm (default: gamma = 0)")
    g.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("how to run")
    g.add_argument("--data-dir", help="directory holding cifar-10-batches-py/ or cifar-100-python/ "
                   "(default: $NORMLAB_DATA or ~/.cache/normlab/data; downloaded when empty)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: %(default)s)")
    g.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: off; see benchmarks/)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--force", action="store_true",
                   help="start afresh a run whose directory holds a different config (the old "
                        "directory is renamed, never deleted)")


def run_config(args) -> RunConfig:
    fields = RunConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    values["milestones"] = tuple(values.get("milestones") or ())
    return RunConfig(**values).normalized().validate()


def runtime_options(args) -> RuntimeOptions:
    if args.threads is not None and args.threads < 1:
        raise NormlabError(f"--threads must be positive, got {args.threads}")
    return RuntimeOptions(device=args.device, threads=args.threads, data_dir=args.data_dir,
                          channels_last=args.channels_last, amp=args.amp, compile=args.compile,
                          progress=not getattr(args, "quiet", False))


def cmd_train(args) -> int:
    from tqdm import tqdm

    from . import engine

    cfg = run_config(args)
    opts = runtime_options(args)
    run = engine.Run(cfg, Path(args.out) / cfg.run_id(), opts)
    bar = tqdm(total=cfg.epochs * run.steps, unit="step", disable=not opts.progress,
               desc=cfg.run_id(), dynamic_ncols=True)

    def on_progress(r):
        bar.n = r.epoch * r.steps + r.step
        bar.set_postfix_str(f"epoch {r.epoch + 1}/{cfg.epochs}", refresh=False)
        bar.update(0)

    def on_epoch(r, row):
        bar.write(f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  train err {row['train_error']:5.2f}%  "
                  f"test err {row['test_error']:5.2f}%  {row['images_per_s']:.0f} img/s")

    with run.open(force=args.force):
        bar.n = run.epoch * run.steps
        status = run.run(on_progress, on_epoch)
    bar.close()
    summary = status.get("summary", {})
    state = status["state"]
    where = Path(args.out) / cfg.run_id()
    if state == "diverged":
        print(f"{where}: diverged in epoch {status.get('diverged_in_epoch')} (loss became NaN or "
              f"infinite); try a lower --base-lr or --warmup-epochs")
        return 1
    print(f"{where}: {state}; median test error of the final 5 epochs "
          f"{summary.get('median_final5_test_error', float('nan')):.2f}%")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="normlab", description="Batch, Layer, Instance and Group Normalization "
                    "studies on CIFAR: train runs, reproduce the GN study, report, benchmark.")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train one run", description="Train one CIFAR ResNet into "
                       "OUT/<run-id>/ (config.json, metrics.csv, checkpoint.pt, status.json). Running "
                       "the same command again resumes it, or does nothing if it finished.")
    add_run_options(p)
    add_runtime_options(p)
    p.add_argument("--out", default="runs", help="results directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def install_signal_handlers() -> dict:
    """SIGINT, SIGTERM and SIGUSR1 (sent by schedulers before preemption) ask the run to
    checkpoint at the next step and exit; a second signal stops at once. Returns the old ones."""
    from .engine import STOP

    STOP.clear()

    def handler(signum, frame):
        if STOP.is_set():  # second signal: stop now
            raise KeyboardInterrupt
        STOP.set()
        print(f"\nnormlab: {signal.Signals(signum).name}: checkpointing after this step; run the "
              f"same command again to resume", file=sys.stderr)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = install_signal_handlers()
    from .engine import EXIT_INTERRUPTED, Interrupted, RunBusy
    try:
        return args.func(args)
    except NormlabError as err:
        print(f"normlab: error: {err}", file=sys.stderr)
        return 2
    except RunBusy as err:
        print(f"normlab: error: {err} is being trained by another process; wait for it or "
              f"use another --out", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"normlab: stopped; checkpoint saved in {err}; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("normlab: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
