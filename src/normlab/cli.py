"""The command line: normlab train | reproduce | report | bench | data.

Every user error is one line on stderr and exit code 2; an interrupted run exits with 75
after writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .config import RunConfig, RuntimeOptions
from .data import DATA_CHOICES
from .errors import NormlabError
from .norms import SPEC_HELP
from .precision import describe as describe_precision

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
    g.add_argument("--virtual-gpus", type=int, metavar="K",
                   help="simulate K devices: K*N images per step, BN statistics per chunk of N "
                        "(the GN paper's 8-GPU setting on one device) (default: 1; under torchrun "
                        "the processes are the devices: leave it out, or give their number)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BN statistics over all K*N images of a step instead of each device's N "
                        "(nn.SyncBatchNorm under torchrun on CUDA; an all-reduce on CPU)")
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
                   help="bf16 autocast (default: auto, on for CUDA and for CPUs with native bf16 "
                        "(AMX, AVX512-BF16, Arm BF16), where it trains about twice as fast; fp32 on "
                        "other CPUs, where bf16 is slower; the choice is recorded in config.json)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--checkpoint-every", type=float, metavar="MIN", dest="checkpoint_minutes",
                   help="also checkpoint within an epoch every MIN minutes (default: at the end "
                        "of every epoch only)")
    g.add_argument("--force", action="store_true",
                   help="start afresh a run whose directory holds a different config (the old "
                        "directory is renamed, never deleted)")


def add_backend_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to run (see README, Scaling out)")
    g.add_argument("--backend", default="local", choices=["local", "ray", "slurm"],
                   help="local: this machine (--workers processes); ray: a Ray cluster, a task per run "
                        "(pip install 'normlab[ray]'); slurm: one SLURM job array through submitit (pip "
                        "install 'normlab[slurm]'). --out must be shared by every node (default: %(default)s)")
    g.add_argument("--address", help="ray: the cluster's HOST:PORT, or auto: RAY_ADDRESS or the cluster "
                   "started on this machine with `ray start` (default: auto)")
    g.add_argument("--cpus-per-run", type=float, metavar="N", help="ray, slurm: CPU cores per run, also "
                   "its torch threads (default: 1)")
    g.add_argument("--gpus-per-run", type=float, metavar="G", help="ray, slurm: GPUs per run; on Ray a "
                   "fraction packs runs on a GPU, e.g. 0.25 (default: 1 where there are GPUs, else 0)")
    g.add_argument("--partition", help="slurm: the partition (default: the cluster's default)")
    g.add_argument("--time", dest="time_limit", metavar="HH:MM:SS", help="slurm: time limit per run; a run "
                   "that needs longer is checkpointed and requeued (default: the partition's limit, at "
                   "most 24:00:00)")
    g.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="slurm: another sbatch option, "
                   "e.g. --sbatch account=myproject --sbatch qos=high")
    g.add_argument("--no-wait", dest="wait", action="store_false", help="slurm: return once the job array "
                   "is queued; the same command later waits for it and writes the report")


def run_config(args, processes: int = 1) -> RunConfig:
    """The run config of `normlab train`; under torchrun the K processes are its K devices,
    so that the run is the same (same id) as --virtual-gpus K in one process."""
    fields = RunConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if values.get("precise_bn") is not None and values["precise_bn"] < 1:
        raise NormlabError(f"--precise-bn must be a positive number of training images, got {values['precise_bn']}")
    values["precise_bn"] = values.get("precise_bn") or 0
    values["milestones"] = tuple(values.get("milestones") or ())
    if processes > 1 and values.get("virtual_gpus") not in (None, processes):
        raise NormlabError(f"--virtual-gpus {values['virtual_gpus']} under torchrun with {processes} "
                           f"processes: the processes are the devices (the run is {processes} devices "
                           f"x N images); leave out --virtual-gpus")
    if processes > 1 or values.get("virtual_gpus") is None:
        values["virtual_gpus"] = processes
    return RunConfig(**values).normalized().validate()


def runtime_options(args) -> RuntimeOptions:
    if args.threads is not None and args.threads < 1:
        raise NormlabError(f"--threads must be positive, got {args.threads}")
    if args.checkpoint_minutes is not None and args.checkpoint_minutes <= 0:
        raise NormlabError(f"--checkpoint-every must be a positive number of minutes, got {args.checkpoint_minutes}")
    return RuntimeOptions(device=args.device, threads=args.threads, data_dir=args.data_dir,
                          channels_last=args.channels_last, amp=args.amp, compile=args.compile,
                          checkpoint_minutes=args.checkpoint_minutes,
                          progress=not getattr(args, "quiet", False) and sys.stderr.isatty())


def cmd_train(args) -> int:
    from . import distributed

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

    from .distributed import start_run

    with group.agreed():
        cfg = run_config(args, group.world)
        opts = runtime_options(args)
        if group.device is not None:
            opts.device = str(group.device)
        opts.progress = opts.progress and group.writer
    run, lock = start_run(group, cfg, Path(args.out) / cfg.run_id(), opts, args.force)
    if group.writer:
        print(describe_precision(run.amp, run.amp_reason))
    bar = tqdm(total=cfg.epochs * run.steps, unit="step", disable=not opts.progress,
               desc=cfg.run_id(), dynamic_ncols=True)

    def on_progress(r):
        bar.n = r.epoch * r.steps + r.step
        bar.set_postfix_str(f"epoch {r.epoch + 1}/{cfg.epochs}", refresh=False)
        bar.update(0)

    def on_epoch(r, row):
        bar.write(f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  train err {row['train_error']:5.2f}%  "
                  f"test err {row['test_error']:5.2f}%  {row['images_per_s']:.0f} img/s")

    with lock:
        bar.n = run.epoch * run.steps
        status = run.run(on_progress, on_epoch if group.writer else None)
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


def cmd_reproduce(args) -> int:
    from .engine import resolve_device
    from .precision import choose_amp
    from .backends import make_backend, parse_sbatch
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
    backend = make_backend(args.backend, opts, args.workers or (study.workers if args.backend == "local" else None),
                           address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                           partition=args.partition, time_limit=args.time_limit,
                           sbatch=parse_sbatch(args.sbatch), wait=args.wait)
    if args.backend == "local":  # on a cluster each node decides for itself (recorded per run)
        print(describe_precision(*choose_amp(resolve_device(opts.device), opts.amp)))
    display = StudyDisplay(enabled=opts.progress)
    try:
        with backend:
            results = run_study(study, out, opts, display=display, force=args.force, backend=backend)
    finally:
        display.close()
    if backend.detached:
        print(f"normlab: the runs train on the cluster; run the same command again to wait for them and "
              f"write the report, or `normlab report {out}` for what has finished")
        return 0
    states = [r.get("state") for r in results.values()]
    report = build_report(out)
    print(f"report: {report}")
    from .engine import EXIT_INTERRUPTED, STOP
    if "interrupted" in states or STOP.is_set():
        print("normlab: stopped; run the same command again to finish the remaining runs", file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [rid for rid, r in results.items() if r.get("state") == "failed"]
    if failed:
        for rid in failed:
            print(f"normlab: {rid}: failed: {results[rid].get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    if args.references and not Path(args.references).is_file():
        raise NormlabError(f"--references {args.references}: no such file; give a YAML file of the "
                           f"form of normlab's references.yaml, or leave the option out")
    print(f"report: {build_report(Path(args.results), references=args.references, out=args.out)}")
    return 0


def cmd_bench(args) -> int:
    import itertools
    import json

    import torch

    from .bench import (PRECISIONS, bench_config, bench_norm_layers, bench_zoo_layers, peak_matmul_flops,
                        training_flops_per_image)
    from .engine import resolve_device
    from .precision import choose_amp
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
    # --amp / --no-amp time that precision only; by default both, each against its own peak
    precisions = ("bf16",) if opts.amp else ("fp32",) if opts.amp is False else ("fp32", "bf16")
    peaks = {p: peak_matmul_flops(device, dtype=PRECISIONS[p]) for p in precisions}
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; measured matmul "
          f"peak " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in precisions))
    print(describe_precision(*choose_amp(device, opts.amp)))
    header = (f"{'model':<10} {'norm':<14} {'batch':>7} {'precision':>9} {'normlab img/s':>14} "
              f"{'reference img/s':>16} {'speed-up':>9} {'GFLOP/s':>8} {'% peak':>7}")
    print(header)
    results, flops = [], {}
    for cfg in configs:
        key = (cfg.model, cfg.norm)
        if key not in flops:
            flops[key] = training_flops_per_image(cfg.model, cfg.norm)
        r = bench_config(cfg, opts, args.steps, args.warmup, args.repeats, not args.no_reference,
                         args.reference_workers, precisions)
        r["train_flops_per_image"] = flops[key]
        for p, entry in r["precisions"].items():
            entry["achieved_flops"] = entry["images_per_s"] * flops[key]
            entry["fraction_of_peak"] = entry["achieved_flops"] / peaks[p]  # against its own peak
        r["achieved_flops"] = r["precisions"][r["precision"]]["achieved_flops"]
        r["fraction_of_peak"] = r["precisions"][r["precision"]]["fraction_of_peak"]
        results.append(r)
        batch = f"{cfg.batch_size}x{cfg.virtual_gpus}" if cfg.virtual_gpus > 1 else str(cfg.batch_size)
        ref = f"{r['reference_images_per_s']:16.1f}" if "reference_images_per_s" in r else f"{'-':>16}"
        for p, entry in r["precisions"].items():
            speedup = f"{entry['speedup']:8.2f}x" if "speedup" in entry else f"{'-':>9}"
            print(f"{cfg.model:<10} {cfg.norm:<14} {batch:>7} {p:>9} {entry['images_per_s']:14.1f} {ref} "
                  f"{speedup} {entry['achieved_flops'] / 1e9:8.1f} {100 * entry['fraction_of_peak']:6.1f}%",
                  flush=True)
    report = {"command": "normlab " + " ".join(args.argv), "peak_matmul_flops": peaks.get("fp32"),
              "peak_matmul_flops_by_precision": peaks, "torch": torch.__version__, "results": results}
    if len(results) == 1:
        report.update({k: v for k, v in results[0].items()})
    if args.norm_layers:
        report["norm_layers"] = bench_norm_layers(device)
        print("\nnorm layers, forward + backward (microseconds per call), batch 32, G = 16:")
        for row in report["norm_layers"]:
            print(f"  {str(tuple(row['shape'])):<18} {row['format']:<14} {row['impl']:<28} {row['microseconds']:9.1f}")
        report["zoo_layers"] = bench_zoo_layers(device)
        print("\nnorm + activation layers and the WS conv, forward + backward, each in its default format:")
        for row in report["zoo_layers"]:
            print(f"  {str(tuple(row['shape'])):<18} {row['format']:<14} {row['layer']:<16} "
                  f"{row['microseconds']:9.1f} us  {row['relative']:5.2f}x {row['relative_to']}")
    if args.json:
        atomic_write(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


# -- search-groups: which GN grouping is best (src/normlab/search/) --------------------------
def cmd_search_groups(args) -> int:
    from .search.candidates import parse_candidates
    from .search.plan import QUICK, describe, make_spec, probe
    from .search.results import collect, text, write
    from .search.workers import run_workers
    from .study import parse_overrides

    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else (QUICK.get(name, default) if args.quick else default)

    workers = pick("workers", 1)
    if workers < 1:
        raise NormlabError(f"--workers must be a positive whole number, got {workers}")
    overrides = parse_overrides(args.set)
    if args.quick:
        overrides = {"schedule": QUICK["schedule"], **overrides}
    spec = make_spec(candidates=parse_candidates(args.candidates), seeds=pick("seeds", 3),
                     min_epochs=args.min_epochs, reduction_factor=args.reduction_factor,
                     val_split=args.val_split, overrides=overrides, model=pick("model", DEFAULTS.model),
                     batch_size=pick("batch_size", DEFAULTS.batch_size), data=args.data,
                     epochs=pick("epochs", DEFAULTS.epochs))
    opts = runtime_options(args)
    print(describe(spec, probe(spec, opts)), flush=True)
    if args.dry_run:
        return 0
    from .engine import EXIT_INTERRUPTED
    state, search = run_workers(Path(args.out), spec, opts, workers, args.force, args.quiet)
    if state != "done":
        print("normlab: stopped; run the same command again to resume the search", file=sys.stderr)
        return EXIT_INTERRUPTED
    result = collect(search)
    json_path, md_path = write(search, result)
    print("\n" + text(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


def add_search_groups_parser(sub) -> None:
    from .search.plan import QUICK

    p = sub.add_parser("search-groups", help="find the best GN grouping (G or channels per group) "
                       "by successive halving", description="For a model, batch size and data set, "
                       "find the best GroupNorm grouping among every valid group count G and channels-"
                       "per-group K for the stage widths 16/32/64 (LN and IN included), by successive "
                       "halving over epochs (Optuna) on a held-out validation split, with several seeds "
                       "for the finalists; the test set is read once, for the winner. Writes "
                       "OUT/search.json and OUT/search.md. Running the same command again resumes a "
                       "stopped search; several commands (or --workers) share one search.")
    p.add_argument("--quick", action="store_true", help="the bundled sample sized for a 2-core CPU "
                   f"(within 10 minutes): {', '.join(f'{k} {v}' for k, v in QUICK.items())}; "
                   "options given explicitly win")
    p.add_argument("--model", help=f"CIFAR ResNet, e.g. resnet20, resnet56 (default: {DEFAULTS.model})")
    p.add_argument("--batch-size", type=int, metavar="N", help=f"(default: {DEFAULTS.batch_size})")
    p.add_argument("--data", default=DEFAULTS.data, choices=DATA_CHOICES, help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, help=f"the full budget of a run (default: {DEFAULTS.epochs})")
    p.add_argument("--min-epochs", type=int, metavar="R", help="the first rung: epochs before the first "
                   "halving (default: epochs / reduction-factor^3, at least 1)")
    p.add_argument("--reduction-factor", type=int, default=3, metavar="ETA", help="each rung keeps "
                   "the best 1/ETA (default: %(default)s)")
    p.add_argument("--seeds", type=int, help="seeds for the finalists and baselines, 2 or more (default: 3)")
    p.add_argument("--val-split", type=int, metavar="M", help="training images held out for selection "
                   "(default: 1000 for the sample, 5000 for cifar10/100)")
    p.add_argument("--candidates", metavar="SPEC,...", help="search only these groupings, e.g. "
                   "ln,gn:4,gn:16,in (default: every valid G and channels-per-group)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another run setting for every "
                   "run, e.g. --set schedule=cosine --set base_lr=0.05")
    p.add_argument("--out", default="search", help="search directory: Optuna's journal, run "
                   "directories, search.json, search.md (default: %(default)s)")
    p.add_argument("--workers", type=int, help="worker processes in this command (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its cost; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_runtime_options(p)
    p.set_defaults(func=cmd_search_groups)


# -- end of search-groups ---------------------------------------------------------------------


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
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr "
                   "is not a terminal; the line per epoch is always printed)")
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
    add_backend_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="write report.md and figures from run directories",
                       description="Build RESULTS/report.md (findings first), RESULTS/figures/*.png, "
                       "RESULTS/results.csv and RESULTS/curves.csv from the run directories under "
                       "RESULTS. Reads run directories only: no data set, no GPU. A damaged run "
                       "directory is skipped with a warning.")
    p.add_argument("results", help="a results directory (the --out of reproduce or train)")
    p.add_argument("--out", metavar="DIR", help="write the report here instead (for results you "
                   "cannot or should not write into, e.g. a colleague's; default: RESULTS)")
    p.add_argument("--references", metavar="FILE", help="published numbers to set beside the "
                   "study's, a YAML file of the form of src/normlab/references.yaml (default: "
                   "that file: the GN paper, the implementation report, He et al.)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="training throughput against the usual pipeline and the machine's peak",
                       description="Steady-state training throughput (images/s after warm-up) of "
                       "normlab and of a reference pipeline written like the usual CIFAR scripts "
                       "(per-sample Dataset + DataLoader, fp32, NCHW, GN by the reshape formula), "
                       "timed alternately in one process, with the measured matmul peak and the "
                       "model's counted training FLOPs. normlab is timed in fp32 and in bf16 autocast "
                       "(each against the matmul peak of its own precision) unless --amp or --no-amp "
                       "picks one. Quote the ratios: absolute times drift.")
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
    add_search_groups_parser(sub)
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


class PipeSafe:
    """stdout that survives its reader going away (`normlab ... | head`): the rest of the output
    goes to /dev/null and the work goes on, instead of a BrokenPipeError traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._detach()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._detach()

    def _detach(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = PipeSafe(stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()  # a reader gone by now must not cost a traceback at exit either
        sys.stdout = stdout


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with benchmark results
    previous = install_signal_handlers()
    from .distributed import processes
    from .engine import EXIT_INTERRUPTED, Interrupted, RunBusy
    try:
        if processes() > 1 and args.command != "train":
            raise NormlabError(f"only 'normlab train' runs under torchrun (one run on K processes); "
                               f"run 'normlab {args.command}' without torchrun")
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
