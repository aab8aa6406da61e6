"""Markdown tables and the text of their cells: results with their intervals, run lists."""
from __future__ import annotations

import collections

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
    that did not finish are counted after the number."""
    if point is None:
        return "-"
    summary = point.summary()
    notes = [f"{n} {markdown(s)}" for s, n in point.states().items() if s != "done"]
    if summary is None:
        return ", ".join(notes) or "no data"
    text = f"{summary.mean:.2f}" if single and summary.n == 1 else format_summary(summary)
    if notes and text.endswith(")"):  # '55.00 (1 seed; 1 diverged)'
        return f"{text[:-1]}; {', '.join(notes)})"
    return text + (f" ({', '.join(notes)})" if notes else "")


def all_single(points: list[Point]) -> bool:
    return all(len(p.finals) < 2 for p in points)


def describe_schedule(cfg: RunConfig) -> str:
    warm = f" after {cfg.warmup_epochs:g} warm-up epochs" if cfg.warmup_epochs else ""
    if cfg.schedule == "step":
        return f"lr / 10 every {cfg.step_size} epochs{warm}"
    if cfg.schedule == "multistep":
        return f"lr / 10 at epochs {', '.join(map(str, cfg.milestones))}{warm}"
    return f"cosine{warm}"


def seeds_per_point(runs: list[Run]) -> collections.Counter:
    """How many points have 1, 2, ... finished seeds."""
    return collections.Counter(len(p.finals) for p in group_points(runs).values() if p.finals)


def setup_lines(runs: list[Run]) -> list[str]:
    def values(get):  # text from config.json: escaped
        return ", ".join(sorted({markdown(get(r)) for r in runs}))
    seconds = sum(row.get("seconds", 0) for r in runs for row in r.rows)
    semantics = {markdown(r.info.get("batch_semantics", "")) for r in runs}
    cfgs = [r.cfg for r in runs]
    seeds = seeds_per_point(runs)
    if seeds and max(seeds) >= 2:
        spread = ", ".join(f"{c} point{'s' if c > 1 else ''} with {k} finished seed{'s' if k > 1 else ''}"
                           for k, c in sorted(seeds.items()))
        uncertainty = (f"- seeds: {spread}; every number is the mean over seeds ± its standard "
                       f"deviation, with the 95 % confidence interval of the mean in brackets "
                       f"(Student t); differences carry Welch's 95 % interval")
        if min(seeds) < 5:
            widths = ", ".join(f"± {half_width(n):.1f} std with {n} seeds" for n in (2, 3, 5))
            uncertainty += f" (the interval is {widths}: few seeds give wide intervals)"
    else:
        uncertainty = ("- seeds: one per point, so there are **no intervals**: each number is a "
                       "single run, and a difference within the seed-to-seed spread (± 0.16 points "
                       "over 5 runs for He et al.'s CIFAR-10 ResNet-110; more on small data) may "
                       "be noise; run `--seeds 3` or more for intervals")
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
        f"- device: {values(lambda r: r.info.get('device'))}; torch {values(lambda r: r.info.get('torch'))}; "
        f"seeds: {values(lambda r: r.cfg.seed)}",
        f"- runs: {len(runs)} ({', '.join(f'{n} {markdown(s)}' for s, n in collections.Counter(r.state for r in runs).items())}); "
        f"training wall time {seconds / 3600:.2f} h in total",
        "- the number reported is the median test error of the final 5 epochs (as in the GN paper), "
        "mean ± std over seeds",
        uncertainty,
    ]
    return lines


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
                  "test error (%), median of final 5", "at the last epoch", "state"], rows)
