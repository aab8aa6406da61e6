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
    g = p.add_argument_group("normalization options")
    g.add_argument("--precise-bn", type=int, metavar="M", help="PreciseBN: before each evaluation, "
                   "recompute the running statistics over M training images, pooled (bn, brn, "
                   "evonorm-b0; default: off, the moving averages)")
    g.add_argument("--brn-r-max", type=float, default=d.brn_r_max, help="Batch Renorm: final r_max "
                   "(default: %(default)s)")
    g.add_argument("--brn-d-max", type=float, default=d.brn_d_max, help="Batch Renorm: final d_max "
                   "(default: %(default)s)")
    g.add_argument("--brn-start", type=float, default=d.brn_start, metavar="FRACTION",
                   help="Batch Renorm: r_max = 1, d_max = 0 (plain BN) for this fraction of the run's "
                   "steps, then a linear rise (default: %(default).4f = the paper's 5k of 130k steps)")
    g.add_argument("--brn-r-end", type=float, default=d.brn_r_end, metavar="FRACTION",
                   help="Batch Renorm: r_max reaches --brn-r-max at this fraction of the run (default: "
                   "%(default).4f = 40k of 130k)")
    g.add_argument("--brn-d-end", type=float, default=d.brn_d_end, metavar="FRACTION",
                   help="Batch Renorm: d_max reaches --brn-d-max at this fraction of the run (default: "
                   "%(default).4f = 25k of 130k)")


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("how to run")
    g.add_argument("--data-dir", help="directory holding cifar-10-batches-py/ or cifar-100-python/ "
                   "(default: $NORMLAB_DATA or ~/.cache/normlab/data; downloaded when empty)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: %(default)s)")
    g.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for BN, off for GN/LN/IN, whose "
                        "kernels are NCHW-only on CUDA and slower so on CPU; see benchmarks/)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--checkpoint-every", type=float, metavar="MIN", dest="checkpoint_minutes",
                   help="also checkpoint within an epoch every MIN minutes (default: at the end "
                        "of every epoch only)")
    g.add_argument("--force", action="store_true",
                   help="start afresh a run whose directory holds a different config (the old "
                        "directory is renamed, never deleted)")


def run_config(args) -> RunConfig:
    fields = RunConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if values.get("precise_bn") is not None and values["precise_bn"] < 1:
        raise NormlabError(f"--precise-bn must be a positive number of training images, got {values['precise_bn']}")
    values["precise_bn"] = values.get("precise_bn") or 0
    values["milestones"] = tuple(values.get("milestones") or ())
    return RunConfig(**values).normalized().validate()


def runtime_options(args) -> RuntimeOptions:
    if args.threads is not None and args.threads < 1:
        raise NormlabError(f"--threads must be positive, got {args.threads}")
    if args.checkpoint_minutes is not None and args.checkpoint_minutes <= 0:
        raise NormlabError(f"--checkpoint-every must be a positive number of minutes, got {args.checkpoint_minutes}")
    return RuntimeOptions(device=args.device, threads=args.threads, data_dir=args.data_dir,
                          channels_last=args.channels_last, amp=args.amp, compile=args.compile,
                          checkpoint_minutes=args.checkpoint_minutes,
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
        print(f"normlab: error: {where} diverged in epoch {status.get('diverged_in_epoch')} (the loss "
              f"became NaN or infinite; earlier epochs are kept); lower --base-lr or add "
              f"--warmup-epochs, with --force to start it afresh", file=sys.stderr)
        return 2
    print(f"{where}: {state}; median test error of the final 5 epochs "
          f"{summary.get('median_final5_test_error', float('nan')):.2f}%")
    return 0


def cmd_reproduce(args) -> int:
    from .progress import StudyDisplay
    from .report import build_report
    from .study import expand, images_per_run, parse_overrides, run_study, steps_per_epoch

    if args.seeds is not None and args.seeds < 1:
        raise NormlabError(f"--seeds must be a positive whole number, got {args.seeds}")
    if args.workers is not None and args.workers < 1:
        raise NormlabError(f"--workers must be a positive whole number, got {args.workers}")
    if args.batch_sizes and any(b < 1 for b in args.batch_sizes):
        raise NormlabError(f"--batch-sizes must be positive whole numbers, got {args.batch_sizes}")
    study = expand(args.preset, seeds=args.seeds, overrides=parse_overrides(args.set),
                   only=args.only, batch_sizes=args.batch_sizes)
    out = Path(args.out)
    if args.dry_run:
        total_train = total_eval = 0
        print(f"{study.name}: {len(study.runs)} runs into {out}/")
        for name, ids in study.membership.items():
            print(f"  {name}: {len(ids)} runs")
        print(f"{'run':<40} {'lr':>8} {'steps/ep':>9} {'train img':>12} {'eval img':>10}")
        for rid, cfg in study.runs.items():
            trained, evaluated = images_per_run(cfg)
            total_train += trained
            total_eval += evaluated
            print(f"{rid:<40} {cfg.lr:>8.4g} {steps_per_epoch(cfg):>9} {trained:>12,} {evaluated:>10,}")
        print(f"total: {total_train:,} training images (forward + backward), {total_eval:,} evaluated")
        return 0
    opts = runtime_options(args)
    display = StudyDisplay(enabled=opts.progress)
    try:
        results = run_study(study, out, opts, args.workers or study.workers, display, force=args.force)
    finally:
        display.close()
    states = [r.get("state") for r in results.values()]
    report = build_report(out)
    print(f"report: {report}")
    from .engine import EXIT_INTERRUPTED, STOP
    if "interrupted" in states or STOP.is_set():
        print(f"normlab: stopped; run the same command again to finish the remaining runs", file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [rid for rid, r in results.items() if r.get("state") == "failed"]
    if failed:
        for rid in failed:
            print(f"normlab: {rid}: failed: {results[rid].get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    print(f"report: {build_report(Path(args.results))}")
    return 0


def cmd_bench(args) -> int:
    import itertools
    import json

    import torch

    from .bench import bench_config, bench_norm_layers, bench_zoo_layers, peak_matmul_flops, training_flops_per_image
    from .engine import resolve_device
    from .rundir import atomic_write

    for name in ("steps", "repeats", "virtual_gpus"):
        if getattr(args, name) < 1:
            raise NormlabError(f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}")
    if args.warmup < 0:
        raise NormlabError(f"--warmup must be 0 or more steps, got {args.warmup}")
    opts = runtime_options(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    configs = [RunConfig(model=m, norm=n, batch_size=b, virtual_gpus=args.virtual_gpus, data="sample").normalized().validate()
               for m, n, b in itertools.product(args.model, args.norm, args.batch_size)]
    peak = peak_matmul_flops(device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    header = (f"{'model':<10} {'norm':<14} {'batch':>7} {'normlab img/s':>14} {'reference img/s':>16} "
              f"{'speed-up':>9} {'GFLOP/s':>8} {'% peak':>7}")
    print(header)
    results, flops = [], {}
    for cfg in configs:
        key = (cfg.model, cfg.norm)
        if key not in flops:
            flops[key] = training_flops_per_image(cfg.model, cfg.norm)
        r = bench_config(cfg, opts, args.steps, args.warmup, args.repeats, not args.no_reference,
                         args.reference_workers)
        r["train_flops_per_image"] = flops[key]
        r["achieved_flops"] = r["normlab_images_per_s"] * flops[key]
        r["fraction_of_peak"] = r["achieved_flops"] / peak
        results.append(r)
        batch = f"{cfg.batch_size}x{cfg.virtual_gpus}" if cfg.virtual_gpus > 1 else str(cfg.batch_size)
        ref = f"{r['reference_images_per_s']:16.1f}" if "reference_images_per_s" in r else f"{'-':>16}"
        speedup = f"{r['speedup']:8.2f}x" if "speedup" in r else f"{'-':>9}"
        print(f"{cfg.model:<10} {cfg.norm:<14} {batch:>7} {r['normlab_images_per_s']:14.1f} {ref} {speedup} "
              f"{r['achieved_flops'] / 1e9:8.1f} {100 * r['fraction_of_peak']:6.1f}%", flush=True)
    report = {"command": "normlab " + " ".join(args.argv),
              "peak_matmul_flops": peak, "torch": torch.__version__, "results": results}
    if len(results) == 1:
        report.update({k: v for k, v in results[0].items()})
    if args.norm_layers:
        report["norm_layers"] = bench_norm_layers(device)
        print(f"\nnorm layers, forward + backward (microseconds per call), batch 32, G = 16:")
        for row in report["norm_layers"]:
            print(f"  {str(tuple(row['shape'])):<18} {row['format']:<14} {row['impl']:<28} {row['microseconds']:9.1f}")
        report["zoo_layers"] = bench_zoo_layers(device)
        print(f"\nnorm + activation layers and the WS conv, forward + backward, each in its default format:")
        for row in report["zoo_layers"]:
            print(f"  {str(tuple(row['shape'])):<18} {row['format']:<14} {row['layer']:<16} "
                  f"{row['microseconds']:9.1f} us  {row['relative']:5.2f}x {row['relative_to']}")
    if args.json:
        atomic_write(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
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

    p = sub.add_parser("reproduce", help="run a study (a grid of runs) and write its report",
                       description="Run the report's three studies (norms, batch-size, groups) as a "
                       "resumable sweep into OUT/<run-id>/ and write OUT/report.md. Running the same "
                       "command again skips finished runs and resumes unfinished ones.")
    p.add_argument("--preset", default="quick", help="quick (the bundled sample, about 8 min on a 2-core "
                   "CPU), paper (ResNet-56/110 on CIFAR-10, for GPUs), zoo (every norm GN is compared "
                   "with, ResNet-56 on CIFAR-10, for GPUs), zoo-quick (the same on the bundled sample, "
                   "under 10 min on a 2-core CPU), or a .yaml file of the same form (default: %(default)s)")
    p.add_argument("--out", default="results", help="results directory (default: %(default)s)")
    p.add_argument("--only", nargs="+", metavar="STUDY", help="run only these studies: norms, "
                   "batch-size, groups (of quick and paper), zoo (of zoo and zoo-quick)")
    p.add_argument("--seeds", type=int, help="seeds per point (default: the preset's)")
    p.add_argument("--workers", type=int, help="runs at once; one per GPU when there are several, "
                   "CPU threads split between them (default: the preset's)")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], metavar="N,N,...",
                   help="batch sizes of the batch-size study, e.g. 256,128,64,32,16,8 (the report's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run setting for "
                   "every run, e.g. --set epochs=164 --set schedule=multistep --set milestones=[82,123] "
                   "or --set virtual_gpus=1")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their cost in images")
    p.add_argument("--quiet", action="store_true", help="no live display")
    add_runtime_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="write report.md and figures from run directories",
                       description="Build RESULTS/report.md and RESULTS/figures/*.png from the run "
                       "directories under RESULTS. Reads run directories only: no data set, no GPU.")
    p.add_argument("results", help="a results directory (the --out of reproduce or train)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="training throughput against the usual pipeline and the machine's peak",
                       description="Steady-state training throughput (images/s after warm-up) of "
                       "normlab and of a reference pipeline written like the usual CIFAR scripts "
                       "(per-sample Dataset + DataLoader, fp32, NCHW, GN by the reshape formula), "
                       "timed alternately in one process, with the measured matmul peak and the "
                       "model's counted training FLOPs. Quote the ratios: absolute times drift.")
    p.add_argument("--model", nargs="+", default=["resnet56"], help="(default: %(default)s)")
    p.add_argument("--norm", nargs="+", default=["bn", "gn:16"], help="(default: %(default)s)")
    p.add_argument("--batch-size", nargs="+", type=int, default=[32, 128], help="(default: %(default)s)")
    p.add_argument("--virtual-gpus", type=int, default=1, help="normlab runs K x N images per step "
                   "with BN per N; the reference trains plain batch N (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is "
                   "reported (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="time normlab only")
    p.add_argument("--reference-workers", type=int, default=0, help="DataLoader workers of the "
                   "reference (default: %(default)s)")
    p.add_argument("--norm-layers", action="store_true", help="also time the norm layers alone")
    p.add_argument("--json", help="write the results to this JSON file")
    add_runtime_options(p)
    p.set_defaults(func=cmd_bench)
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with benchmark results
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
