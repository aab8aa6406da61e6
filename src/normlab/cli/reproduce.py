"""normlab reproduce: a study (a grid of runs), trained by a backend, then its report."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import NormlabError, one_line
from ..precision import describe as describe_precision
from ..records import safe_name
from .options import add_backend_options, add_log_options, add_runtime_options, check_data_dir, log_options, runtime_options


def cmd_reproduce(args) -> int:
    from ..train import resolve_device
    from ..precision import choose_amp
    from ..backends import make_backend, parse_sbatch
    from ..progress import StudyDisplay
    from ..report import build_report
    from ..study import expand, images_per_run, parse_overrides, run_study, steps_per_epoch

    if args.seeds is not None and args.seeds < 1:
        raise NormlabError(f"--seeds must be a positive whole number, got {args.seeds}")
    if args.workers is not None and args.workers < 1:
        raise NormlabError(f"--workers must be a positive whole number, got {args.workers}")
    if args.batch_sizes and any(b < 1 for b in args.batch_sizes):
        raise NormlabError(f"--batch-sizes must be positive whole numbers, got {args.batch_sizes}")
    study = expand(args.preset, seeds=args.seeds, overrides=parse_overrides(args.set),
                   only=args.only, batch_sizes=args.batch_sizes)
    check_data_dir(args.data_dir, {c.data for c in study.runs.values()}, "add --set data=cifar10 (or cifar100)")
    out = Path(args.out) if args.out else Path("results") / safe_name(study.name)
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
            warm = (f"  warm-up {cfg.warmup_epochs:g} epochs" if cfg.warmup_epochs else
                    f"  warm-up {cfg.warmup_steps} steps" if cfg.warmup_steps else "")
            warm += f" ({cfg.warmup_shape}, {cfg.warmup_factor:g} x lr)" if warm else ""
            print(f"{rid:<40} {cfg.lr:>8.4g} {steps_per_epoch(cfg):>9} {trained:>12,} {evaluated:>10,}{warm}")
        print(f"total: {total_train:,} training images (forward + backward), {total_eval:,} evaluated")
        return 0
    # probes: --probes / --no-probes, else the preset's choice, else where they cost at most 5 %
    opts = runtime_options(args, probes=study.probes)
    opts.log = log_options(args, out, study.name)
    backend = make_backend(args.backend, opts, args.workers or (study.workers if args.backend == "local" else None),
                           address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                           partition=args.partition, time_limit=args.time_limit,
                           sbatch=parse_sbatch(args.sbatch), wait=args.wait)
    if args.backend == "local":  # on a cluster each node decides for itself (recorded per run)
        print(describe_precision(*choose_amp(resolve_device(opts.device), opts.amp)))
    size = array_size(args.fuse, backend, opts)
    display = StudyDisplay(enabled=opts.progress)
    from ..train.control import working
    try:
        with backend, working():  # a signal now checkpoints the runs (exit 75)
            results = run_study(study, out, opts, display=display, force=args.force, backend=backend,
                                array_size=size)
    finally:
        display.close()
    if backend.detached:
        print(f"normlab: the runs train on the cluster; run the same command again to wait for them and "
              f"write the report, or `normlab report {out}` for what has finished")
        return 0
    states = [r.get("state") for r in results.values()]
    failed = [rid for rid, r in results.items() if r.get("state") == "failed"]
    try:
        report = build_report(out)
        print(f"report: {report}")
    except NormlabError as err:
        if not failed:
            raise
        report = None
        print(f"normlab: warning: no report: {err}", file=sys.stderr)  # the failures say why
    if opts.log and report:  # the report's figures, where the tool takes them
        from ..loggers import log_report
        log_report(opts.log, out, [report, *sorted((Path(report).parent / "figures").rglob("*.png"))])
    from ..train import EXIT_INTERRUPTED, STOP
    if "interrupted" in states or STOP.is_set():
        print("normlab: stopped; run the same command again to finish the remaining runs", file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        for rid in failed:
            print(f"normlab: {rid}: failed: {one_line(results[rid].get('error'))}", file=sys.stderr)
        return 1
    return 0


def fuse_option(text: str):
    """--fuse auto | off | R."""
    import argparse

    if text in ("auto", "off"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, off or a number of runs (2 or more), got '{text}'")


def array_size(fuse, backend, opts):
    """How many runs of a config (differing only in their seeds) a job trains as one array."""
    import torch

    from ..precision import choose_amp
    from ..train import auto_array_size, resolve_device

    if fuse == "off" or not backend.arrays:
        return lambda cfg: 1
    if fuse != "auto":
        return lambda cfg: fuse
    run_opts = getattr(backend, "run_opts", opts)  # the options the runs train with, wherever
    device = resolve_device(run_opts.device) if backend.name == "local" else \
        torch.device("cpu" if run_opts.device == "cpu" else "cuda")
    amp = choose_amp(device, run_opts.amp)[0] if device.type == "cpu" or backend.name == "local" else True
    return lambda cfg: auto_array_size(cfg, device.type, amp)


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="run a study (a grid of runs) and write its report",
                       description="Run the report's three studies (norms, batch-size, groups) as a "
                       "resumable sweep into OUT/<run-id>/ and write OUT/report.md. Running the same "
                       "command again skips finished runs and resumes unfinished ones.")
    p.add_argument("--preset", default="quick", help="quick (the bundled sample, 3 seeds, about 6 min on a 2-core "
                   "CPU), paper (ResNet-56/110 on CIFAR-10, for GPUs), zoo (every norm GN is compared "
                   "with, ResNet-56 on CIFAR-10, for GPUs), zoo-quick (the same on the bundled sample, "
                   "about 3 min on a 2-core CPU), why (probes and ablations: why a norm helps, ResNet-56 on "
                   "CIFAR-10, for GPUs), why-quick (the same on the bundled sample), or a .yaml file of the "
                   "same form (default: %(default)s)")
    p.add_argument("--out", help="results directory; several studies may share one, each keeps its own "
                   "record and report section (default: results/<preset name>, e.g. results/quick)")
    p.add_argument("--only", nargs="+", metavar="STUDY", help="run only these studies: norms, "
                   "batch-size, groups (of quick and paper), zoo (of zoo and zoo-quick), inside (of why and why-quick)")
    p.add_argument("--seeds", type=int, help="seeds per point (default: the preset's)")
    p.add_argument("--fuse", type=fuse_option, default="auto", metavar="auto|off|R",
                   help="train the seeds of a point as one fused array of up to R runs (one network "
                        "holding them side by side; each run's results as if trained alone, up to float "
                        "rounding); auto: where it was measured to pay on this kind of device (see "
                        "README, Run arrays); off: every run alone (default: %(default)s)")
    p.add_argument("--workers", type=int, help="runs at once; one per GPU when there are several, "
                   "CPU threads split between them (default: the preset's; with --backend ray or slurm, "
                   "as many as the cluster takes)")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], metavar="N,N,...",
                   help="batch sizes of the batch-size study, e.g. 256,128,64,32,16,8 (the report's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run setting for "
                   "every run, e.g. --set epochs=164 --set schedule=multistep --set milestones=[82,123] "
                   "or --set virtual_gpus=1")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their cost in images")
    p.add_argument("--quiet", action="store_true", help="no live display (there is none when stderr "
                   "is not a terminal; the line per finished run is always printed)")
    add_runtime_options(p)
    add_log_options(p)
    add_backend_options(p)
    p.set_defaults(func=cmd_reproduce)
