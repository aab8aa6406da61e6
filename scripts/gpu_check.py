"""normlab on a GPU in one command: correct (the test suite's GPU subset, bf16 against fp32,
kill -9 and resume) and fast (bench against the reference pipeline, fused run arrays, the
whole-step fast paths), with a real-data study and its report. scripts/gpu-check.sh installs
normlab and runs this; benchmarks/gpu/README.md says how to call it and what it writes.

    python scripts/gpu_check.py                         # CUDA, 8 minutes (--minutes), into $OUT or ./gpu-check-out
    python scripts/gpu_check.py --device cpu --small    # the same steps, small, on a CPU (a few minutes)

Phases, in order (--only picks some): environment, bad-input, tests, precision, resume, bench,
fast-path, study. Each gets a share of --minutes; what does not fit is skipped and says so.
Every command it runs is a real normlab command in a subprocess (the driver itself never
touches CUDA), and each command line, its output and its exit code go to gpu-check.log.
It writes four files into --out: summary.json (every number), summary.md (the tables),
gpu-check.log, and study-report.tar.gz (the study's report, figures and CSV files).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_summary  # noqa: E402
from gpu_phases import PHASE_FUNCTIONS, WORKERS, last_line  # noqa: E402

PHASES = ("environment", "bad-input", "tests", "precision", "resume", "bench", "fast-path", "study")
SHARES = {"environment": 3, "bad-input": 4, "tests": 18, "precision": 8, "resume": 10, "bench": 20,
          "fast-path": 14, "study": 23}  # of --minutes, in percent; unused time flows on
FULL = {  # the GPU form; --small replaces it with SMALL
    "train_model": "resnet20", "precision_epochs": 6, "resume_epochs": 3, "resume_batch": 32,
    "tests_k": None,
    "bench_models": ["resnet20", "resnet56", "resnet110"], "bench_norms": ["bn", "gn:16"],
    "bench_batches": [2, 8, 32, 128], "bench_virtual": [2, 8, 32], "bench_steps": 10, "bench_repeats": 3,
    "fuse": [2, 4, 8], "fuse_batches": [2, 32], "fuse_model": "resnet56",
    "eval_models": ["resnet56", "resnet110"],
    "fast_configs": [("resnet56", "bn", 2, ("graph", "compile")), ("resnet56", "gn:16", 2, ("graph", "compile")),
                     ("resnet56", "bn", 8, ("graph",)), ("resnet56", "gn:16", 8, ("graph",)),
                     ("resnet56", "bn", 32, ("graph",)), ("resnet56", "gn:16", 32, ("graph",)),
                     ("resnet110", "bn", 2, ("graph",)), ("resnet110", "gn:16", 2, ("graph",))],
    "fast_check_steps": 20, "study_model": "resnet20", "study_workers": 4, "minutes": 8.0,
}
SMALL = {  # each command once, as small as it goes: a CPU shared with other work is slow
    "train_model": "resnet8", "precision_epochs": 1, "resume_epochs": 2, "resume_batch": 32,
    "tests_k": "ghost_bn",
    "bench_models": ["resnet8"], "bench_norms": ["bn"], "bench_batches": [4],
    "bench_virtual": [2], "bench_steps": 2, "bench_repeats": 1,
    "fuse": [2], "fuse_batches": [2], "fuse_model": "resnet8", "eval_models": ["resnet8"],
    "fast_configs": [("resnet8", "bn", 2, ())], "fast_check_steps": 5,
    "study_model": "resnet8", "study_workers": 2, "minutes": 15.0,
}


class Check:
    def __init__(self, args):
        self.args = args
        self.small = args.small
        self.size = SMALL if args.small else FULL
        self.device = args.device
        self.cuda = args.device.startswith("cuda")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work))
        self.log = open(self.out / "gpu-check.log", "a", encoding="utf-8")
        self.start = time.monotonic()
        self.deadline = self.start + 60 * (args.minutes or self.size["minutes"])
        self.data_dir: str | None = None
        self.summary = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": args.device,
                        "small": args.small, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                        "install": os.environ.get("GPU_CHECK_INSTALL", "the current environment"),
                        "phases": {}}
        self.lock = threading.Lock()

    # -- output ------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def save(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.start, 1)
        for name, text in (("summary.json", json.dumps(self.summary, indent=1, default=str) + "\n"),
                           ("summary.md", gpu_summary.markdown(self.summary))):
            partial = self.out / (name + ".tmp")
            partial.write_text(text, encoding="utf-8")
            partial.replace(self.out / name)

    # -- commands ----------------------------------------------------------------------------
    def run(self, command: list[str], timeout: float, env: dict | None = None, stop_signal=signal.SIGTERM) -> dict:
        """Run a command in its own process group; on timeout send it `stop_signal`, then kill."""
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, stop_signal)
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            timed_out = True
        result = {"command": " ".join(command).replace(sys.executable, "python3"), "code": proc.returncode,
                  "seconds": round(time.monotonic() - started, 1), "timed_out": timed_out,
                  "stdout": stdout, "stderr": stderr}
        with self.lock:
            self.log.write(f"\n$ {result['command']}\n{stdout}{stderr}[exit {proc.returncode} after "
                           f"{result['seconds']} s{', timed out' if timed_out else ''}]\n")
            self.log.flush()
        return result

    def normlab(self, *args: str, timeout: float, env: dict | None = None, stop_signal=signal.SIGTERM) -> dict:
        return self.run([sys.executable, "-m", "normlab", *args], timeout, env, stop_signal)

    def worker(self, name: str, payload: dict, timeout: float) -> dict:
        """Run one of this file's in-process jobs (WORKERS) in a subprocess; its JSON result,
        as far as it got (workers write their result after each item)."""
        target = self.work / f"{name}.json"
        result = self.run([sys.executable, __file__, "--worker", name, "--device", self.device,
                           "--worker-json", str(target), "--worker-args", json.dumps(payload)], timeout,
                          stop_signal=signal.SIGKILL)
        data = json.loads(target.read_text()) if target.exists() else {}
        data["exit"] = result["code"]
        if result["code"] != 0:
            data["error"] = last_line(result["stderr"]) or f"exit {result['code']}"
        return data

    def device_args(self) -> list[str]:
        """--device, and on a CPU one thread per run: the check runs several at once."""
        return ["--device", self.device] + ([] if self.cuda else ["--threads", "1"])

    def data_args(self) -> list[str]:
        return ["--data", "cifar10", "--data-dir", self.data_dir] if self.data_dir else ["--data", "sample"]

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, budget: float) -> float:
        """A command's limit: against hangs, not a target (the budget sizes the work); never
        past the deadline, so that the summary is written before an outer limit strikes."""
        floor = 90 if self.cuda else 300
        return max(min(max(1.5 * budget, floor), self.remaining() + 15), 10)

    # -- phases ------------------------------------------------------------------------------
    def phase(self, name: str, budget: float) -> None:
        self.say(f"\n== {name} (budget {budget:.0f} s)")
        started = time.monotonic()
        try:
            result = PHASE_FUNCTIONS[name](self, budget)
        except Exception as err:  # noqa: BLE001 (a broken phase must not stop the others)
            self.log.write(traceback.format_exc())
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = round(time.monotonic() - started, 1)
        self.summary["phases"][name] = result
        self.say(f"   {name}: {result['status']}" + (f" ({result.get('error') or result.get('reason')})"
                                                       if result["status"] != "ok" else "") + f", {result['seconds']} s")
        self.save()




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:K or cpu (default: %(default)s)")
    p.add_argument("--small", action="store_true", help="the small form: tiny models and data, a few minutes on a CPU")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-check-out"),
                   help="folder for the four result files (default: $OUT, else ./gpu-check-out)")
    p.add_argument("--data", default=str(ROOT / "gpu-data" / "cifar10-subset.npz.xz"),
                   help="the real-data subset from scripts/gpu_data.py (default: %(default)s; without it, "
                        "the bundled sample)")
    p.add_argument("--minutes", type=float, help="time budget; phases that do not fit are skipped (default: "
                   "8; small: 15, a limit rather than a target)")
    p.add_argument("--only", help="comma-separated phases to run (default: all): " + ", ".join(PHASES))
    p.add_argument("--work", help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return WORKERS[args.worker](args.device, json.loads(args.worker_args), Path(args.worker_json))
    only = args.only.split(",") if args.only else list(PHASES)
    unknown = sorted(set(only) - set(PHASES))
    if unknown:
        p.error(f"unknown phase {unknown[0]}; phases: {', '.join(PHASES)}")
    check = Check(args)
    check.say(f"gpu-check: {check.summary['command']}; results in {check.out}, runs in {check.work}")
    todo = [name for name in PHASES if name in only or name == "environment"]
    for i, name in enumerate(todo):
        left = sum(SHARES[n] for n in todo[i:])
        budget = check.remaining() * SHARES[name] / left
        if check.remaining() < 5:
            check.summary["phases"][name] = {"status": "skipped", "reason": "out of time (--minutes)"}
            continue
        check.phase(name, budget)
    check.summary["projection"] = gpu_summary.projection(check.summary)
    check.save()
    print("\n" + (check.out / "summary.md").read_text())
    if not check.args.work:
        shutil.rmtree(check.work, ignore_errors=True)
    failed = [n for n, r in check.summary["phases"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
