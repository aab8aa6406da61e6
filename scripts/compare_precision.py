"""Do bf16 and fp32 runs end within the seed-to-seed spread of fp32? (issue 11's equality check)

    normlab reproduce --preset quick --seeds 3 --no-amp --out /tmp/fp32
    normlab reproduce --preset quick --seeds 3 --amp    --out /tmp/bf16
    python scripts/compare_precision.py /tmp/fp32 /tmp/bf16 > benchmarks/cpu-bf16-equality.md

Precision is how a run is executed, not what is trained, so both directories hold the same run
ids. For each point (a config over its seeds) it prints the fp32 mean, standard deviation and
range over seeds of the GN paper's number (median test error of the final 5 epochs), the bf16
mean, and the largest same-seed difference |bf16 − fp32|; a point passes when that difference
is within the fp32 range over seeds (max − min) and the two means differ by less than it.
"""
from __future__ import annotations

import collections
import math
import statistics
import sys
from pathlib import Path

from normlab import rundir, stats
from normlab.config import RunConfig


def finals(root: Path) -> dict[str, dict[int, float]]:
    """point (run id with seed 0) -> seed -> median test error of the final 5 epochs."""
    out = collections.defaultdict(dict)
    for path in rundir.list_runs(root):
        info, status = rundir.read_json(path / rundir.CONFIG), rundir.read_json(path / rundir.STATUS)
        if not info or not status or status.get("state") != "done":
            continue
        cfg = RunConfig.from_dict(info["config"])
        point = RunConfig.from_dict({**cfg.to_dict(), "seed": 0}).run_id().rsplit("-", 2)[0]
        out[point][cfg.seed] = status["summary"]["median_final5_test_error"]
    return out


def main(fp32_dir: str, bf16_dir: str) -> int:
    a, b = finals(Path(fp32_dir)), finals(Path(bf16_dir))
    points = sorted(set(a) & set(b))
    if not points:
        print("no finished runs in common", file=sys.stderr)
        return 2
    print("| point | seeds | fp32 mean ± std | fp32 range over seeds | bf16 mean | "
          "largest same-seed abs(bf16 − fp32) | within the fp32 spread |")
    print("|---|---|---|---|---|---|---|")
    passed, diffs, variances = 0, [], []
    for point in points:
        seeds = sorted(set(a[point]) & set(b[point]))
        fa, fb = [a[point][s] for s in seeds], [b[point][s] for s in seeds]
        spread = max(fa) - min(fa)
        worst = max(abs(x - y) for x, y in zip(fa, fb))
        ok = len(seeds) > 1 and worst <= spread and abs(statistics.fmean(fa) - statistics.fmean(fb)) < spread
        passed += ok
        std = statistics.stdev(fa) if len(fa) > 1 else 0.0
        diffs += [y - x for x, y in zip(fa, fb)]
        variances += [statistics.variance(fa)] if len(fa) > 1 else []
        print(f"| {point} | {len(seeds)} | {statistics.fmean(fa):.2f} ± {std:.2f} | {spread:.2f} | "
              f"{statistics.fmean(fb):.2f} | {worst:.2f} | {'yes' if ok else 'no'} |")
    print(f"\n{passed} of {len(points)} points within the fp32 seed-to-seed spread.")
    if variances and len(diffs) > 1:
        # Over all points: is there a systematic shift, and do same-seed pairs differ more than
        # two fp32 runs of different seeds would (sqrt(2) x the pooled seed std)?
        seed_std = math.sqrt(statistics.fmean(variances))
        shift = stats.summarize(diffs)
        rms = math.sqrt(statistics.fmean(d * d for d in diffs))
        print(f"\nAll {len(diffs)} same-seed pairs: bf16 − fp32 = {stats.format_summary(shift)} points "
              f"(mean ± std [95 % interval]); root-mean-square difference {rms:.2f} points, against "
              f"a pooled fp32 seed-to-seed std of {seed_std:.2f} (two fp32 runs of different seeds "
              f"differ by {math.sqrt(2) * seed_std:.2f} root-mean-square).")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
