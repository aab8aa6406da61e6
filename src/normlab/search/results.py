"""The answer of a finished search: ranking with intervals, winner, margins, test error, compute.

Everything here is read from the Optuna study (which trial reached which epoch) and the run
directories (errors per epoch); the test set is read once, for the winner.
"""
from __future__ import annotations

from pathlib import Path

from .. import rundir
from ..stats import Summary, difference, format_difference, format_summary, summarize
from .trials import RUNS, Search

JSON_FILE, MARKDOWN_FILE = "search.json", "search.md"


def as_dict(s: Summary | None) -> dict | None:
    if s is None:
        return None
    return {"n": s.n, "mean": s.mean, "std": s.std, "low": s.low, "high": s.high, "level": s.level}


def final_rows(search: Search, norm: str, seeds) -> list[dict]:
    """The last metrics row of each seed's run of `norm`."""
    rows = []
    for seed in seeds:
        cfg = search.spec.config(norm, seed)
        rows.append(rundir.read_metrics(search.out / RUNS / cfg.run_id() / rundir.METRICS)[-1])
    return rows


def collect(search: Search) -> dict:
    spec, states = search.spec, search.states
    by_norm: dict[str, dict[int, object]] = {c.spec: {} for c in spec.candidates}
    for t in search.trials(states.COMPLETE, states.PRUNED, states.FAIL):
        by_norm[t.params["norm"]][t.params["seed"]] = t
    finalists, others = [], []
    for c in spec.candidates:
        trials = by_norm[c.spec]
        entry = {"norm": c.spec, "groups": list(c.groups)}
        if 0 in trials:  # seed 0's validation error at each rung: every candidate at the same epoch
            entry["at_rungs"] = {r: trials[0].intermediate_values[r] for r in spec.rungs()
                                 if r in trials[0].intermediate_values}
        done = sorted(s for s, t in trials.items() if t.state == states.COMPLETE)
        failed = [t for t in trials.values() if t.state == states.FAIL]
        if failed:
            entry.update(state="diverged", detail=f"seed {failed[0].params['seed']} diverged in epoch "
                                                  f"{failed[0].user_attrs.get('diverged_in_epoch')}")
            others.append(entry)
        elif len(done) == spec.seeds:
            values = [trials[s].value for s in done]
            entry.update(state="finalist", val_errors=values, val_error=summarize(values))
            finalists.append(entry)
        elif 0 in done:
            entry.update(state="not a finalist", epochs=spec.epochs, val_errors=[trials[0].value],
                         detail=f"{trials[0].value:.2f} (seed 0) after epoch {spec.epochs}; not among "
                                f"the best {spec.finalist_count()}")
            others.append(entry)
        else:
            first = trials[0]
            entry.update(state="pruned", epochs=first.last_step, val_errors=[first.value],
                         detail=f"pruned after epoch {first.last_step}: {first.value:.2f} (seed 0)")
            others.append(entry)
    finalists.sort(key=lambda e: e["val_error"].mean)
    others.sort(key=lambda e: (e["state"] == "diverged", -e.get("epochs", 0), e.get("val_errors", [0])[0]))
    result = {"settings": spec.to_dict(), "rungs": spec.rungs(), "ranking": finalists + others}
    if not finalists:
        result["winner"] = None
        return result
    winner = finalists[0]
    for entry in finalists[1:]:
        d = difference(entry["val_errors"], winner["val_errors"])
        entry["minus_winner"] = d
        entry["tied"] = bool(d.has_interval and d.low <= 0)
    tests = [row["test_error"] for row in final_rows(search, winner["norm"], range(spec.seeds))]
    result["winner"] = {"norm": winner["norm"], "groups": winner["groups"], "val_error": winner["val_error"],
                        "tied_with": [e["norm"] for e in finalists[1:] if e["tied"]],
                        "test_errors": tests, "test_error": summarize(tests)}
    result["margins"] = {e["norm"]: e["minus_winner"] for e in finalists[1:]
                         if e["norm"] in search.baselines}
    result["compute"] = compute(search)
    return result


def compute(search: Search) -> dict:
    """Images trained by the search (epochs in its run directories) against the full grid."""
    spec = search.spec
    run_epochs = images = per_epoch = 0
    for run in sorted((search.out / RUNS).iterdir()):
        info = rundir.read_json(run / rundir.CONFIG)
        if not info:
            continue
        per_epoch = info["steps_per_epoch"] * info["images_per_step"]
        epochs = len(rundir.read_metrics(run / rundir.METRICS))
        run_epochs += epochs
        images += epochs * per_epoch
    grid = len(spec.candidates) * spec.seeds * spec.epochs
    return {"run_epochs": run_epochs, "images_trained": images, "full_grid_run_epochs": grid,
            "full_grid_images": grid * per_epoch, "fraction_of_full_grid": run_epochs / grid}


def to_json(result: dict) -> dict:
    """Summaries as plain dicts."""
    if isinstance(result, Summary):
        return as_dict(result)
    if isinstance(result, dict):
        return {k: to_json(v) for k, v in result.items()}
    if isinstance(result, list):
        return [to_json(v) for v in result]
    return result


def text(result: dict) -> str:
    """The answer as Markdown (printed as it is, and written to search.md). Every candidate is
    shown at each rung's epoch (seed 0, the value the pruner compared), then, for those that
    reached the last epoch, at that epoch: rows are compared at the same epoch only."""
    settings = result["settings"]
    base = settings["base"]
    rungs = result["rungs"]
    lines = [f"# Which G? Group search on {base['model']}, batch {base['batch_size']}, {base['data']}", "",
             f"Successive halving on a held-out validation split of {base['val_split']} training images "
             f"(rungs after epoch {', '.join(map(str, rungs))}, keeping the best "
             f"1/{settings['reduction_factor']}); finalists and the baselines trained {base['epochs']} "
             f"epochs with {settings['seeds']} seeds. Validation errors in %; each column is one epoch, "
             f"so that candidates are compared at the same epoch: seed 0's error at each rung (what the "
             f"pruner compared), then at the last epoch the mean ± std [95 % confidence interval] over "
             f"seeds. A difference is the candidate minus the winner, positive where the candidate's "
             f"error is higher.", ""]
    winner = result.get("winner")
    if winner is None:
        return "\n".join(lines + ["No candidate finished: every finalist diverged."])
    finalists = [e for e in result["ranking"] if e["state"] == "finalist"]
    header = (["rank", "candidate", "groups (16/32/64 ch.)"] + [f"epoch {r}, seed 0" for r in rungs]
              + [f"epoch {base['epochs']}", "minus the winner", "outcome"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, e in enumerate(result["ranking"], 1):
        at = e.get("at_rungs", {})
        cells = [str(i) if e["state"] == "finalist" else "-", e["norm"], "/".join(map(str, e["groups"]))]
        cells += [f"{at[r]:.2f}" if r in at else "-" for r in rungs]
        vs = ""
        if e["state"] == "finalist":
            final = format_summary(e["val_error"])
            vs = "winner" if e["norm"] == winner["norm"] else \
                format_difference(e["minus_winner"]) + (" (tied)" if e["tied"] else "")
            outcome = "finalist"
        elif e["state"] == "not a finalist":
            final = f"{e['val_errors'][0]:.2f} (seed 0)"
            outcome = f"not among the best {len(finalists)} at epoch {base['epochs']}"
        elif e["state"] == "pruned":
            final, outcome = "-", f"pruned after epoch {e['epochs']}"
        else:
            final, outcome = "-", e.get("detail", e["state"])
        lines.append("| " + " | ".join(cells + [final, vs, outcome]) + " |")
    tied = winner["tied_with"]
    if len(finalists) == 1:
        verdict = "; the only finalist, so there is nothing to compare it with at the last epoch."
    elif tied:
        verdict = (f"; statistically tied with {', '.join(tied)} (the 95 % interval of the difference "
                   f"includes 0).")
    else:
        verdict = "; every other finalist is worse beyond its 95 % interval."
    lines += ["", f"**Winner: {winner['norm']}** ({'/'.join(map(str, winner['groups']))} groups), "
              f"validation error {format_summary(winner['val_error'])}" + verdict, ""]
    names = {"gn:16": "G = 16", "ln": "LN", "in": "IN"}
    for norm, d in result["margins"].items():
        lines.append(f"- margin over {names.get(norm, norm)} ({norm} minus the winner, Welch): "
                     f"{format_difference(d)}")
    lines += [f"- test error of the winner (the test set's only use, once at the end): "
              f"{format_summary(winner['test_error'])}"]
    c = result["compute"]
    lines += [f"- compute: {c['images_trained']:,} training images ({c['run_epochs']} run-epochs), "
              f"{100 * c['fraction_of_full_grid']:.0f} % of the full grid ({c['full_grid_images']:,} "
              f"images: {len(settings['candidates'])} candidates x {settings['seeds']} seeds x "
              f"{base['epochs']} epochs)"]
    return "\n".join(lines) + "\n"


def write(search: Search, result: dict) -> tuple[Path, Path]:
    out = search.out
    rundir.write_json(out / JSON_FILE, to_json(result))
    rundir.atomic_write(out / MARKDOWN_FILE, text(result).encode())
    return out / JSON_FILE, out / MARKDOWN_FILE
