"""normlab report: report.md, figures and tidy CSV files from run directories."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import NormlabError


def cmd_report(args) -> int:
    from ..report import build_report

    if args.references and not Path(args.references).is_file():
        raise NormlabError(f"--references {args.references}: no such file; give a YAML file of the "
                           f"form of normlab's references.yaml, or leave the option out")
    if not (math.isfinite(args.flat_margin) and args.flat_margin > 0):
        raise NormlabError(f"--flat-margin must be a positive number of points of error (e.g. 1), got "
                           f"{args.flat_margin}")
    print(f"report: {build_report(Path(args.results), references=args.references, out=args.out, flat_margin=args.flat_margin)}")
    return 0


def add_parser(sub) -> None:
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
    p.add_argument("--flat-margin", type=float, default=1.0, metavar="POINTS", help="the claim that GN's "
                   "error stays flat as the batch shrinks agrees when every change lies within +/- POINTS "
                   "points of error, disagrees beyond them; choose it from your question before looking "
                   "(default: %(default)s: above GN's published movement, 0.2, and the seed spread of "
                   "CIFAR ResNets, 0.16; a tenth of BN's published degradation, 11.1)")
    p.set_defaults(func=cmd_report)
