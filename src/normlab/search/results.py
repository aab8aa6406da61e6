"""The answer of a finished search: selection, final ranking, margins, test error, compute.

Seed 0 prunes and selects: the finalists (the best of those that reached the last epoch) and the
winner (the finalist or baseline with the lowest final validation error of seed 0). The final
seeds 1..S took no part in either, so they alone rank the finalists and measure the winner
against each other finalist (G = 16, LN and IN among them): paired differences over those seeds,
Holm-corrected across the finalists at 5 %. The test set is read once, for the winner.
Everything here is read from the Optuna study (which trial reached which epoch) and the run
directories (errors per epoch).
"""
from __future__ import annotations

from pathlib import Path

from .. import rundir
from ..config import RuntimeOptions
from ..errors import NormlabError
from ..report.runs import chance_error
from ..stats import Summary, difference, format_difference, format_summary, holm, holm_adjusted, summarize
from .locks import FileLock
from .trials import RUNS, Search

JSON_FILE, MARKDOWN_FILE, TEST_FILE = "search.json", "search.md", "test_reading.json"
ALPHA = 0.05


def as_dict(s: Summary | None) -> dict | None:
    if s is None:
        return None
    return {"n": s.n, "mean": s.mean, "std": s.std, "low": s.low, "high": s.high, "level": s.level,
            **({"test": s.test, "dof": s.dof} if s.test else {})}


def test_reading(search: Search, norm: str, opts: RuntimeOptions) -> list[float]:
    """The test errors of `norm`'s final seeds, read from their last checkpoints: the test set's
    one use, kept in OUT/test_reading.json so that it is never read again (a diverged seed counts
    at chance error)."""
    from ..train import ranks, start

    with FileLock(search.out / "locks" / "test.lock"):  # commands sharing the search read it once
        kept = rundir.read_json(search.out / TEST_FILE)
        cfgs = [search.spec.config(norm, s) for s in search.spec.final_seeds()]
        if kept and kept.get("norm") == norm and valid_errors(kept.get("test_errors"), len(cfgs)):
            return kept["test_errors"]
        done = [c for c in cfgs
                if (rundir.read_json(search.out / RUNS / c.run_id() / rundir.STATUS) or {}).get("state") == "done"]
        errors = dict.fromkeys((c.seed for c in cfgs), chance_error(search.spec.base.data))
        if done:
            with start(ranks.SINGLE, done, [search.out / RUNS / c.run_id() for c in done], opts,
                       force=False) as trainer:
                errors.update(zip((c.seed for c in done), trainer.read_test()))
        rundir.write_json(search.out / TEST_FILE, {"norm": norm, "test_errors": list(errors.values())})
        return list(errors.values())


def valid_errors(values, n: int) -> bool:
    """A kept test reading is n percentages (anything else, damaged or planted, is read again)."""
    return (isinstance(values, list) and len(values) == n
            and all(type(v) in (int, float) and 0 <= v <= 100 for v in values))


def final_values(search: Search, trials: dict) -> dict[int, float]:
    """Final seed -> final validation error; a diverged seed counts at chance error (as in the
    report: the error of the NaN model it leaves)."""
    states, chance = search.states, chance_error(search.spec.base.data)
    return {s: (t.value if t.state == states.COMPLETE else chance) for s, t in trials.items()
            if s != 0 and t.state in (states.COMPLETE, states.FAIL)}


def collect(search: Search, opts: RuntimeOptions | None = None) -> dict:
    """The answer; `opts` says how to read the winner's test error (once, the first time)."""
    spec, states = search.spec, search.states
    by_norm: dict[str, dict[int, object]] = {c.spec: {} for c in spec.candidates}
    for t in search.trials(states.COMPLETE, states.PRUNED, states.FAIL):
        by_norm[t.params["norm"]][t.params["seed"]] = t
    chosen = set(search.finalists() or []) | search.baselines
    final, others = [], []
    for c in spec.candidates:
        trials = by_norm[c.spec]
        first = trials.get(0)
        entry = {"norm": c.spec, "groups": list(c.groups), "baseline": c.spec in search.baselines}
        if first is not None:  # seed 0 at each rung (what the pruner compared): every candidate at one epoch
            entry["at_rungs"] = {r: first.intermediate_values[r] for r in spec.rungs() if r in first.intermediate_values}
        if first is not None and first.state == states.COMPLETE:
            entry["selection_val_error"] = first.value
        if c.spec in chosen:
            values = final_values(search, trials)
            diverged = sum(t.state == states.FAIL for s, t in trials.items() if s != 0)
            entry.update(state="finalist", val_errors=values, val_error=summarize(values),
                         diverged_seeds=diverged)
            final.append(entry)
        elif first is not None and first.state == states.FAIL:
            entry.update(state="diverged", detail=f"seed 0 diverged in epoch "
                                                  f"{first.user_attrs.get('diverged_in_epoch')}")
            others.append(entry)
        elif first is not None and first.state == states.COMPLETE:
            entry.update(state="not a finalist", epochs=spec.epochs,
                         detail=f"not among the best {spec.finalist_count()} at epoch {spec.epochs}")
            others.append(entry)
        else:
            entry.update(state="pruned", epochs=first.last_step, detail=f"pruned after epoch {first.last_step}")
            others.append(entry)
    selectable = [e for e in final if "selection_val_error" in e]
    result = {"settings": spec.to_dict(), "rungs": spec.rungs()}
    if not selectable:
        result.update(ranking=final + others, winner=None)
        return result
    winner = min(selectable, key=lambda e: (e["selection_val_error"], e["norm"]))
    compare(winner, [e for e in final if e is not winner])
    final.sort(key=lambda e: e["val_error"].mean if e["val_error"] else float("inf"))  # the final ranking
    others.sort(key=lambda e: (e["state"] == "diverged", -e.get("epochs", 0),
                               e["at_rungs"].get(e.get("epochs"), 0) if "at_rungs" in e else 0))
    tests = test_reading(search, winner["norm"], opts or RuntimeOptions(progress=False))
    result.update(ranking=final + others, winner={
        "norm": winner["norm"], "groups": winner["groups"], "selection_val_error": winner["selection_val_error"],
        "val_error": winner["val_error"], "tied_with": [e["norm"] for e in final if e.get("verdict") == "tied"],
        "better_than_winner": [e["norm"] for e in final if e.get("verdict") == "better"],
        "test_errors": tests, "test_error": summarize(tests)})
    result["margins"] = {e["norm"]: {"minus_winner": e["minus_winner"], "holm_p": e["holm_p"],
                                     "verdict": e["verdict"]}
                         for e in final if e["norm"] in search.baselines and e is not winner}
    result["compute"] = compute(search)
    return result


def compare(winner: dict, rivals: list[dict]) -> None:
    """Each rival's final-seed errors minus the winner's (paired over the seeds), tested two-sided
    with Holm's correction across the rivals: 'worse' or 'better' than the winner where rejected,
    'tied' otherwise (also without an interval)."""
    diffs = [difference(e["val_errors"], winner["val_errors"]) for e in rivals]
    p = [d.p_value() if d is not None else 1.0 for d in diffs]
    for e, d, rejected, q in zip(rivals, diffs, holm(p, ALPHA), holm_adjusted(p)):
        e.update(minus_winner=d, holm_p=q,
                 verdict=("worse" if d.mean > 0 else "better") if rejected and d is not None else "tied")


def compute(search: Search) -> dict:
    """Images trained by the search (epochs in its run directories) against the full grid."""
    spec = search.spec
    run_epochs = images = per_epoch = 0
    for run in sorted((search.out / RUNS).iterdir()):
        info = rundir.read_json(run / rundir.CONFIG)
        steps, per_step = (info or {}).get("steps_per_epoch"), (info or {}).get("images_per_step")
        if type(steps) is not int or type(per_step) is not int or not 0 < steps * per_step < 2**40:
            continue  # not a run directory of this search
        per_epoch = steps * per_step
        try:
            epochs = len(rundir.read_metrics(run / rundir.METRICS))
        except NormlabError:
            continue
        run_epochs += epochs
        images += epochs * per_epoch
    grid = len(spec.candidates) * (spec.seeds + 1) * spec.epochs
    return {"run_epochs": run_epochs, "images_trained": images, "full_grid_run_epochs": grid,
            "full_grid_images": grid * per_epoch, "fraction_of_full_grid": run_epochs / grid}


def to_json(result):
    """Summaries as plain dicts, seed keys as text."""
    if isinstance(result, Summary):
        return as_dict(result)
    if isinstance(result, dict):
        return {str(k): to_json(v) for k, v in result.items()}
    if isinstance(result, list):
        return [to_json(v) for v in result]
    return result


NAMES = {"gn:16": "G = 16", "ln": "LN", "in": "IN"}


def text(result: dict) -> str:
    """The answer as Markdown (printed as it is, and written to search.md). Columns are epochs:
    seed 0 at each rung (what the pruner compared) and at the last epoch (the selection), then the
    final seeds; candidates are compared at the same epoch only."""
    settings = result["settings"]
    base = settings["base"]
    rungs = result["rungs"]
    seeds = ", ".join(map(str, settings["final_seeds"]))
    lines = [f"# Which G? Group search on {base['model']}, batch {base['batch_size']}, {base['data']}", "",
             f"Successive halving with seed 0 on a held-out validation split of {base['val_split']} training "
             f"images (rungs after epoch {', '.join(map(str, result['rungs']))}, keeping the best "
             f"1/{settings['reduction_factor']}); seed 0 also selects the finalists and the winner (lowest "
             f"validation error at epoch {base['epochs']}). The finalists and the baselines then trained "
             f"{base['epochs']} epochs with the final seeds {seeds}, which took no part in pruning or "
             f"selection and alone rank them: errors in %, of the final epoch, mean ± std [95 % interval]; "
             f"each finalist minus the winner paired over those seeds [95 % interval], tested two-sided with "
             f"Holm's correction across the finalists (family-wise 5 %). A difference is the candidate minus "
             f"the winner, positive where the candidate's error is higher. A diverged seed counts at chance "
             f"error.", ""]
    winner = result.get("winner")
    if winner is None:
        return "\n".join(lines + ["No candidate finished: every finalist diverged."])
    header = (["rank", "candidate", "groups (16/32/64 ch.)"] + [f"epoch {r}, seed 0" for r in rungs]
              + [f"epoch {base['epochs']}, seed 0 (selection)", f"epoch {base['epochs']}, seeds {seeds}",
                 "minus the winner", "Holm-adjusted p", "outcome"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, e in enumerate(result["ranking"], 1):
        at = {int(k): v for k, v in e.get("at_rungs", {}).items()}
        cells = [str(i) if e["state"] == "finalist" else "-", e["norm"], "/".join(map(str, e["groups"]))]
        cells += [f"{at[r]:.2f}" if r in at else "-" for r in rungs]
        cells.append(f"{e['selection_val_error']:.2f}" if "selection_val_error" in e else "-")
        if e["state"] != "finalist":
            lines.append("| " + " | ".join(cells + ["-", "", "", e["detail"]]) + " |")
            continue
        final = format_summary(e["val_error"]) + (f" ({e['diverged_seeds']} diverged)" if e["diverged_seeds"] else "")
        if e["norm"] == winner["norm"]:
            cells += [final, "", "", "winner (seed 0's choice)"]
        else:
            cells += [final, format_difference(e["minus_winner"]), f"{e['holm_p']:.3f}",
                      f"{e['verdict']} than the winner" if e["verdict"] != "tied" else "tied with the winner"]
        lines.append("| " + " | ".join(cells) + " |")
    tied, better = winner["tied_with"], winner["better_than_winner"]
    lines += ["", f"**Winner: {winner['norm']}** ({'/'.join(map(str, winner['groups']))} groups), chosen on seed 0 "
              f"({winner['selection_val_error']:.2f}); on the final seeds {format_summary(winner['val_error'])}"
              + (f"; better on the final seeds: {', '.join(better)}" if better else "")
              + (f"; tied with {', '.join(tied)} (Holm-adjusted p above 0.05)" if tied else "")
              + ("; the only finalist, so there is nothing to compare it with." if len(result["ranking"]) and
                 sum(e["state"] == "finalist" for e in result["ranking"]) == 1 else
                 "; every other finalist is worse (Holm-corrected)." if not tied and not better else "."), ""]
    for norm, m in result["margins"].items():
        lines.append(f"- margin over {NAMES.get(norm, norm)} ({norm} minus the winner, "
                     f"{m['minus_winner'].test if m['minus_winner'] else 'no interval'}, final seeds): "
                     f"{format_difference(m['minus_winner'])}, Holm-adjusted p {m['holm_p']:.3f}: {m['verdict']}")
    lines += [f"- test error of the winner (the test set's only use, once at the end; final seeds): "
              f"{format_summary(winner['test_error'])}"]
    c = result["compute"]
    lines += [f"- compute: {c['images_trained']:,} training images ({c['run_epochs']} run-epochs), "
              f"{100 * c['fraction_of_full_grid']:.0f} % of the full grid ({c['full_grid_images']:,} "
              f"images: {len(settings['candidates'])} candidates x {settings['seeds'] + 1} seeds x "
              f"{base['epochs']} epochs)"]
    return "\n".join(lines) + "\n"


def write(search: Search, result: dict) -> tuple[Path, Path]:
    out = search.out
    rundir.write_json(out / JSON_FILE, to_json(result))
    rundir.atomic_write(out / MARKDOWN_FILE, text(result).encode())
    return out / JSON_FILE, out / MARKDOWN_FILE
