"""The answer of a finished search: ranking with intervals, winner, margins, test error, compute.

Everything here is read from the Optuna study (which trial reached which epoch) and the run
directories (errors per epoch); the test set is read once, for the winner.
"""
from __future__ import annotations

from pathlib import Path

from .. import rundir
from ..errors import NormlabError
from ..stats import Summary, difference, format_summary, summarize
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
        path = search.out / RUNS / search.spec.config(norm, seed).run_id() / rundir.METRICS
        found = rundir.read_metrics(path)
        if not found or not isinstance(found[-1].get("test_error"), float):
            raise NormlabError(f"{path} has no test error; move that run directory away and run the "
                               f"same command again to retrain it")
        rows.append(found[-1])
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
        steps, images = (info or {}).get("steps_per_epoch"), (info or {}).get("images_per_step")
        if type(steps) is not int or type(images) is not int or not 0 < steps * images < 2**40:
            continue  # not a run directory of this search
        per_epoch = steps * images
        try:
            epochs = len(rundir.read_metrics(run / rundir.METRICS))
        except NormlabError:
            continue
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
    """The answer as Markdown (printed as it is, and written to search.md)."""
    settings = result["settings"]
    base = settings["base"]
    lines = [f"# Which G? Group search on {base['model']}, batch {base['batch_size']}, {base['data']}", "",
             f"Successive halving on a held-out validation split of {base['val_split']} training images "
             f"(rungs after epoch {', '.join(map(str, result['rungs']))}, keeping the best "
             f"1/{settings['reduction_factor']}); finalists and the baselines trained {base['epochs']} "
             f"epochs with {settings['seeds']} seeds. Errors in %, of the final epoch: mean ± std "
             f"[95 % confidence interval].", ""]
    winner = result.get("winner")
    if winner is None:
        return "\n".join(lines + ["No candidate finished: every finalist diverged."])
    lines += ["| rank | candidate | groups (16/32/64 ch.) | validation error | minus the winner |",
              "|---|---|---|---|---|"]
    for i, e in enumerate(result["ranking"], 1):
        groups = "/".join(map(str, e["groups"]))
        if e["state"] == "finalist":
            vs = "winner" if e["norm"] == winner["norm"] else \
                format_summary(e["minus_winner"]) + (" (tied)" if e["tied"] else "")
            lines.append(f"| {i} | {e['norm']} | {groups} | {format_summary(e['val_error'])} | {vs} |")
        else:
            lines.append(f"| - | {e['norm']} | {groups} | {e['detail']} | |")
    tied = winner["tied_with"]
    lines += ["", f"**Winner: {winner['norm']}** ({'/'.join(map(str, winner['groups']))} groups), "
              f"validation error {format_summary(winner['val_error'])}"
              + (f"; statistically tied with {', '.join(tied)} (the 95 % interval of the difference "
                 f"includes 0)." if tied else "; every other finalist is worse beyond its 95 % interval."), ""]
    names = {"gn:16": "G = 16", "ln": "LN", "in": "IN"}
    for norm, d in result["margins"].items():
        lines.append(f"- margin over {names.get(norm, norm)} ({norm} minus the winner, Welch): "
                     f"{format_summary(d)}")
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
