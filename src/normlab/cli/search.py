"""normlab search-groups: which GN grouping is best (src/normlab/search/)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import NormlabError
from ..data import DATA_CHOICES
from .options import DEFAULTS, add_log_options, add_runtime_options, check_data_dir, log_options, runtime_options


def cmd_search_groups(args) -> int:
    from ..search.candidates import parse_candidates
    from ..search.plan import QUICK, describe, make_spec, probe
    from ..search.results import collect, text, write
    from ..search.workers import run_workers
    from ..study import parse_overrides

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
    check_data_dir(args.data_dir, [spec.base.data], "add --data cifar10 (or cifar100)")
    opts = runtime_options(args)
    print(describe(spec, probe(spec, opts)), flush=True)
    if args.dry_run:
        return 0
    opts.log = log_options(args, args.out, "search-groups")
    from ..train import EXIT_INTERRUPTED
    from ..train.control import working
    with working():  # a signal now checkpoints the trials (exit 75)
        state, search = run_workers(Path(args.out), spec, opts, workers, args.force, args.quiet)
    if state != "done":
        print("normlab: stopped; run the same command again to resume the search", file=sys.stderr)
        return EXIT_INTERRUPTED
    result = collect(search, opts)
    json_path, md_path = write(search, result)
    print("\n" + text(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


def add_parser(sub) -> None:
    from ..search.plan import QUICK

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
    add_log_options(p)
    p.set_defaults(func=cmd_search_groups)
