"""Soak test of crash safety: kill -9 a small study at random moments, many times, then check.

    python scripts/soak.py --kills 100 --out /tmp/soak --json benchmarks/soak.json

1. Runs the study once without interruption (the reference), and times a rerun of the finished
   study (start-up plus the report: the shortest attempt there is).
2. Runs the same study into another directory and kill -9s its whole process group at a random
   moment of every attempt: one attempt in five during start-up, the others just after the
   study has written new progress (so that every attempt moves it on). After 90 % of --kills
   (or sooner, if the study finishes first) it lets the study finish, and the remaining kills
   land in reruns of the finished study, which rebuild the report: late in start-up or in the
   report's writes. A last attempt runs undisturbed. Every write is
   held NORMLAB_FAULT_WRITE_DELAY seconds between its temporary file and the rename, and
   checkpoints are written every 0.3 s within epochs, so that many kills land in the middle of
   checkpoint, metrics and report writes (counted from the temporary files a kill leaves).
3. After every kill `normlab report` must succeed on the directory; at the end every run's
   metrics must equal the reference's exactly (timing columns aside) and no temporary file may
   be left. Exits 1 on any difference, 0 otherwise; --json records the result.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESET = """name: soak
description: the soak test's study (scripts/soak.py)
workers: 1
base: {model: resnet8, data: sample, epochs: 2, batch_size: 50, schedule: cosine}
studies:
  norms:
    - {norm: [bn, "gn:4", ln]}
"""
TIMING = ("seconds", "images_per_s")


def command(preset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "normlab", "reproduce", "--preset", str(preset), "--out", str(out),
            "--threads", "1", "--quiet", *extra]


def metrics(out: Path) -> dict[str, list[dict]]:
    from normlab import rundir
    return {p.name: [{k: v for k, v in row.items() if k not in TIMING}
                     for row in rundir.read_metrics(p / rundir.METRICS)]
            for p in sorted(out.iterdir()) if (p / rundir.CONFIG).exists()}


def temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tmp"))


def progress_mark(out: Path) -> list:
    """What the study has saved under OUT: each run's checkpoint digest and metrics size. File
    times will not do: a resumed run rewrites its metrics.csv (kept rows only) as it opens."""
    def saved(record: Path) -> tuple:
        try:
            return record.parent.name, record.read_bytes(), record.with_name("metrics.csv").stat().st_size
        except OSError:  # between a run's first files
            return record.parent.name, b"", 0
    return sorted(saved(p) for p in out.glob("*/checkpoint.sha256"))


def wait_until(proc: subprocess.Popen, done, limit: float = 600.0, every: float = 0.01) -> None:
    """Poll done() until it holds, the process ends, or LIMIT seconds pass."""
    start = time.monotonic()
    while proc.poll() is None and not done() and time.monotonic() - start < limit:
        time.sleep(every)


def kill_then_finish(command: list[str], out: Path, kills: int, max_delay: float, rng: random.Random,
                     attempts: int = 30, after_kill=None) -> int:
    """The tests' small soak: start `command` again and again; the first `kills` times, kill -9
    its process group at a random moment up to `max_delay` s after it has saved new progress
    under `out` (so that every attempt moves it on, however slow the machine), calling
    after_kill() each time; then let it finish. Returns the kills that landed (a process that
    ended first lands none); AssertionError when it fails or never finishes."""
    landed = 0
    for _ in range(attempts):
        mark = progress_mark(out)
        proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if landed < kills:
            wait_until(proc, lambda: progress_mark(out) != mark, limit=300)
            time.sleep(rng.uniform(0.0, max_delay))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                landed += 1
                if after_kill is not None:
                    after_kill()
                continue
        proc.wait(timeout=600)
        assert proc.returncode == 0, proc.stderr.read().decode()
        return landed
    raise AssertionError(f"{' '.join(command[:5])} ... never finished in {attempts} attempts")


def writing_report(out: Path) -> bool:
    """A file of the report (report.md, the CSVs, a figure) is being written."""
    return any(out.glob("*.tmp")) or any(out.glob("figures/*/*.tmp"))  # figures/<study>/*.png


def written_file(tmp: Path) -> str:
    """'.checkpoint.pt.<host>.<pid>.<random>.tmp' -> 'checkpoint.pt' (the file being written)."""
    name = tmp.name[1:-len(".tmp")].rsplit(".", 3)[0]
    return "a figure (.png)" if name.endswith(".png") else name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="kill -9s to land (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="of the kill times (default: %(default)s)")
    parser.add_argument("--write-delay", type=float, default=0.05,
                        help="seconds every write is held before its rename (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    from normlab.report import build_report

    work = args.out or Path(tempfile.mkdtemp(prefix="normlab-soak-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    preset = work / "soak.yaml"
    preset.write_text(PRESET)
    ref, out = work / "reference", work / "killed"
    started = time.monotonic()

    t = time.monotonic()
    subprocess.run(command(preset, ref), check=True, stdout=subprocess.DEVNULL)
    whole = time.monotonic() - t
    t = time.monotonic()
    subprocess.run(command(preset, ref), check=True, stdout=subprocess.DEVNULL)
    noop = time.monotonic() - t  # start-up + report: every attempt takes at least this
    print(f"reference study {whole:.1f} s; a rerun of the finished study {noop:.1f} s", flush=True)

    env = {**os.environ, "NORMLAB_FAULT_WRITE_DELAY": str(args.write_delay)}
    rng = random.Random(args.seed)
    kills, attempts, mid_write, report_failures = 0, 0, collections.Counter(), []
    finished_early = kills_while_training = 0
    training_kills = args.kills - max(1, args.kills // 10)  # the rest after every run is done
    while True:
        attempts += 1
        mark = progress_mark(out)
        proc = subprocess.Popen(command(preset, out, "--checkpoint-every", "0.005"), env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # While runs train, one attempt in five is killed at a random moment of start-up, the
        # others once the study has saved a new checkpoint or metrics row, plus a random moment
        # up to 0.6 s: every such attempt moves the study on, however slow the machine. Once every
        # run is done, attempts alternate between late start-up and the middle of a report write.
        if kills >= args.kills:
            deadline = None  # enough kills: let it finish
        elif finished_early and attempts % 2:
            deadline = rng.uniform(0.5, 1.0) * noop  # late in start-up or in the report's writes
        elif finished_early:  # in the middle of a report file's write
            wait_until(proc, lambda: writing_report(out), every=0.002)
            deadline = rng.uniform(0.0, args.write_delay)
        elif kills >= training_kills:
            deadline = None  # let the study finish, so that the last kills land in its report
        elif rng.random() < 0.2:
            deadline = rng.uniform(0.3, 1.0) * noop
        else:
            wait_until(proc, lambda: progress_mark(out) != mark)
            deadline = rng.uniform(0.0, 0.6)
        try:
            proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            for tmp in temporaries(out):
                mid_write[written_file(tmp)] += 1
            if any(out.glob("*/config.json")):
                try:
                    build_report(out)
                except Exception as err:  # the report must read the directory after any kill
                    report_failures.append(f"after kill {kills}: {type(err).__name__}: {err}")
            if kills % 10 == 0:
                print(f"{kills} kills, {attempts} attempts, killed mid-write: {dict(mid_write)}", flush=True)
            continue
        if proc.returncode != 0:
            print(f"attempt {attempts} failed with exit code {proc.returncode}: "
                  f"{proc.stderr.read().decode().strip()}", file=sys.stderr)
            return 1
        if kills >= args.kills:
            break
        if not finished_early:
            kills_while_training = kills
        finished_early += 1  # every run is done: later attempts rebuild the report, and are killed there

    got, want = metrics(out), metrics(ref)
    differences = [name for name in want if got.get(name) != want[name]]
    left = [str(p) for p in temporaries(out)]
    result = {
        "command": "python scripts/soak.py " + " ".join(sys.argv[1:]),
        "kills": kills, "attempts": attempts, "runs": len(want),
        "attempts_that_finished_before_the_last_kill": finished_early,
        "kills_before_every_run_was_done": kills_while_training if finished_early else kills,
        "killed_mid_write": dict(mid_write),
        "runs_with_different_metrics": differences, "report_failures": report_failures,
        "temporary_files_left": left, "reference_study_seconds": round(whole, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "passed": not differences and not report_failures and not left and len(got) == len(want),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
