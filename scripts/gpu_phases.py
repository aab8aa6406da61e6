"""The phases of scripts/gpu_check.py (each takes the Check and its time budget in seconds and
returns a dict with a status: ok, failed or skipped), and its workers: in-process jobs that
touch CUDA, run in a subprocess (`gpu_check.py --worker NAME`) so that the driver never does."""
from __future__ import annotations

import csv
import json
import random
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

VIRTUAL_GPUS = 8  # on CUDA: the GN paper's devices, and the paper preset's

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "images_per_s")


def last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in csv.DictReader(f)]


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if (p / "config.json").exists()) if out.exists() else []


def in_parallel(*jobs):
    """Run callables in threads; their results in order."""
    results = [None] * len(jobs)

    def call(i, job):
        results[i] = job()
    threads = [threading.Thread(target=call, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- environment --------------------------------------------------------------------------------
def phase_environment(c, budget):
    env = c.worker("environment", {}, timeout=c.timeout(budget))
    result = {"status": "ok" if env.get("exit") == 0 else "failed", **env}
    if c.cuda and not env.get("cuda_available"):
        result.update(status="failed", error="--device cuda but torch sees no CUDA device")
    archive = Path(c.args.data)
    if archive.exists() and not c.small:
        from gpu_data import unpack

        c.data_dir = str(unpack(archive, c.work / "data"))
        result["data"] = {"source": str(archive.relative_to(ROOT) if archive.is_relative_to(ROOT) else archive),
                          "megabytes": round(archive.stat().st_size / 2**20, 1)}
    else:
        result["data"] = {"source": "the bundled sample (4,000 training, 1,000 test images): no " + archive.name}
    if c.small:  # the small form trains on a tiny subset of the sample
        from gpu_data import make_subset, read_source, unpack

        tiny = c.work / "tiny.npz.xz"
        tiny.write_bytes(make_subset(read_source(None, from_sample=True), 500, 200))
        c.data_dir = str(unpack(tiny, c.work / "data"))
        result["data"] = {"source": "a class-balanced subset of the bundled sample"}
    if c.data_dir:
        from normlab.data import load_dataset

        data = load_dataset("cifar10", c.data_dir)
        result["data"].update(train=len(data.train), test=len(data.test))
    return result


def worker_environment(device, payload, target: Path) -> int:
    import platform

    import torch

    import normlab

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "normlab": normlab.__version__,
            "cpus": len(__import__("os").sched_getaffinity(0))}
    if torch.cuda.is_available() and device.startswith("cuda"):
        d = torch.device(device)
        props = torch.cuda.get_device_properties(d)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"not run: {err}"
        from normlab.bench import PRECISIONS, peak_matmul_flops

        info["peak_matmul_tflops"] = {p: round(peak_matmul_flops(d, dtype=dt) / 1e12, 1) for p, dt in PRECISIONS.items()}
    target.write_text(json.dumps(info))
    return 0


# -- bad input ----------------------------------------------------------------------------------
def phase_bad_input(c, budget):
    """The GPU's bad inputs: one line naming the problem and the fix, exit code 2, nothing written."""
    base = ["train", "--epochs", "1", "--quiet"]
    cases = [("device-beyond-the-gpus", "cuda:7", [*base, "--device", "cuda:7"], {}, "use"),
             ("fast-path-on-cpu", "--fast-path graph on the CPU", [*base, "--device", "cpu", "--fast-path", "graph"], {},
              "needs a CUDA device")]
    if c.cuda:
        cases += [("cuda-without-cuda", "--device cuda where CUDA is hidden (CUDA_VISIBLE_DEVICES='')",
                   [*base, "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "CUDA is not available"),
                  ("out-of-gpu-memory", "ResNet-1202 at 4 x 1,000 images per step",
                   [*base, "--device", c.device, "--model", "resnet1202", "--batch-size", "1000", "--virtual-gpus", "4"],
                   {}, "out of GPU memory")]
    timeout = c.timeout(budget)

    def attempt(case):
        name, what, args, env, expect = case
        out = c.work / "bad" / name
        r = c.normlab(*args, "--out", str(out), timeout=timeout, env=env)
        lines = [line for line in r["stderr"].strip().splitlines() if line.strip()]
        written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
        ok = r["code"] == 2 and len(lines) == 1 and expect in lines[0] and not written
        return {"case": name, "input": what, "command": r["command"], "exit": r["code"],
                "line": lines[0] if len(lines) == 1 else r["stderr"][-600:], "written": written, "ok": ok}
    cases_out = in_parallel(*[lambda case=case: attempt(case) for case in cases])
    result = {"status": "ok" if all(x["ok"] for x in cases_out) else "failed", "cases": cases_out}
    if not c.cuda:
        result["not_run"] = "--device cuda without CUDA is cuda:7's line here; out of GPU memory needs a GPU"
    return result


# -- tests ----------------------------------------------------------------------------------------
def phase_tests(c, budget):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "--device", c.device, "-v", "-rfEs", "-p",
               "no:cacheprovider", "--durations=5", *files]
    if c.size["tests_k"]:
        command += ["-k", c.size["tests_k"]]
    r = c.run(command, timeout=max(c.timeout(budget), min(150, c.remaining())), stop_signal=signal.SIGKILL)
    text = r["stdout"] + r["stderr"]
    # one line per test as it ends (-v): what a time limit leaves is still counted
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", r["stdout"], re.M)
    counts = {}
    for _, outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return {"status": "ok" if r["code"] == 0 else "failed", "command": r["command"], "exit": r["code"],
            "timed_out": r["timed_out"], "counts": counts, "summary": last_line(r["stdout"]).strip("= "),
            "failed": [t for t, o in outcomes if o in ("FAILED", "ERROR")],
            "skipped": re.findall(r"^SKIPPED \[\d+\] (.+)$", text, re.M)[:20],
            "error": None if r["code"] == 0 else ("timed out" if r["timed_out"] else
                                                  last_line(r["stdout"]) or last_line(r["stderr"]))}


# -- bf16 against fp32 ----------------------------------------------------------------------------
def phase_precision(c, budget):
    """The same run in bf16 autocast and in fp32, and fp32 with another seed (the scale of
    seed-to-seed differences), side by side on the real-data subset."""
    common = ["train", "--model", c.size["train_model"], "--norm", "bn", "--batch-size", "32", "--epochs",
              str(c.size["precision_epochs"]), "--schedule", "cosine", *c.data_args(), *c.device_args(), "--quiet"]
    variants = {"bf16": ["--amp"], "fp32": ["--no-amp"], "fp32 seed 1": ["--no-amp", "--seed", "1"]}
    outs = {name: c.work / "precision" / name.replace(" ", "-") for name in variants}  # bf16 and fp32: one run id
    runs = in_parallel(*[lambda n=n, v=v: c.normlab(*common, *v, "--out", str(outs[n]), timeout=c.timeout(budget))
                         for n, v in variants.items()])
    stopped = [r for r in runs if r["timed_out"] and r["code"] == 75]  # at the budget: compare the epochs done
    if any(r["code"] != 0 and r not in stopped for r in runs):
        return {"status": "failed", "error": next(last_line(r["stderr"]) for r in runs if r["code"] not in (0, 75)),
                "commands": [r["command"] for r in runs]}
    curves = {name: metrics(run_dirs(out)[0]) if run_dirs(out) and (run_dirs(out)[0] / "metrics.csv").exists() else []
              for name, out in outs.items()}
    if not all(curves.values()):
        return {"status": "failed", "error": "stopped at the time budget before a first epoch",
                "commands": [r["command"] for r in runs]}

    def gap(a, b, key):
        return max(abs(x[key] - y[key]) for x, y in zip(curves[a], curves[b]))
    return {"status": "ok", "commands": [r["command"] for r in runs], "model": c.size["train_model"],
            "epochs": min(len(v) for v in curves.values()),
            **({"note": "stopped at the time budget; the epochs done are compared"} if stopped else {}),
            "test_error": {k: [round(r["test_error"], 2) for r in v] for k, v in curves.items()},
            "train_loss": {k: [round(r["train_loss"], 4) for r in v] for k, v in curves.items()},
            "max_test_error_gap": {"bf16 vs fp32": gap("bf16", "fp32", "test_error"),
                                   "fp32 seed 0 vs seed 1": gap("fp32", "fp32 seed 1", "test_error")},
            "max_train_loss_gap": {"bf16 vs fp32": gap("bf16", "fp32", "train_loss"),
                                   "fp32 seed 0 vs seed 1": gap("fp32", "fp32 seed 1", "train_loss")}}


# -- kill -9 and resume ---------------------------------------------------------------------------
def phase_resume(c, budget):
    """Uninterrupted runs with and without --deterministic (their speed is its cost), then the
    same runs killed with SIGKILL mid-epoch and resumed by the same command: exact with
    --deterministic, float noise without."""
    epochs = c.size["resume_epochs"]

    def command(out, deterministic, extra=()):
        return ["train", "--model", c.size["train_model"], "--norm", "bn", "--batch-size", str(c.size["resume_batch"]),
                "--epochs", str(epochs), *c.data_args(), *c.device_args(), "--quiet", "--out", str(out),
                *(["--deterministic"] if deterministic else []), *extra]
    timeout = c.timeout(budget / 3)
    reference = {}
    for deterministic in (False, True):  # one at a time: their speeds are compared
        out = c.work / "resume" / f"whole-{deterministic}"
        r = c.normlab(*command(out, deterministic), timeout=timeout)
        if r["code"] != 0:
            return {"status": "failed", "error": last_line(r["stderr"]), "command": r["command"]}
        reference[deterministic] = metrics(run_dirs(out)[0])
    rng = random.Random(0)

    def killed_then_resumed(deterministic):
        out = c.work / "resume" / f"killed-{deterministic}"
        args = command(out, deterministic, ["--checkpoint-every", "0.005"])
        proc = subprocess.Popen([sys.executable, "-m", "normlab", *args], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        limit = time.monotonic() + timeout
        while time.monotonic() < limit and proc.poll() is None:  # until epoch 1 is written
            if run_dirs(out) and (run_dirs(out)[0] / "metrics.csv").exists():
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 0.8))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = c.normlab(*args, timeout=timeout)
        rows = metrics(run_dirs(out)[0]) if r["code"] == 0 else []
        return {"killed": killed, "command": r["command"], "exit": r["code"], "rows": rows,
                "error": last_line(r["stderr"]) if r["code"] else None}
    plain, exact = in_parallel(lambda: killed_then_resumed(False), lambda: killed_then_resumed(True))

    def compare(result, ref):
        if result["exit"] != 0:
            return {"error": result["error"], "killed": result["killed"]}
        strip = [[{k: v for k, v in row.items() if k not in TIMING} for row in rows] for rows in (result["rows"], ref)]
        gaps = [abs(a[k] - b[k]) for x, y in zip(*strip) for a, b in [(x, y)] for k in a if a[k] is not None]
        return {"killed": result["killed"], "identical": strip[0] == strip[1], "max_abs_gap": max(gaps, default=0.0)}
    speed = {d: sorted(r["images_per_s"] for r in rows[1:] or rows)[len(rows[1:] or rows) // 2]
             for d, rows in reference.items()}
    result = {"model": c.size["train_model"], "epochs": epochs,
              "without_deterministic": compare(plain, reference[False]),
              "with_deterministic": compare(exact, reference[True]),
              "images_per_s": {"default": speed[False], "deterministic": speed[True]},
              "deterministic_cost": speed[False] / speed[True]}
    ok = result["with_deterministic"].get("identical") and "error" not in result["without_deterministic"]
    result["status"] = "ok" if ok else "failed"
    if not ok:
        result["error"] = "the --deterministic run resumed after kill -9 differs from the uninterrupted one"
    return result


# -- bench ----------------------------------------------------------------------------------------
def phase_bench(c, budget):
    s = c.size
    common = ["bench", "--model", *s["bench_models"], "--norm", *s["bench_norms"], "--steps", str(s["bench_steps"]),
              "--warmup", "3" if c.cuda else "1", "--repeats", str(s["bench_repeats"]), *c.device_args(),
              "--amp" if c.cuda else "--no-amp"]  # the device's default precision (bf16 on CUDA) alone
    result, failed = {"status": "ok"}, []
    jobs = [("plain", [*common, "--batch-size", *map(str, s["bench_batches"])], 0.4),
            ("virtual", [*common, "--batch-size", *map(str, s["bench_virtual"]), "--virtual-gpus", str(VIRTUAL_GPUS if c.cuda else 4)], 0.25),
            ("fused", ["bench", "--fuse", *map(str, s["fuse"]), "--model", s["fuse_model"], "--norm", *s["bench_norms"],
                       "--batch-size", *map(str, s["fuse_batches"]), "--virtual-gpus", str(VIRTUAL_GPUS if c.cuda else 4),
                       "--steps", str(s["bench_steps"]), "--repeats", str(s["bench_repeats"]), *c.device_args()], 0.2)]
    for name, args, share in jobs:
        target = c.work / f"bench-{name}.json"
        r = c.normlab(*args, "--json", str(target), timeout=c.timeout(budget * share), stop_signal=signal.SIGKILL)
        if r["code"] != 0 or not target.exists():
            failed.append(f"{name}: {'timed out' if r['timed_out'] else last_line(r['stderr'])}")
            continue
        report = json.loads(target.read_text())
        result[name] = {"command": r["command"], "results": [
            {k: v for k, v in row.items() if not k.endswith("_all")} for row in report["results"]]}
        result.setdefault("peak_matmul_flops_by_precision", report.get("peak_matmul_flops_by_precision"))
    models = sorted({*s["eval_models"]})
    result["evaluation"] = c.worker("eval-rate", {"models": models, "norms": s["bench_norms"]},
                                    timeout=c.timeout(budget * 0.15))
    if failed:
        result.update(status="failed", error="; ".join(failed))
    return result


def worker_eval_rate(device, payload, target: Path) -> int:
    """Evaluation throughput (images/s) per model and norm, in the run's default precision."""
    from normlab.bench import sync
    from normlab.config import RunConfig, RuntimeOptions
    from normlab.train import Trainer
    from normlab.train.evaluation import evaluate

    rows = []
    for model in payload["models"]:
        for norm in payload["norms"]:
            cfg = RunConfig(model=model, norm=norm, epochs=1)
            t = Trainer([cfg], ["unused"], RuntimeOptions(device=device, progress=False))
            evaluate(t.network, t.data.test, t.normalize, 1000, t.autocast)  # warm-up
            sync(t.device)
            start = time.perf_counter()
            for _ in range(3):
                evaluate(t.network, t.data.test, t.normalize, 1000, t.autocast)
            sync(t.device)
            rows.append({"model": model, "norm": norm, "precision": "bf16" if t.amp else "fp32",
                         "images_per_s": 3 * len(t.data.test) / (time.perf_counter() - start)})
            target.write_text(json.dumps({"results": rows}))
    return 0


# -- fast paths -----------------------------------------------------------------------------------
def phase_fast_path(c, budget):
    configs = [list(x) for x in c.size["fast_configs"]]
    data = c.worker("fast-path", {"configs": configs, "virtual_gpus": VIRTUAL_GPUS if c.cuda else 4,
                                  "steps": c.size["bench_steps"] * 2, "repeats": c.size["bench_repeats"],
                                  "check_steps": c.size["fast_check_steps"]},
                    timeout=c.timeout(budget))
    results = data.get("results", [])
    result = {"status": "ok", "results": results}
    if not c.cuda:
        result["not_run"] = "graph and compile need CUDA (refused on the CPU: see bad-input); eager timed alone"
    where = [f"{r['model']} {r['norm']} {r['virtual_gpus']}x{r['batch_size']}" for r in results]
    bad = [f"{w} {p}" for w, r in zip(where, results) for p, v in r["paths"].items()
           if p != "off" and not v.get("equal_within_noise", True)]
    errors = [f"{w} {p}: {e}" for w, r in zip(where, results) for p, e in r.get("errors", {}).items()]
    problems = ([f"results differ from eager: {', '.join(bad)}"] if bad else []) + errors
    if len(results) < len(configs):
        problems.append(f"{len(results)} of {len(configs)} configurations done ({data.get('error', 'time')})")
    if problems:
        result.update(status="failed", error="; ".join(problems))
    return result


def worker_fast_path(device, payload, target: Path) -> int:
    from normlab.bench import compare_fast_paths
    from normlab.config import RunConfig, RuntimeOptions

    results = []
    for model, norm, batch, paths in payload["configs"]:
        cfg = RunConfig(model=model, norm=norm, batch_size=batch, virtual_gpus=payload["virtual_gpus"],
                        data="sample").normalized().validate()
        record = {"model": model, "norm": norm, "batch_size": batch, "virtual_gpus": payload["virtual_gpus"], "paths": {}}
        for path in paths or [None]:  # each path against eager on its own: one failing hides no other
            try:
                r = compare_fast_paths(cfg, RuntimeOptions(device=device), (path,) if path else (), payload["steps"],
                                       3, payload["repeats"], payload["check_steps"])
            except Exception as err:  # noqa: BLE001
                record.setdefault("errors", {})[path] = f"{type(err).__name__}: {err}"[:500]
                continue
            tolerance = 2e-2 if r["precision"] == "bf16" else 1e-4
            floor = r["noise_floor"]["max_relative_weight_gap"]
            for name, v in r["paths"].items():
                if name != "off":
                    v["equal_within_noise"] = v["max_relative_weight_gap"] <= max(10 * floor, tolerance)
                record["paths"].setdefault(name, v)  # eager: its first timing
            record.update({k: v for k, v in r.items() if k not in ("paths", "noise_floor")})
            record.setdefault("noise_floor", r["noise_floor"])
        results.append(record)
        target.write_text(json.dumps({"results": results}))
    return 0 if all("errors" not in r for r in results) else 1


# -- the real-data study --------------------------------------------------------------------------
def phase_study(c, budget):
    """BN, LN, IN and GN at 8 devices x 32 and 8 x 2 images on the real-data subset, sized to
    the budget from the bench's throughput, then its report."""
    epochs = study_epochs(c, budget)
    preset = c.work / "gpu-check.yaml"
    k = VIRTUAL_GPUS if c.cuda else 4
    preset.write_text(
        "name: gpu-check\n"
        f"description: {c.size['study_model']}, {epochs} epochs on the check's data; {k} devices x 32 and x 2\n"
        f"workers: {c.size['study_workers']}\nseeds: 1\n"
        f"base: {{model: {c.size['study_model']}, data: cifar10, epochs: {epochs}, schedule: cosine, virtual_gpus: {k}}}\n"
        "studies:\n  norms:\n    - {norm: [bn, ln, in, \"gn:16\"], batch_size: [32]}\n"
        "  batch-size:\n    - {norm: [bn, ln, in, \"gn:16\"], batch_size: [32, 2]}\n")
    out = c.work / "study"
    data = ["--data-dir", c.data_dir] if c.data_dir else ["--set", "data=sample"]
    r = c.normlab("reproduce", "--preset", str(preset), "--out", str(out), *data, *c.device_args(),
                  "--quiet", timeout=budget * 0.85 if c.cuda else c.timeout(budget))
    report = c.normlab("report", str(out), timeout=c.timeout(budget * 0.15), stop_signal=signal.SIGKILL)
    archive = c.out / "study-report.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(preset, arcname="study/gpu-check.yaml")
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.suffix in (".md", ".png", ".csv", ".json") and "checkpoint" not in path.name:
                tar.add(path, arcname=f"study/{path.relative_to(out)}")
    finals = []
    results_csv = out / "results.csv"
    if results_csv.exists():
        with open(results_csv, newline="") as f:
            finals = [{k: row.get(k) for k in ("run_id", "norm", "batch_size", "virtual_gpus", "state", "epochs_done",
                                               "final_test_error", "images_per_s")} for row in csv.DictReader(f)]
    result = {"command": r["command"], "exit": r["code"], "timed_out": r["timed_out"], "epochs": epochs,
              "report_exit": report["code"], "runs": finals, "archive": archive.name,
              "report_head": (out / "report.md").read_text()[:3000] if (out / "report.md").exists() else None}
    done = r["code"] == 0 or (r["timed_out"] and r["code"] == 75)
    result["status"] = "ok" if done and report["code"] == 0 else "failed"
    if r["timed_out"]:
        result["note"] = "stopped at its time budget (SIGTERM): the report shows the epochs trained"
    if result["status"] == "failed":
        result["error"] = last_line(r["stderr"]) if not done else last_line(report["stderr"])
    return result


def study_epochs(c, budget) -> int:
    """Epochs that fit in about 60 % of the budget, from the bench's measured images/s of the
    study's model (normlab, 8 devices x N), counting a worker's start-up; 1 on the CPU."""
    if not c.cuda:
        return 1
    rates = {}
    for row in (c.summary["phases"].get("bench", {}).get("virtual") or {}).get("results", []):
        if row["model"] == c.size["study_model"]:
            rates[(row["norm"], row["batch_size"])] = row["normlab_images_per_s"]
    train = 15000 if c.data_dir else 4000
    per_epoch = 0.0
    for norm in ("bn", "ln", "in", "gn:16"):
        for batch in (32, 2):
            rate = rates.get(("bn" if norm == "bn" else "gn:16", batch))
            if rate is None:
                return 3
            per_epoch += train / rate
    workers = min(c.size["study_workers"], 2)  # processes sharing one GPU: assume 2 overlap
    return max(2, min(30, int((0.6 * budget - 30) * workers / per_epoch)))


PHASE_FUNCTIONS = {"environment": phase_environment, "bad-input": phase_bad_input, "tests": phase_tests,
                   "precision": phase_precision, "resume": phase_resume, "bench": phase_bench,
                   "fast-path": phase_fast_path, "study": phase_study}
WORKERS = {"environment": worker_environment, "eval-rate": worker_eval_rate, "fast-path": worker_fast_path}
