"""Markdown tables and the text of their cells: results with their intervals, run lists."""
from __future__ import annotations

import collections

from .. import rundir
from ..config import RunConfig
from ..stats import format_summary, half_width
from .escape import markdown
from .labels import label, sort_key, variant
from .runs import Point, Run, group_points

NUMBER = "median of the final 5 epochs"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell(point: Point | None, single: bool = False) -> str:
    """'7.45 ± 0.12 [7.20, 7.70]' (mean ± std [95 % CI] over seeds), '7.45 (1 seed)', or plain
    '7.45' when the whole table has one seed per point (`single`: said once above it); runs
    that did not finish are counted after the number (Point.seed_note)."""
    if point is None:
        return "-"
    summary = point.summary()
    note = point.seed_note()
    if summary is None:
        return note or "no data"
    text = f"{summary.mean:.2f}" if single and summary.n == 1 else format_summary(summary)
    if note and text.endswith(")"):  # '90.00 (1 seed; 1 of 1 seed diverged, counted at 90 % error)'
        return f"{text[:-1]}; {note})"
    return text + (f" ({note})" if note else "")


def all_single(points: list[Point]) -> bool:
    return all(len(p.finals) < 2 for p in points)


def describe_schedule(cfg: RunConfig) -> str:
    length = f"{cfg.warmup_epochs:g} epochs" if cfg.warmup_epochs else f"{cfg.warmup_steps} steps"
    warm = (f" after a {cfg.warmup_shape} warm-up of {length} from {cfg.warmup_factor:g} x lr"
            if cfg.warmup_epochs or cfg.warmup_steps else "")
    if cfg.schedule == "step":
        return f"lr / 10 every {cfg.step_size} epochs{warm}"
    if cfg.schedule == "multistep":
        return f"lr / 10 at epochs {', '.join(map(str, cfg.milestones))}{warm}"
    return f"cosine{warm}"


def seeds_per_point(runs: list[Run]) -> collections.Counter:
    """How many points have 1, 2, ... finished seeds."""
    return collections.Counter(len(p.finals) for p in group_points(runs).values() if p.finals)


def number(runs: list[Run]) -> str:
    """What a table's number is for these runs: 'median of the final 3 epochs'."""
    counts = {rundir.final_epochs(r.cfg.epochs) for r in runs}
    if len(counts) != 1:
        return "median of the final epochs (how many: see the setup)"
    k = counts.pop()
    return "final epoch" if k == 1 else f"median of the final {k} epochs"


def final_rule(runs: list[Run]) -> list[str]:
    """The setup line saying which epochs the number takes, warning where the runs are too short
    for the GN paper's rule."""
    lengths = sorted({r.cfg.epochs for r in runs})
    which = ", ".join(f"the final {rundir.final_epochs(e)} of {e}" for e in lengths)
    line = (f"- the number reported: the median test error of the final min(5, epochs // 2) epochs "
            f"(at least 1): {which}")
    short = [e for e in lengths if rundir.final_epochs(e) < 5]
    if short:
        line += (f". **Runs of {', '.join(map(str, short))} epochs are too short for the GN paper's rule** "
                 f"(the final 5 of 100 epochs): 5 would reach back into epochs far from converged, so "
                 f"fewer are taken")
    return [line]


def seeds_notice(points: list[Point]) -> list[str]:
    """What every number of the report is, said once at its top: the one-seed notice, or how the
    intervals are made."""
    counts = [len(p.finals) for p in points if p.finals]
    if not counts or max(counts) < 2:
        return ["**One seed per point**: every number in this report is a single run, with no interval, "
                "and every verdict is inconclusive; a difference within the seed-to-seed spread (± 0.16 "
                "points over 5 runs for He et al.'s CIFAR-10 ResNet-110; more on small data) may be "
                "noise. Run `--seeds 3` or more for intervals."]
    widths = ", ".join(f"± {half_width(n):.1f} std with {n} seeds" for n in (2, 3, 5))
    text = ("Every number is the mean over seeds ± its standard deviation, with the 95 % confidence "
            "interval of the mean in brackets (Student t); differences carry a 95 % interval, paired over "
            "seeds where both points hold the same seeds, else Welch's "
            f"(the interval is {widths}: few seeds give wide intervals).")
    if min(counts) < 2:
        text += " Points marked (1 seed) have one finished seed and no interval."
    return [text]


SIGNS = ("Differences are written A − B in points of error, positive where A's error is higher: "
         "BN − GN > 0 means that BN does worse than GN.")


def setup_lines(runs: list[Run]) -> list[str]:
    """The setup of one study's runs."""
    def values(get):  # text from config.json: escaped
        return ", ".join(sorted({markdown(get(r)) for r in runs}))
    seconds = sum(row.get("seconds", 0) for r in runs for row in r.rows)
    semantics = {markdown(r.info.get("batch_semantics", "")) for r in runs}
    cfgs = [r.cfg for r in runs]
    seeds = seeds_per_point(runs)
    spread = ", ".join(f"{c} point{'s' if c > 1 else ''} with {k} finished seed{'s' if k > 1 else ''}"
                       for k, c in sorted(seeds.items()))
    lines = [
        f"- models: {values(lambda r: r.cfg.model)}; shortcut {values(lambda r: r.cfg.shortcut)}; "
        f"gamma = 0 in each block's last norm: {values(lambda r: r.cfg.zero_init_residual)}",
        f"- epochs: {values(lambda r: r.cfg.epochs)}; schedule: {values(lambda r: describe_schedule(r.cfg))}",
        f"- learning rate: base_lr x N / base_batch with N the images per device "
        f"(base_lr {values(lambda r: r.cfg.base_lr)}, base_batch {values(lambda r: r.cfg.base_batch)}); "
        f"SGD momentum {values(lambda r: r.cfg.momentum)}, weight decay {values(lambda r: r.cfg.weight_decay)} "
        f"({'on all parameters' if all(c.wd_on_norm for c in cfgs) else 'not on norm parameters and biases in some runs'})",
        "- batch semantics: " + "; ".join(sorted(s for s in semantics if s)),
        f"- data: {values(lambda r: r.info.get('data', {}).get('name'))} "
        f"({values(lambda r: r.info.get('data', {}).get('train'))} training, "
        f"{values(lambda r: r.info.get('data', {}).get('test'))} test images"
        + (f", {values(lambda r: r.info.get('data', {}).get('val'))} validation" if any(c.val_split for c in cfgs) else "")
        + "); pad-4 random crop + horizontal flip",
        f"- device: {values(lambda r: r.info.get('device'))}; torch {values(lambda r: r.info.get('torch'))}",
        f"- seeds: {values(lambda r: r.cfg.seed)}" + (f" ({spread})" if spread else ""),
        f"- runs: {len(runs)} ({', '.join(f'{n} {markdown(s)}' for s, n in collections.Counter(r.state for r in runs).items())}); "
        f"training wall time {seconds / 3600:.2f} h in total",
    ]
    return lines + final_rule(runs)


def all_runs_table(runs: list[Run]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (sort_key(variant(r.cfg)), -r.cfg.batch_size, r.cfg.seed)):
        final = f"{r.final:.2f}" if r.final is not None else "-"
        state = markdown(r.state) + (f" (epoch {markdown(r.status.get('diverged_in_epoch'))})" if r.state == "diverged" else "")
        if r.state not in ("done", "diverged"):
            state += f" ({len(r.rows)}/{r.cfg.epochs} epochs)"
        last = f"{r.rows[-1]['test_error']:.2f}" if r.rows else "-"
        rows.append([markdown(r.id), label(variant(r.cfg)), r.cfg.batch_size, r.cfg.virtual_gpus, r.cfg.seed,
                     f"{r.cfg.lr:.4g}", len(r.rows), final, last, state])
    return table(["run", "norm", "batch", "virtual GPUs", "seed", "lr", "epochs",
                  f"test error (%), {number(runs)}", "at the last epoch", "state"], rows)
