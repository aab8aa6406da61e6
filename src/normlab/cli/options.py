"""The options that several commands share, and the run config and runtime options they make."""
from __future__ import annotations

import argparse
import sys

from ..config import FAST_PATHS, RunConfig, RuntimeOptions, brief
from ..data import DATA_CHOICES
from ..errors import NormlabError
from ..norms import SPEC_HELP

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
    g.add_argument("--warmup", metavar="LENGTH[:SHAPE]",
                   help="a warm-up of LENGTH epochs (2, 0.5epochs) or steps (400steps); SHAPE linear "
                        "(from --warmup-factor x lr up to lr, the default) or constant (--warmup-factor x "
                        "lr, then lr: He et al.'s ResNet-110 is --warmup 400steps:constant) (default: none)")
    g.add_argument("--warmup-factor", type=float, default=d.warmup_factor, metavar="F",
                   help="the warm-up's lr is F x lr (constant) or starts there (linear) (default: %(default)s)")
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


def add_runtime_options(p: argparse.ArgumentParser, training: bool = True) -> None:
    """How to run; training=False (bench) leaves out what only runs with a run directory and a
    data set use: --data-dir, --checkpoint-every, --force."""
    g = p.add_argument_group("how to run")
    if training:
        g.add_argument("--data-dir", help="directory holding cifar-10-batches-py/ or cifar-100-python/, "
                       "for --data cifar10 or cifar100 (default: $NORMLAB_DATA or ~/.cache/normlab/data; "
                       "downloaded when empty)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default: %(default)s)")
    g.add_argument("--threads", type=int, help="CPU threads per run (default: torch's choice)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for BN, off for GN/LN/IN, whose "
                        "kernels are NCHW-only on CUDA and slower so on CPU; see benchmarks/)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: auto, on for CUDA and for CPUs with native bf16 "
                        "(AMX, AVX512-BF16, Arm BF16), where it trains about twice as fast; fp32 on "
                        "other CPUs, where bf16 is slower" + ("; the choice is recorded in config.json)"
                                                               if training else ")"))
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fast-path", choices=FAST_PATHS, default="off",
                   help="CUDA only, for small batches: graph captures the whole training step as "
                        "one CUDA graph; compile is torch.compile(mode='reduce-overhead') of the "
                        "model; results equal the eager step's to float rounding (default: "
                        "%(default)s; see benchmarks/gpu/)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (torch.use_deterministic_algorithms, cuDNN "
                        "deterministic), so that a run resumed on CUDA continues exactly; slower "
                        "on CUDA, no effect on the CPU's results; recorded in config.json, never "
                        "part of the run id")
    g.add_argument("--probes", action=argparse.BooleanOptionalAction, default=None,
                   help="measure inside the network at the end of every epoch (statistic gaps, activation "
                        "and gradient norms per layer, feature rank; probes.csv): never changes training "
                        "(default: off for train; for reproduce the preset's choice, else on for the runs "
                        "they cost at most 5 %% of training, e.g. CIFAR-10 runs of 5+ epochs; bench: time them)")
    if training:
        g.add_argument("--checkpoint-every", type=float, metavar="MIN", dest="checkpoint_minutes",
                       help="also checkpoint within an epoch every MIN minutes (default: at the end "
                            "of every epoch only)")
        g.add_argument("--force", action="store_true",
                       help="start afresh a run whose directory holds a different config (the old "
                            "directory is renamed, never deleted)")


def check_data_dir(data_dir: str | None, datasets, fix: str) -> None:
    """Refuse --data-dir where no run reads a data set from a directory (the bundled sample is
    in the package): the user meant another data set, and would silently train on the sample."""
    from ..data import SOURCES

    if data_dir is not None and not any(d in SOURCES for d in datasets):
        raise NormlabError(f"--data-dir {data_dir} is read only for the CIFAR data sets, and these runs "
                           f"train on the bundled sample; {fix}, or leave out --data-dir")


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


def add_log_options(p: argparse.ArgumentParser) -> None:
    from ..loggers import DEFAULT_EVERY, TOOLS

    g = p.add_argument_group("live curves (see README, Watching runs live)")
    g.add_argument("--log", "--log-to", dest="log", action="append", type=log_tools, metavar="TOOL[,TOOL]",
                   help=f"also log to {', '.join(TOOLS)} (repeat or list with commas): every "
                        f"column of metrics.csv per epoch, the training loss and lr every --log-every "
                        f"steps, the config, the final number; pip install 'normlab[TOOL]'. Under "
                        f"torchrun write --log-to (torchrun reads --log as its own --log-dir) "
                        f"(default: none)")
    g.add_argument("--log-every", type=int, default=DEFAULT_EVERY, metavar="K",
                   help="steps between training-loss points with --log (default: %(default)s)")


def log_tools(text: str) -> list[str]:
    from ..loggers import TOOLS

    tools = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        raise argparse.ArgumentTypeError(f"unknown tool '{unknown[0] if unknown else text}'; "
                                         f"use {', '.join(TOOLS)}")
    return tools


def log_options(args, out, study: str):
    """The --log options, checked where the command starts (see loggers.options)."""
    from ..loggers import options

    if args.log_every < 1:
        raise NormlabError(f"--log-every must be a positive number of steps, got {args.log_every}")
    tools = [t for group in args.log or [] for t in group]
    return options(tools, args.log_every, out, study) if tools else None


def parse_warmup(text: str | None) -> dict:
    """--warmup '2', '0.5epochs', '400steps', each optionally ':linear' or ':constant', as run
    config fields."""
    if text is None:
        return {}
    length, _, shape = text.strip().lower().partition(":")
    number = length.removesuffix("epochs").removesuffix("epoch").removesuffix("steps").removesuffix("step")
    try:
        value = float(number)
    except ValueError:
        value = None
    steps = length.endswith(("steps", "step"))
    if value is None or value < 0 or (steps and not value.is_integer()) or shape not in ("", "linear", "constant"):
        raise NormlabError(f"--warmup {text}: give a length in epochs (2, 0.5epochs) or whole steps (400steps), "
                           f"optionally followed by :linear or :constant, e.g. --warmup 400steps:constant")
    return {("warmup_steps" if steps else "warmup_epochs"): int(value) if steps else value,
            "warmup_shape": shape or "linear"}


def run_config(args, processes: int = 1) -> RunConfig:
    """The run config of `normlab train`; under torchrun the K processes are its K devices,
    so that the run is the same (same id) as --virtual-gpus K in one process."""
    fields = RunConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    values.update(parse_warmup(getattr(args, "warmup", None)))
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


def runtime_options(args, probes: bool | None = False) -> RuntimeOptions:
    """The runtime options given on the command line; `probes` is the command's default."""
    if args.threads is not None and not 1 <= args.threads <= 4096:
        raise NormlabError(f"--threads must be positive, at most 4096, got {brief(args.threads)}")
    minutes = getattr(args, "checkpoint_minutes", None)
    if minutes is not None and minutes <= 0:
        raise NormlabError(f"--checkpoint-every must be a positive number of minutes, got {minutes}")
    return RuntimeOptions(device=args.device, threads=args.threads, data_dir=getattr(args, "data_dir", None),
                          channels_last=args.channels_last, amp=args.amp, compile=args.compile,
                          checkpoint_minutes=minutes,
                          progress=not getattr(args, "quiet", False) and sys.stderr.isatty(),
                          deterministic=args.deterministic, fast_path=args.fast_path,
                          probes=probes if getattr(args, "probes", None) is None else args.probes)
