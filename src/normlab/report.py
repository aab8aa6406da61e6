"""The report: a pure function of run directories (never trains, never needs the data set).

Writes <results>/report.md with PNG figures beside it in <results>/figures/:
  norms_<model>.png        train and test error against epoch, one line per norm
  batch_size_<model>.png   final error against batch size, large to small
  batch_curves_<model>.png BN and GN test error curves at each batch size
  groups_<model>.png       GN error curves per group count, and final error against G
and tables of the median test error of the final 5 epochs (mean +- std over seeds).
Which runs belong to which study comes from study.json when `normlab reproduce` wrote one;
otherwise it is inferred from the configs.
"""
from __future__ import annotations

import collections
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .config import RunConfig
from .errors import NormlabError
from .norms import parse_norm

# One colour, marker and line style per norm family, kept across figures and readable in grey.
FAMILY_STYLE = {
    "bn": {"color": "#000000", "marker": "o", "linestyle": "-"},
    "gn": {"color": "#D55E00", "marker": "s", "linestyle": "--"},
    "ln": {"color": "#0072B2", "marker": "^", "linestyle": "-."},
    "in": {"color": "#009E73", "marker": "D", "linestyle": ":"},
}
FAMILY_ORDER = ("bn", "ln", "in", "gn")


@dataclass
class Run:
    id: str
    path: Path
    cfg: RunConfig
    info: dict
    rows: list[dict]
    status: dict

    @property
    def state(self) -> str:
        return self.status.get("state", "new")

    @property
    def final(self) -> float | None:
        """The GN paper's number: median test error of the final 5 epochs (finished runs only)."""
        if self.state != "done" or not self.rows:
            return None
        return statistics.median(r["test_error"] for r in self.rows[-5:])


@dataclass
class Point:
    """The seeds of one configuration."""
    cfg: RunConfig
    runs: list[Run] = field(default_factory=list)

    @property
    def finals(self) -> list[float]:
        return [r.final for r in self.runs if r.final is not None]

    def mean_std(self) -> tuple[float, float] | None:
        finals = self.finals
        if not finals:
            return None
        return statistics.fmean(finals), (statistics.stdev(finals) if len(finals) > 1 else 0.0)

    def cell(self) -> str:
        ms = self.mean_std()
        states = collections.Counter(r.state for r in self.runs)
        notes = [f"{n} {s}" for s, n in states.items() if s != "done"]
        if ms is None:
            return ", ".join(notes) or "no data"
        text = f"{ms[0]:.2f}" + (f" ± {ms[1]:.2f}" if len(self.finals) > 1 else "")
        return text + (f" ({', '.join(notes)})" if notes else "")

    def curve(self, column: str) -> tuple[list[int], list[float]]:
        """Mean over seeds of a metric per epoch, over the epochs every seed has."""
        rows = [r.rows for r in self.runs if r.rows]
        if not rows:
            return [], []
        n = min(len(r) for r in rows)
        return ([rows[0][i]["epoch"] for i in range(n)],
                [statistics.fmean(r[i][column] for r in rows) for i in range(n)])


def family(norm: str) -> str:
    return norm if norm in ("bn", "ln", "in") else "gn"


def label(norm: str) -> str:
    if norm in ("bn", "ln", "in"):
        return norm.upper()
    spec = parse_norm(norm)
    return f"GN {spec.per_group} ch/group" if spec.per_group else f"GN G={spec.groups}"


def load_runs(root: Path) -> list[Run]:
    runs = []
    for path in rundir.list_runs(root):
        info = rundir.read_json(path / rundir.CONFIG)
        if not info or "config" not in info:
            continue  # a run killed before its config was written has nothing to report
        try:
            cfg = RunConfig.from_dict(info["config"])
        except NormlabError:
            continue
        runs.append(Run(info.get("run_id", path.name), path, cfg, info,
                        rundir.read_metrics(path / rundir.METRICS),
                        rundir.read_json(path / rundir.STATUS) or {}))
    return runs


def group_points(runs: list[Run]) -> dict[str, Point]:
    """Runs that differ only in their seed form one point."""
    points: dict[str, Point] = {}
    for run in runs:
        key = RunConfig(**{**run.cfg.to_dict(), "milestones": run.cfg.milestones, "seed": 0}).run_id()
        points.setdefault(key, Point(run.cfg)).runs.append(run)
    return points


def membership(root: Path, runs: list[Run]) -> dict[str, set[str]]:
    """Study name -> run ids, from study.json or inferred from the configs."""
    study = rundir.read_json(Path(root) / "study.json")
    if study and isinstance(study.get("studies"), dict):
        return {name: set(ids) for name, ids in study["studies"].items()}
    batches = collections.Counter((r.cfg.batch_size, r.cfg.virtual_gpus) for r in runs)
    common = batches.most_common(1)[0][0] if batches else None
    at_common = {r.id for r in runs if (r.cfg.batch_size, r.cfg.virtual_gpus) == common}
    norms_at = collections.defaultdict(set)
    for r in runs:
        norms_at[r.cfg.norm].add(r.cfg.batch_size)
    return {"norms": at_common,
            "batch-size": {r.id for r in runs if len(norms_at[r.cfg.norm]) > 1},
            "groups": {r.id for r in runs if r.id in at_common and family(r.cfg.norm) != "bn"}}


# -- figures -------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9})
    return plt


def save_figure(plt, fig, path: Path) -> None:
    """PNG written atomically, like every file of a results directory."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    rundir.atomic_write(path, buffer.getvalue())


def norm_order(points: list[Point]) -> list[Point]:
    def key(p):
        spec = parse_norm(p.cfg.norm)
        return (FAMILY_ORDER.index(family(p.cfg.norm)), spec.per_group or 0, spec.groups or 0)
    return sorted(points, key=key)


def styles(norms) -> dict[str, dict]:
    """Norm -> line style: by family; several GN variants in one figure differ by marker."""
    out, gn_index = {}, 0
    for norm in sorted(set(norms), key=lambda n: (FAMILY_ORDER.index(family(n)), n)):
        out[norm] = dict(FAMILY_STYLE[family(norm)])
        if family(norm) == "gn":
            out[norm]["marker"] = "sPXv<>*"[gn_index % 7]
            gn_index += 1
    return out


def mark_diverged(ax, point: Point, xs, ys) -> None:
    if xs and any(r.state == "diverged" for r in point.runs):
        ax.plot(xs[-1], ys[-1], marker="x", color="red", markersize=10, zorder=5)


def plot_norm_curves(plt, points: list[Point], title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    style = styles(p.cfg.norm for p in points)
    for p in norm_order(points):
        s = style[p.cfg.norm]
        for ax, column in zip(axes, ("train_error", "test_error")):
            xs, ys = p.curve(column)
            ax.plot(xs, ys, label=label(p.cfg.norm), markevery=max(1, len(xs) // 10), **s)
            mark_diverged(ax, p, xs, ys)
    for ax, name in zip(axes, ("train error (%)", "test error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(plt, fig, path)


def plot_batch_sizes(plt, points: list[Point], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    by_norm = collections.defaultdict(list)
    for p in points:
        by_norm[p.cfg.norm].append(p)
    style = styles(by_norm)
    for norm in sorted(by_norm, key=lambda n: FAMILY_ORDER.index(family(n))):
        pts = sorted((p for p in by_norm[norm] if p.mean_std()), key=lambda p: -p.cfg.batch_size)
        if not pts:
            continue
        xs = [p.cfg.batch_size for p in pts]
        ms = [p.mean_std() for p in pts]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], label=label(norm), capsize=3,
                    **style[norm])
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()  # large batch on the left, as in the paper
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (images per device)")
    ax.set_ylabel("test error (%), median of final 5 epochs")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    save_figure(plt, fig, path)


def plot_batch_curves(plt, points: list[Point], title: str, path: Path) -> None:
    sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 3.2), sharey=True, squeeze=False)
    style = styles(p.cfg.norm for p in points)
    for ax, size in zip(axes[0], sizes):
        for p in norm_order([p for p in points if p.cfg.batch_size == size]):
            xs, ys = p.curve("test_error")
            ax.plot(xs, ys, label=label(p.cfg.norm), markevery=max(1, len(xs) // 8), **style[p.cfg.norm])
            mark_diverged(ax, p, xs, ys)
        ax.set_title(f"batch {size}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("test error (%)")
    axes[0][-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(plt, fig, path)


def plot_groups(plt, points: list[Point], title: str, path: Path) -> None:
    by_groups = sorted((p for p in points if parse_norm(p.cfg.norm).groups), key=lambda p: -parse_norm(p.cfg.norm).groups)
    by_cpg = sorted((p for p in points if parse_norm(p.cfg.norm).per_group), key=lambda p: parse_norm(p.cfg.norm).per_group)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    cmap = plt.get_cmap("viridis")
    markers = "osD^vP*X"
    for i, p in enumerate(by_groups):
        xs, ys = p.curve("test_error")
        axes[0].plot(xs, ys, label=f"G={parse_norm(p.cfg.norm).groups}", color=cmap(i / max(1, len(by_groups) - 1) * 0.9),
                     marker=markers[i % len(markers)], markevery=max(1, len(xs) // 8))
        mark_diverged(axes[0], p, xs, ys)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(title="groups")
    for pts, name, key, s in ((by_groups, "G groups", "groups", FAMILY_STYLE["gn"]),
                              (by_cpg, "channels per group", "per_group", FAMILY_STYLE["ln"])):
        pts = [p for p in pts if p.mean_std()]
        if not pts:
            continue
        xs = [getattr(parse_norm(p.cfg.norm), key) for p in pts]
        ms = [p.mean_std() for p in pts]
        axes[1].errorbar(xs, [m for m, _ in ms], yerr=[s_ for _, s_ in ms], label=name, capsize=3, **s)
    axes[1].set_xscale("log", base=2)
    ticks = sorted({getattr(parse_norm(p.cfg.norm), k) for p in points for k in ("groups", "per_group")} - {None})
    axes[1].set_xticks(ticks, [str(t) for t in ticks])
    axes[1].minorticks_off()
    axes[1].set_xlabel("G, or channels per group")
    axes[1].set_ylabel("test error (%), median of final 5 epochs")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(plt, fig, path)


# -- tables --------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gn_reference(points: list[Point]) -> str | None:
    """The GN variant to compare with BN: the one present at the most batch sizes."""
    counts = collections.Counter(p.cfg.norm for p in points if family(p.cfg.norm) == "gn")
    return counts.most_common(1)[0][0] if counts else None


def setup_lines(runs: list[Run]) -> list[str]:
    def values(get):
        return ", ".join(sorted({str(get(r)) for r in runs}))
    seconds = sum(row.get("seconds", 0) for r in runs for row in r.rows)
    semantics = {r.info.get("batch_semantics", "") for r in runs}
    cfgs = [r.cfg for r in runs]
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
        f"- runs: {len(runs)} ({', '.join(f'{n} {s}' for s, n in collections.Counter(r.state for r in runs).items())}); "
        f"training wall time {seconds / 3600:.2f} h in total",
        "- the number reported is the median test error of the final 5 epochs (as in the GN paper), "
        "mean ± std over seeds",
    ]
    return lines


def describe_schedule(cfg: RunConfig) -> str:
    warm = f" after {cfg.warmup_epochs:g} warm-up epochs" if cfg.warmup_epochs else ""
    if cfg.schedule == "step":
        return f"lr / 10 every {cfg.step_size} epochs{warm}"
    if cfg.schedule == "multistep":
        return f"lr / 10 at epochs {', '.join(map(str, cfg.milestones))}{warm}"
    return f"cosine{warm}"


def build_report(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise NormlabError(f"{root} is not a directory; pass the --out directory of a study or run")
    runs = load_runs(root)
    if not runs:
        raise NormlabError(f"no runs in {root} (no */config.json); train some with normlab train "
                           f"or normlab reproduce first")
    plt = _plt()
    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    for directory in (root, figures):
        rundir.remove_stale_temps(directory)  # left by a report killed while writing
    members = membership(root, runs)
    study = rundir.read_json(root / "study.json") or {}
    md = [f"# normlab report: {study.get('name', root.name)}", ""]
    if study.get("description"):
        md += [study["description"], ""]
    md += ["## Setup", ""] + setup_lines(runs) + [""]

    for model in sorted({r.cfg.model for r in runs}, key=lambda m: int(m[6:])):
        model_runs = [r for r in runs if r.cfg.model == model]
        md += [f"## {model}", ""]
        for name, title in (("norms", "Error curves per normalization"),
                            ("batch-size", "Sensitivity to batch size"),
                            ("groups", "Group count")):
            chosen = [r for r in model_runs if r.id in members.get(name, set())]
            if not chosen:
                continue
            points = list(group_points(chosen).values())
            md += [f"### {title}", ""]
            md += study_section(plt, name, model, points, figures)
        md += ["### All runs", "", all_runs_table(model_runs), ""]
    path = root / "report.md"
    rundir.atomic_write(path, "\n".join(md).encode())
    return path


def study_section(plt, name: str, model: str, points: list[Point], figures: Path) -> list[str]:
    md = []
    if name == "norms":
        sizes = sorted({(p.cfg.batch_size, p.cfg.virtual_gpus) for p in points})
        for size, vg in sizes:
            at = [p for p in points if (p.cfg.batch_size, p.cfg.virtual_gpus) == (size, vg)]
            fig = f"norms_{model}_b{size}{'x' + str(vg) if vg > 1 else ''}.png"
            plot_norm_curves(plt, at, f"{model}, batch {size} per device", figures / fig)
            md += [f"![train and test error per norm](figures/{fig})", "",
                   table(["norm", "test error (%)", "final train error (%)"],
                         [[label(p.cfg.norm), p.cell(), f"{p.curve('train_error')[1][-1]:.2f}" if p.curve('train_error')[1] else "-"]
                          for p in norm_order(at)]), ""]
    elif name == "batch-size":
        plot_batch_sizes(plt, points, f"{model}: error vs batch size", figures / f"batch_size_{model}.png")
        plot_batch_curves(plt, points, f"{model}: test error curves per batch size", figures / f"batch_curves_{model}.png")
        sizes = sorted({p.cfg.batch_size for p in points}, reverse=True)
        norms = sorted({p.cfg.norm for p in points}, key=lambda n: FAMILY_ORDER.index(family(n)))
        cell = {(p.cfg.norm, p.cfg.batch_size): p for p in points}
        rows = [[label(n)] + [cell[(n, s)].cell() if (n, s) in cell else "-" for s in sizes] for n in norms]
        gn = gn_reference(points)
        if gn and "bn" in norms:
            diff = []
            for s in sizes:
                a, b = cell.get(("bn", s)), cell.get((gn, s))
                if a and b and a.mean_std() and b.mean_std():
                    diff.append(f"{a.mean_std()[0] - b.mean_std()[0]:+.2f}")
                else:
                    diff.append("-")
            rows.append([f"BN − {label(gn)}"] + diff)
        md += [f"![error vs batch size](figures/batch_size_{model}.png)", "",
               f"![BN and GN curves per batch size](figures/batch_curves_{model}.png)", "",
               "Test error (%), median of the final 5 epochs, by images per device:", "",
               table(["norm"] + [str(s) for s in sizes], rows), ""]
    elif name == "groups":
        gn_points = [p for p in points if family(p.cfg.norm) != "bn"]
        plot_groups(plt, gn_points, f"{model}: GN group count", figures / f"groups_{model}.png")
        rows, best = [], []
        for key, what in (("groups", "G"), ("per_group", "channels per group")):
            pts = [p for p in gn_points if getattr(parse_norm(p.cfg.norm), key)]
            pts.sort(key=lambda p: getattr(parse_norm(p.cfg.norm), key))
            rows += [[f"{what} = {getattr(parse_norm(p.cfg.norm), key)}", label(p.cfg.norm), p.cell()] for p in pts]
            scored = [p for p in pts if p.mean_std()]
            if scored:
                top = min(scored, key=lambda p: p.mean_std()[0])
                best.append(f"best {what}: {getattr(parse_norm(top.cfg.norm), key)} "
                            f"({top.mean_std()[0]:.2f}% test error)")
        md += [f"![GN group sweep](figures/groups_{model}.png)", "",
               table(["setting", "norm", "test error (%)"], rows), ""]
        md += [f"- {b}" for b in best] + [""]
    return md


def all_runs_table(runs: list[Run]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (FAMILY_ORDER.index(family(r.cfg.norm)), r.cfg.norm, -r.cfg.batch_size, r.cfg.seed)):
        final = f"{r.final:.2f}" if r.final is not None else "-"
        state = r.state + (f" (epoch {r.status.get('diverged_in_epoch')})" if r.state == "diverged" else "")
        if r.state not in ("done", "diverged"):
            state += f" ({len(r.rows)}/{r.cfg.epochs} epochs)"
        last = f"{r.rows[-1]['test_error']:.2f}" if r.rows else "-"
        rows.append([r.id, label(r.cfg.norm), r.cfg.batch_size, r.cfg.virtual_gpus, r.cfg.seed,
                     f"{r.cfg.lr:.4g}", len(r.rows), final, last, state])
    return table(["run", "norm", "batch", "virtual GPUs", "seed", "lr", "epochs",
                  "test error (%), median of final 5", "at the last epoch", "state"], rows)
