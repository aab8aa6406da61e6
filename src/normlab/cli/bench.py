"""normlab bench: training throughput against the usual pipeline and the machine's peak."""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import RunConfig
from ..errors import NormlabError
from ..precision import describe as describe_precision
from .options import add_runtime_options, runtime_options


def cmd_bench(args) -> int:
    import itertools
    import json

    import torch

    from ..bench import (PRECISIONS, bench_config, bench_norm_layers, bench_zoo_layers, peak_matmul_flops,
                        training_flops_per_image)
    from ..train import resolve_device
    from ..precision import choose_amp
    from ..rundir import atomic_write

    for name in ("steps", "repeats", "virtual_gpus"):
        if getattr(args, name) < 1:
            raise NormlabError(f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}")
    if args.warmup < 0:
        raise NormlabError(f"--warmup must be 0 or more steps, got {args.warmup}")
    opts = runtime_options(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    progress = Progress(enabled=not args.quiet)
    if args.fuse:
        return bench_arrays(args, opts, device)
    configs = [RunConfig(model=m, norm=n, batch_size=b, virtual_gpus=args.virtual_gpus, data="sample").normalized().validate()
               for m, n, b in itertools.product(args.model, args.norm, args.batch_size)]
    # --amp / --no-amp time that precision only; by default both, each against its own peak,
    # where the device computes bf16 natively (elsewhere bf16 is emulated, very slow, never chosen)
    native = choose_amp(device, None)[0]
    precisions = ("bf16",) if opts.amp else ("fp32",) if opts.amp is False or not native else ("fp32", "bf16")
    if opts.fast_path != "off":  # the captured step keeps the precision it was built with
        precisions = ("bf16",) if choose_amp(device, opts.amp)[0] else ("fp32",)
    progress("measuring the matmul peak")
    peaks = {p: peak_matmul_flops(device, dtype=PRECISIONS[p]) for p in precisions}
    progress.done()
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; measured matmul "
          f"peak " + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in precisions))
    print(describe_precision(*choose_amp(device, opts.amp)))
    header = (f"{'model':<10} {'norm':<14} {'batch':>7} {'precision':>9} {'normlab img/s':>14} "
              f"{'reference img/s':>16} {'speed-up':>9} {'GFLOP/s':>8} {'% peak':>7}")
    print(header)
    results, flops = [], {}
    for i, cfg in enumerate(configs, 1):
        key = (cfg.model, cfg.norm)
        name = f"[{i}/{len(configs)}] {cfg.model} {cfg.norm} batch {cfg.batch_size}"
        if key not in flops:
            progress(f"{name}: counting its FLOPs")
            flops[key] = training_flops_per_image(cfg.model, cfg.norm)
        r = bench_config(cfg, opts, args.steps, args.warmup, args.repeats, not args.no_reference,
                         args.reference_workers, precisions, progress=lambda text: progress(f"{name}: {text}"))
        r["train_flops_per_image"] = flops[key]
        for p, entry in r["precisions"].items():
            entry["achieved_flops"] = entry["images_per_s"] * flops[key]
            entry["fraction_of_peak"] = entry["achieved_flops"] / peaks[p]  # against its own peak
        r["achieved_flops"] = r["precisions"][r["precision"]]["achieved_flops"]
        r["fraction_of_peak"] = r["precisions"][r["precision"]]["fraction_of_peak"]
        results.append(r)
        progress.done()
        batch = f"{cfg.batch_size}x{cfg.virtual_gpus}" if cfg.virtual_gpus > 1 else str(cfg.batch_size)
        ref = f"{r['reference_images_per_s']:16.1f}" if "reference_images_per_s" in r else f"{'-':>16}"
        for p, entry in r["precisions"].items():
            speedup = f"{entry['speedup']:8.2f}x" if "speedup" in entry else f"{'-':>9}"
            print(f"{cfg.model:<10} {cfg.norm:<14} {batch:>7} {p:>9} {entry['images_per_s']:14.1f} {ref} "
                  f"{speedup} {entry['achieved_flops'] / 1e9:8.1f} {100 * entry['fraction_of_peak']:6.1f}%",
                  flush=True)
        if r["ratios"]:
            print(f"{'':<10} measured side by side: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()),
                  flush=True)
    if opts.probes:
        bench_probe_costs(args, opts, configs, results)
    report = {"command": "normlab " + " ".join(args.argv), "peak_matmul_flops": peaks.get("fp32"),
              "peak_matmul_flops_by_precision": peaks, "torch": torch.__version__, "results": results}
    if len(results) == 1:
        report.update({k: v for k, v in results[0].items()})
    if args.norm_layers:
        progress("timing the norm layers alone")
        report["norm_layers"] = bench_norm_layers(device)
        progress("timing the norm + activation layers")
        report["zoo_layers"] = bench_zoo_layers(device)
        progress.done()
        print("\nnorm layers, forward + backward (microseconds per call), batch 32, G = 16:")
        for row in report["norm_layers"]:
            print(f"  {str(tuple(row['shape'])):<18} {row['format']:<14} {row['impl']:<28} {row['microseconds']:9.1f}")
        print("\nnorm + activation layers and the WS conv, forward + backward, each in its default format:")
        for row in report["zoo_layers"]:
            print(f"  {str(tuple(row['shape'])):<18} {row['format']:<14} {row['layer']:<16} "
                  f"{row['microseconds']:9.1f} us  {row['relative']:5.2f}x {row['relative_to']}")
    if args.json:
        atomic_write(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def bench_probe_costs(args, opts, configs, results) -> None:
    """--probes: each config's probes timed against its training steps (bench.bench_probes)."""
    from ..bench import bench_probes

    print("\nprobes against training steps, as a share of an epoch's training steps (a probe pass after "
          "every epoch and at initialization; the final epoch adds the test errors over the test set):")
    print(f"{'model':<10} {'norm':<14} {'batch':>7} {'probe pass s':>13} {'sample epoch':>13} {'sample final':>13} "
          f"{'CIFAR-10 epoch':>15} {'CIFAR-10 final':>15} {f'{configs[0].epochs}-ep. CIFAR-10 run':>22}")
    for cfg, r in zip(configs, results):
        p = bench_probes(cfg, opts, args.steps, args.warmup, args.repeats)
        r["probes"] = p
        batch = f"{cfg.batch_size}x{cfg.virtual_gpus}" if cfg.virtual_gpus > 1 else str(cfg.batch_size)
        sample, cifar = p["overhead"]["sample"], p["overhead"]["cifar10"]
        print(f"{cfg.model:<10} {cfg.norm:<14} {batch:>7} {p['probe_pass_seconds']:13.3f} "
              f"{100 * sample['per_epoch']:12.1f}% {100 * sample['final_epoch']:12.1f}% "
              f"{100 * cifar['per_epoch']:14.2f}% {100 * cifar['final_epoch']:14.2f}% {100 * cifar['run']:21.2f}%",
              flush=True)


def bench_arrays(args, opts, device) -> int:
    """--fuse R: R runs fused into one array against the same R runs one after another."""
    import itertools
    import json

    import torch

    from ..bench import bench_fused
    from ..precision import choose_amp
    from ..rundir import atomic_write

    if any(r < 2 for r in args.fuse):
        raise NormlabError(f"--fuse takes array sizes of 2 or more, got {args.fuse}")
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(describe_precision(*choose_amp(device, opts.amp)))
    print(f"{'model':<10} {'norm':<10} {'batch':>7} {'runs':>5} {'fused img/s':>12} {'separate img/s':>15} "
          f"{'speed-up':>9}")
    results = []
    for m, n, b, r in itertools.product(args.model, args.norm, args.batch_size, args.fuse):
        cfg = RunConfig(model=m, norm=n, batch_size=b, virtual_gpus=args.virtual_gpus,
                        data="sample").normalized().validate()
        row = bench_fused(cfg, opts, r, args.steps, args.warmup, args.repeats)
        results.append(row)
        batch = f"{b}x{args.virtual_gpus}" if args.virtual_gpus > 1 else str(b)
        print(f"{cfg.model:<10} {cfg.norm:<10} {batch:>7} {r:>5} {row['fused_images_per_s']:12.1f} "
              f"{row['separate_images_per_s']:15.1f} {row['speedup']:8.2f}x", flush=True)
    if args.json:
        report = {"command": "normlab " + " ".join(args.argv), "torch": torch.__version__,
                  "cpu": torch.cpu.get_capabilities().get("cpu_name") if device.type == "cpu" else None,
                  "results": results}
        atomic_write(Path(args.json), (json.dumps(report, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def add_parser(sub) -> None:
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
    p.add_argument("--fuse", type=int, nargs="+", metavar="R", help="instead: R runs (seeds 0..R-1) "
                   "trained as one fused array against the same R runs one after another, e.g. --fuse "
                   "2 4 8; reports fused_images_per_s and separate_images_per_s over all R runs")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress line (there is none when stderr "
                   "is not a terminal)")
    add_runtime_options(p, training=False)
    p.set_defaults(func=cmd_bench)


class Progress:
    """What bench is timing now, on one line of stderr that each step overwrites (a terminal
    only: the results on stdout stay clean for pipes and files)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        if self.enabled:
            line = f"bench: {text}"
            print("\r" + line.ljust(self.width), end="", file=sys.stderr, flush=True)
            self.width = len(line)

    def done(self) -> None:
        if self.enabled and self.width:
            print("\r" + " " * self.width + "\r", end="", file=sys.stderr, flush=True)
            self.width = 0
