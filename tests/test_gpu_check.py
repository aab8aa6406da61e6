"""scripts/gpu_check.py (what scripts/gpu-check.sh runs on a GPU) in its small form on the CPU:
every phase runs, or says why it cannot here, and the summary it writes holds the numbers; and
the paper preset's projection from bench numbers."""
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_summary  # noqa: E402
from gpu_check import PHASES  # noqa: E402


def test_the_small_form_runs_every_phase_and_writes_its_summary(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--small", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log", "study-report.tar.gz", "summary.json", "summary.md"]
    s = json.loads((out / "summary.json").read_text())
    phases = s["phases"]
    assert list(phases) == list(PHASES) and {p["status"] for p in phases.values()} == {"ok"}, phases
    assert phases["environment"]["data"]["train"] == 500 and phases["environment"]["torch"]
    assert phases["tests"]["counts"]["passed"] >= 1 and not phases["tests"]["failed"]
    assert {c["case"] for c in phases["bad-input"]["cases"]} == {"device-beyond-the-gpus", "fast-path-on-cpu"}
    assert "out of GPU memory needs a GPU" in phases["bad-input"]["not_run"]
    precision = phases["precision"]
    assert set(precision["test_error"]) == {"bf16", "fp32", "fp32 seed 1"}
    assert precision["max_test_error_gap"]["bf16 vs fp32"] >= 0
    resume = phases["resume"]
    assert resume["with_deterministic"]["identical"] and resume["without_deterministic"]["identical"]  # the CPU is exact
    assert resume["deterministic_cost"] > 0
    bench = phases["bench"]
    assert bench["plain"]["results"][0]["speedup"] > 0 and bench["virtual"]["results"][0]["virtual_gpus"] == 4
    assert bench["fused"]["results"][0]["runs"] == 2 and bench["evaluation"]["results"][0]["images_per_s"] > 0
    fast = phases["fast-path"]
    assert "need CUDA" in fast["not_run"] and fast["results"][0]["noise_floor"]["max_relative_weight_gap"] == 0
    study = phases["study"]
    assert len(study["runs"]) == 8 and {x["state"] for x in study["runs"]} == {"done"}
    with tarfile.open(out / "study-report.tar.gz") as tar:
        names = tar.getnames()
    assert "study/report.md" in names and "study/results.csv" in names and any(n.endswith(".png") for n in names)
    assert s["projection"]["status"].startswith("not computed")
    md = (out / "summary.md").read_text()
    assert "## kill -9, then the same command" in md and "## Real-data study" in md


def test_the_paper_preset_is_projected_from_measured_throughput():
    rows = [{"model": m, "norm": n, "batch_size": b, "virtual_gpus": 8, "normlab_images_per_s": 10_000.0}
            for m in ("resnet56", "resnet110") for n in ("bn", "gn:16") for b in (2, 8, 32)]
    evaluation = [{"model": m, "norm": n, "images_per_s": 50_000.0} for m in ("resnet56", "resnet110") for n in ("bn", "gn:16")]
    fast = [{"model": "resnet56", "norm": "bn", "batch_size": 2, "virtual_gpus": 8,
             "paths": {"off": {"images_per_s": 10_000.0}, "graph": {"images_per_s": 40_000.0, "equal_within_noise": True}}}]
    summary = {"phases": {"bench": {"virtual": {"results": rows}, "evaluation": {"results": evaluation}},
                          "fast-path": {"results": fast}}}
    p = gpu_summary.projection(summary)
    assert p["runs"] == 54 and p["train_images"] == 269_734_400 and p["eval_images"] == 54_000_000
    assert math.isclose(p["gpu_hours_eager"], (269_734_400 / 10_000 + 54_000_000 / 50_000) / 3600)
    # the graph at ResNet-56 BN 8 x 2: that run (5,000,000 images) four times faster, and the one at
    # 8 x 4 (4,998,400 images) twice, half way between 8 x 2 and 8 x 8 in log N
    saved = 5_000_000 * (1 / 10_000 - 1 / 40_000) + 4_998_400 * (1 / 10_000 - 1 / 20_000)
    assert math.isclose(p["gpu_hours_eager"] - p["gpu_hours_best"], saved / 3600)
    assert math.isclose(gpu_summary.interpolate({2: 100.0, 8: 400.0}, 4), 200.0)  # log-log: half way in log N
    assert "not computed" in gpu_summary.projection({"phases": {"bench": {}}})["status"]
