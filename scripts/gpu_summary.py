"""summary.md of scripts/gpu_check.py, and the paper preset's cost projected from its measured
throughput.

The projection: for every run of `normlab reproduce --preset paper` (54 runs: ResNet-56/110,
8 devices x N images, N = 2 to 32; 269,734,400 training images and 54,000,000 evaluated),

    GPU-hours = sum over runs of ( T_r / v_train(model, norm, N) + E_r / v_eval(model, norm) ) / 3600

with T_r and E_r the run's training and evaluated images (`--dry-run` lists them), v_train the
images/s that `normlab bench --virtual-gpus 8` measured for that model and norm family (BN, or
GN's kernel for GN, LN and IN) at N = 2, 8 and 32 (log-log interpolation between them for
N = 4 and 16), and v_eval the measured evaluation images/s. "best" takes, at each measured
point, the faster of the eager step and --fast-path graph.
"""
from __future__ import annotations

import math

TARGET_HOURS = 2.0


def family(norm: str) -> str:
    return "bn" if norm.startswith("bn") else "gn:16"


def interpolate(points: dict[int, float], n: int) -> float:
    """images/s at batch n from {batch: images/s}: log-log between neighbours, the nearest outside."""
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    if n >= xs[-1]:
        return points[xs[-1]]
    hi = next(x for x in xs if x >= n)
    lo = max(x for x in xs if x <= n)
    if hi == lo:
        return points[lo]
    t = (math.log(n) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp(math.log(points[lo]) * (1 - t) + math.log(points[hi]) * t)


def projection(summary: dict) -> dict:
    """The paper preset's GPU-hours from this check's bench (eager) and fast-path numbers."""
    bench = summary["phases"].get("bench", {})
    rows = (bench.get("virtual") or {}).get("results", [])
    eager: dict[tuple, dict[int, float]] = {}
    for row in rows:
        eager.setdefault((row["model"], family(row["norm"])), {})[row["batch_size"]] = row["normlab_images_per_s"]
    best = {key: dict(points) for key, points in eager.items()}
    for r in summary["phases"].get("fast-path", {}).get("results", []):
        graph = r.get("paths", {}).get("graph")
        key = (r["model"], family(r["norm"]))
        if graph and graph.get("equal_within_noise") and r["virtual_gpus"] == 8 and key in best:
            best[key][r["batch_size"]] = max(best[key].get(r["batch_size"], 0.0), graph["images_per_s"])
    evaluation = {(e["model"], family(e["norm"])): e["images_per_s"]
                  for e in (bench.get("evaluation") or {}).get("results", [])}
    try:
        from normlab.study import expand, images_per_run
    except ImportError as err:
        return {"status": f"not computed: {err}"}
    runs = list(expand("paper").runs.values())
    needed = sorted({(c.model, family(c.norm)) for c in runs})
    missing = [k for k in needed if k not in eager or k not in evaluation]
    if missing:
        return {"status": "not computed: the bench measured no " + ", ".join(f"{m} {n}" for m, n in missing)
                + " at 8 devices (or its evaluation)"}
    totals = {"eager": 0.0, "best": 0.0}
    train_images = eval_images = 0
    for cfg in runs:
        train, evaluated = images_per_run(cfg)
        train_images, eval_images = train_images + train, eval_images + evaluated
        key = (cfg.model, family(cfg.norm))
        for name, table in (("eager", eager), ("best", best)):
            totals[name] += train / interpolate(table[key], cfg.batch_size) + evaluated / evaluation[key]
    hours = {k: v / 3600 for k, v in totals.items()}
    return {"status": "ok", "runs": len(runs), "train_images": train_images, "eval_images": eval_images,
            "gpu_hours_eager": hours["eager"], "gpu_hours_best": hours["best"], "target_hours": TARGET_HOURS,
            "meets_target": hours["best"] <= TARGET_HOURS,
            "formula": "sum over runs of (T_r / v_train(model, norm, N) + E_r / v_eval(model, norm)) / 3600",
            "rates": {f"{m} {n}": {"train": eager[(m, n)], "best": best[(m, n)], "eval": evaluation[(m, n)]}
                      for m, n in needed}}


# -- summary.md -----------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"
    return str(x)


def markdown(s: dict) -> str:
    phases = s["phases"]
    env = phases.get("environment", {})
    out = [f"# normlab GPU check{' (small form)' if s['small'] else ''}\n",
           f"`{s['command']}` on {env.get('gpu') or s['device']} ({env.get('nvidia_smi', 'no nvidia-smi')}), "
           f"torch {env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}, {env.get('cpus')} CPUs; "
           f"normlab installed from {s['install']}; data: {env.get('data', {}).get('source')}"
           f"{' (' + format(env['data'].get('train', 0), ',') + ' training, ' + format(env['data'].get('test', 0), ',') + ' test images)' if env.get('data', {}).get('train') else ''}; "
           f"started {s['started']}, {s.get('seconds', 0):.0f} s in all.\n"]
    if env.get("peak_matmul_tflops"):
        out.append("Measured matmul peak (8192 x 8192): " + ", ".join(f"{p} {v} TFLOP/s" for p, v in env["peak_matmul_tflops"].items()) + ".\n")
    out.append(table(["phase", "status", "seconds", "note"],
                     [[n, r["status"], fmt(r.get("seconds")), r.get("error") or r.get("reason") or r.get("not_run") or r.get("note") or ""]
                      for n, r in phases.items()]))
    out += [section(name, phases[name]) for name in ("tests", "bad-input", "precision", "resume", "bench", "fast-path", "study")
            if name in phases and phases[name]["status"] != "skipped"]
    p = s.get("projection")
    if p:
        out.append("## The paper preset's cost\n")
        if p["status"] != "ok":
            out.append(f"{p['status']}.\n")
        else:
            out.append(f"{p['runs']} runs, {p['train_images']:,} training and {p['eval_images']:,} evaluated images: "
                       f"**{p['gpu_hours_eager']:.2f} GPU-hours** on this GPU with the eager step, "
                       f"**{p['gpu_hours_best']:.2f}** with the fast path where it was measured faster "
                       f"(target: at most {p['target_hours']:g}; {'met' if p['meets_target'] else 'missed'}), "
                       f"one run after another. GPU-hours = {p['formula']}.\n")
            out.append(table(["model, norm", "v_train at N = 2, 8, 32 (img/s)", "best", "v_eval (img/s)"],
                             [[k, ", ".join(fmt(v["train"].get(n), 0) for n in (2, 8, 32)),
                               ", ".join(fmt(v["best"].get(n), 0) for n in (2, 8, 32)), fmt(v["eval"], 0)]
                              for k, v in p["rates"].items()]))
    return "\n".join(out)


def section(name: str, r: dict) -> str:
    if name == "tests":
        body = f"`{r.get('command', '')}`\n\n{r.get('summary', '')}\n"
        if r.get("failed"):
            body += "\nFailed: " + ", ".join(f"`{t}`" for t in r["failed"]) + "\n"
        if r.get("skipped"):
            body += "\nSkipped: " + "; ".join(r["skipped"][:8]) + "\n"
        return "## Tests (pytest -m gpu)\n\n" + body
    if name == "bad-input":
        return "## Bad input\n\n" + table(["input", "exit", "what normlab says", "nothing written", "as required"],
                                          [[c["input"], c["exit"], c["line"].replace("|", "/"), not c["written"], c["ok"]]
                                           for c in r.get("cases", [])])
    if name == "precision" and "test_error" in r:
        curves = r["test_error"]
        names = list(curves)
        rows = [[i + 1, *[fmt(curves[k][i], 2) if i < len(curves[k]) else "-" for k in names]]
                for i in range(max(len(v) for v in curves.values()))]
        gaps = r["max_test_error_gap"]
        return (f"## bf16 against fp32 ({r['model']}, BN, batch 32, {plural(r['epochs'], 'epoch')})\n\n"
                + table(["epoch", *[f"test error, {k} (%)" for k in names]], rows)
                + f"\nLargest test-error gap over the epochs: bf16 vs fp32 {fmt(gaps['bf16 vs fp32'], 2)} points, "
                  f"fp32 seed 0 vs seed 1 {fmt(gaps['fp32 seed 0 vs seed 1'], 2)} points.\n")
    if name == "resume" and "deterministic_cost" in r:
        rows = [[k.replace("_", " "), v.get("killed"), v.get("identical"), fmt(v.get("max_abs_gap"), 3), v.get("error") or ""]
                for k, v in (("without_deterministic", r["without_deterministic"]), ("with_deterministic", r["with_deterministic"]))]
        return (f"## kill -9, then the same command ({r['model']}, {plural(r['epochs'], 'epoch')})\n\n"
                + table(["run", "killed mid-run", "metrics identical", "largest gap", "error"], rows)
                + f"\n--deterministic costs {fmt(r['deterministic_cost'], 2)}x in training speed "
                  f"({fmt(r['images_per_s']['default'], 0)} against {fmt(r['images_per_s']['deterministic'], 0)} images/s).\n")
    if name == "bench":
        body = "## Speed (normlab bench, in the device's default precision)\n\n"
        for part, title in (("plain", "one device, batch N"), ("virtual", "K virtual GPUs x N (the reference at plain N)")):
            rows = [[x["model"], x["norm"], f"{x['virtual_gpus']}x{x['batch_size']}" if x["virtual_gpus"] > 1 else x["batch_size"],
                     x["precision"], fmt(x["normlab_images_per_s"], 0),
                     fmt(x.get("reference_images_per_s"), 0), fmt(x.get("speedup"), 2) + "x",
                     fmt(100 * x["fraction_of_peak"], 1) + " %"] for x in (r.get(part) or {}).get("results", [])]
            if rows:
                body += f"\n{title}:\n\n" + table(["model", "norm", "N", "precision", "normlab img/s", "reference img/s", "speed-up",
                                                    "of matmul peak"], rows)
        fused = (r.get("fused") or {}).get("results", [])
        if fused:
            body += "\nfused run arrays (R runs as one network against the same R runs one after another):\n\n" + table(
                ["model", "norm", "N", "R", "fused img/s", "separate img/s", "speed-up"],
                [[x["model"], x["norm"], f"{x['virtual_gpus']}x{x['batch_size']}", x["runs"], fmt(x["fused_images_per_s"], 0),
                  fmt(x["separate_images_per_s"], 0), fmt(x["speedup"], 2) + "x"] for x in fused])
        evaluation = (r.get("evaluation") or {}).get("results", [])
        if evaluation:
            body += "\nevaluation: " + ", ".join(f"{e['model']} {e['norm']} {fmt(e['images_per_s'], 0)} img/s" for e in evaluation) + "\n"
        return body + targets(r)
    if name == "fast-path":
        rows = []
        for x in r.get("results", []):
            for path, v in x.get("paths", {}).items():
                rows.append([x["model"], x["norm"], f"{x['virtual_gpus']}x{x['batch_size']}", path, fmt(v["images_per_s"], 0),
                             fmt(v["speedup"], 2) + "x", fmt(v.get("max_relative_weight_gap"), 6),
                             fmt(x.get("noise_floor", {}).get("max_relative_weight_gap"), 6), v.get("equal_within_noise", "")])
            for path, error in x.get("errors", {}).items():
                rows.append([x["model"], x["norm"], f"{x['virtual_gpus']}x{x['batch_size']}", path, "failed: " + error.replace("|", "/"),
                             "", "", "", ""])
        return ("## Fast paths (against the eager step, same process)\n\n"
                + table(["model", "norm", "K x N", "path", "img/s", "speed-up", "weight gap", "eager-eager gap", "equal"], rows))
    if name == "study":
        rows = [[x["norm"], f"{x['virtual_gpus']}x{x['batch_size']}", x["state"], x["epochs_done"], x["final_test_error"]]
                for x in r.get("runs", [])]
        return (f"## Real-data study ({plural(r.get('epochs', 0), 'epoch')}; report in {r.get('archive')})\n\n`{r.get('command', '')}`\n\n"
                + table(["norm", "K x N", "state", "epochs", "final test error (%)"], rows))
    return ""


def targets(r: dict) -> str:
    """The issue's speed targets, from the bench rows."""
    lines = []
    for x in (r.get("plain") or {}).get("results", []):
        if x["model"] == "resnet56" and x["batch_size"] == 128 and "speedup" in x:
            lines.append(f"ResNet-56 {x['norm']} at batch 128: {x['speedup']:.2f}x the reference (target 5x: "
                         f"{'met' if x['speedup'] >= 5 else 'missed'})")
    for x in (r.get("virtual") or {}).get("results", []):
        if x["model"] == "resnet56" and x["batch_size"] == 2 and "speedup" in x:
            lines.append(f"ResNet-56 {x['norm']} at 8 x 2: {x['speedup']:.2f}x the reference at plain batch 2 "
                         f"(target 10x: {'met' if x['speedup'] >= 10 else 'missed'})")
    return ("\nTargets: " + "; ".join(lines) + ".\n") if lines else ""
