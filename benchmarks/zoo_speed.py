"""Training speed of every norm of the zoo against GN, side by side in one process.

    python benchmarks/zoo_speed.py --threads 1 --json benchmarks/cpu-zoo-resnet56-interleaved.json

`normlab bench --norm A B ...` times one norm after the other; on a shared machine whose speed
drifts by 2x within minutes that ordering decides the ratios. Here every norm's run is built
first, then many short rounds alternate between them (the order rotating each round); each
round gives each norm's slowdown against the first norm (GN) timed in that same round, and the
median over rounds is reported: slowdown = GN images/s / norm images/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from normlab.bench import time_steps
from normlab.config import RunConfig, RuntimeOptions
from normlab.train import Trainer

NORMS = ["gn:16", "bn", "brn", "frn", "evonorm-s0:16", "evonorm-b0", "gn:16+ws", "bn+ws"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norms", nargs="+", default=NORMS)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per norm and round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (default: fp32, whatever the CPU)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {}
    for norm in args.norms:
        cfg = RunConfig(model=args.model, norm=norm, batch_size=args.batch_size, data="sample").normalized().validate()
        run = Trainer([cfg], ["unused"], RuntimeOptions(progress=False, amp=args.amp))
        run.model.train()
        n = len(run.data.train) - cfg.images_per_step

        def step(run=run, cfg=cfg, n=n, cursor=[0]):
            start = cursor[0] % n
            cursor[0] += cfg.images_per_step
            run.train_step([torch.arange(start, start + cfg.images_per_step, device=run.device)], cfg.lr)
        steps[norm] = step
    rates = {norm: [] for norm in args.norms}
    for r in range(args.rounds):
        order = args.norms[r % len(args.norms):] + args.norms[:r % len(args.norms)]
        for norm in order:
            seconds = time_steps(steps[norm], args.steps, 1, torch.device("cpu"))
            rates[norm].append(args.steps * args.batch_size / seconds)
            print(f"round {r + 1}: {norm:<14} {rates[norm][-1]:7.1f} img/s", flush=True)
    base = rates[args.norms[0]]
    print(f"\n{args.model}, batch {args.batch_size}, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'norm':<14} {'img/s':>7} {'slowdown vs ' + args.norms[0]:>18} {'(quartiles)':>14}")
    rows = []
    for norm in args.norms:
        ratios = [b / r for b, r in zip(base, rates[norm])]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        rows.append({"norm": norm, "images_per_s": statistics.median(rates[norm]), "images_per_s_all": rates[norm],
                     "slowdown_vs_first": statistics.median(ratios), "slowdown_per_round": ratios})
        print(f"{norm:<14} {statistics.median(rates[norm]):7.1f} {statistics.median(ratios):17.2f}x "
              f"{q1:6.2f}-{q3:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/zoo_speed.py " + " ".join(sys.argv[1:]),
                       "precision": "bf16" if args.amp else "fp32", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
