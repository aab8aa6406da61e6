"""The report's section "Inside the network", from synthetic run directories with probes."""
import random
import re

import pytest

import normlab
from normlab import rundir
from normlab.config import RunConfig
from normlab.probes import PROBES, row, write
from normlab.report import build_report
from normlab.report.inside import full_norm, slope
from normlab.report.probe_data import read_rows, summarize
from test_report import fake_run


def fake_probes(run_dir, gap: float | None, population: float, batch: float | None, epochs: int = 6, seed: int = 0):
    """probes.csv of a ResNet-8-like run: 3 statistics layers whose mean shift averages `gap`
    at the last epoch (None: no statistics layers), 3 blocks, 4 weights, and the test errors."""
    rng = random.Random(seed)
    rows = []
    for e in range(epochs + 1):
        if gap is not None:
            for d, name in enumerate(("norm1", "layer1.0.norm1", "layer2.0.norm1"), 1):
                rows += [row(e, name, d, "batch_mean_shift", gap * (0.5 + 0.5 * d) / 1.5 * (1 + 0.1 * (epochs - e))),
                         row(e, name, d, "batch_log_std_ratio", gap / 2 + rng.uniform(0, 0.01))]
        for d, name in enumerate(("layer1.0", "layer2.0", "layer3.0"), 1):
            rows += [row(e, name, d, "block_input_rms", 1.0 + d), row(e, name, d, "branch_rms", 0.5 * d),
                     row(e, name, d, "skip_rms", 1.0), row(e, name, d, "branch_skip_ratio", 0.5 * d)]
        rows += [row(e, name, d, "grad_norm", 0.1 * d) for d, name in enumerate(("conv1", "layer1.0.conv1", "fc"), 1)]
        rows += [row(e, "fc", None, "feature_effective_rank", 20 + e), row(e, "fc", None, "feature_mean_cosine", 0.5)]
    if batch is not None:
        rows += [row(epochs, "model", None, "test_error_batch_stats", batch),
                 row(epochs, "model", None, "test_error_population_stats", population)]
    write(run_dir, rows)


def inside_study(root, bn: dict, seeds: int = 3, ablations: bool = True):
    """bn maps a batch size to (error, gap, error with batch statistics at test time)."""
    rng = random.Random(0)
    members = []

    def add(norm, batch, error, gap, with_batch, seed):
        cfg = RunConfig(model="resnet8", norm=norm, batch_size=batch, epochs=6, seed=seed, data="sample").normalized()
        error += rng.uniform(-0.2, 0.2)
        members.append(fake_run(root, cfg, error))
        fake_probes(root / cfg.run_id(), gap, error, None if with_batch is None else with_batch + rng.uniform(-0.2, 0.2),
                    seed=seed)

    for s in range(seeds):
        for batch, (error, gap, with_batch) in bn.items():
            add("bn", batch, error, gap * (1 + rng.uniform(-0.05, 0.05)), with_batch, s)
        for batch in (32, 2):
            add("gn:16", batch, 12.0, None, None, s)
        if ablations:
            add("bn:mean-only", 32, 14.0, 0.1, 14.5, s)
            add("gn:16:scale-only", 32, 13.0, None, None, s)
            add("none", 32, 20.0, None, None, s)
    rundir.write_json(root / "study.json", {"name": "why", "studies": {"inside": members}})
    return root


def section(text: str) -> str:
    return text.split("### Inside the network")[1].split("### All runs")[0]


def test_the_section_with_its_figures_finding_share_and_ablations(tmp_path):
    root = inside_study(tmp_path / "r", {32: (10.0, 0.1, 10.5), 8: (12.0, 0.2, 11.5), 2: (16.0, 0.4, 13.0)})
    text = section(build_report(root).read_text())
    for fig in ("inside_gap_resnet8.png", "inside_trends_resnet8_b32.png", "inside_trends_resnet8_b2.png",
                "inside_depth_resnet8_b32.png", "inside_ablations_resnet8.png"):
        (link,) = re.findall(rf"\]\((figures/\S*{fig})\)", text)   # figures/<study>/<figure>
        assert (root / link).stat().st_size > 10_000
    assert "| BN's small-batch penalty follows its train/test statistic gap (across batch sizes) | slope +" in text
    assert "**agrees**" in text
    # the penalty at 2 is 6 points; testing with batch statistics takes back 3 of them
    assert re.search(r"changes it by -(2\.[5-9]\d|3\.[0-4]\d) \[", text) and re.search(r"accounts for (4[5-9]|5[0-5]) %", text)
    assert "| 32 | BN mean-only |" in text and "vs BN" in text and "| 32 | no norm |" in text
    assert "GN G=16 scale-only" in text and "vs GN G=16" in text


def test_a_gap_that_shrinks_as_the_error_grows_disagrees(tmp_path):
    root = inside_study(tmp_path / "r", {32: (10.0, 0.4, 10.0), 8: (12.0, 0.2, 12.5), 2: (16.0, 0.1, 17.0)},
                        ablations=False)
    text = section(build_report(root).read_text())
    assert "**disagrees**" in text
    assert "population statistics at test time do better than batch statistics" in text


def test_one_seed_is_inconclusive_and_runs_without_probes_are_said(tmp_path):
    root = inside_study(tmp_path / "r", {32: (10.0, 0.1, 10.5), 2: (16.0, 0.4, 13.0)}, seeds=1, ablations=False)
    assert "**inconclusive**" in section(build_report(root).read_text())
    bare = tmp_path / "bare"
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=32, epochs=6, data="sample").normalized()
    rundir.write_json(bare / "study.json", {"name": "why", "studies": {"inside": [fake_run(bare, cfg, 10.0)]}})
    assert "No run of this study recorded probes: train it with `--probes`." in build_report(bare).read_text()


def test_probes_are_merged_beside_results_and_loaded(tmp_path, capsys):
    root = inside_study(tmp_path / "r", {32: (10.0, 0.1, 10.5), 2: (16.0, 0.4, 13.0)}, seeds=2, ablations=False)
    damaged = sorted(root.glob("*gn16*"))[0]
    (damaged / PROBES).write_text("epoch,layer,depth,probe,value\n1,norm1,1,batch_mean_shift,oops\n")
    build_report(root)
    err = capsys.readouterr().err
    assert err.count("probes.csv line 2 is not a probe row") == 1 and "the run's results are kept" in err
    runs, curves, probes = normlab.load_results(root)
    assert len(runs) == 8 and set(probes["run_id"]) == {p.name for p in root.iterdir() if p.is_dir()} - {damaged.name} - {"figures"}
    assert list(probes.columns) == ["run_id", "model", "norm", "batch_size", "virtual_gpus", "seed", "epoch", "layer",
                                    "depth", "probe", "value"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.csv", "curves.csv", "probes.csv"):
        (copy / name).write_bytes((root / name).read_bytes())
    assert len(normlab.load_results(copy).probes) == len(probes)


def test_slope_and_its_interval_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    assert slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])[0].mean == pytest.approx(2.0)
    xs, ys = [0.1, 0.12, 0.2, 0.22, 0.4, 0.38], [10.1, 9.8, 12.3, 11.9, 16.2, 15.7]
    fit, r = slope(xs, ys)
    ref = stats.linregress(xs, ys)
    assert fit.mean == pytest.approx(ref.slope) and fit.std == pytest.approx(ref.stderr) and r == pytest.approx(ref.rvalue)
    half = stats.t.ppf(0.975, len(xs) - 2) * ref.stderr
    assert (fit.low, fit.high) == pytest.approx((ref.slope - half, ref.slope + half))
    assert slope([0.1, 0.1], [1.0, 2.0]) == (None, pytest.approx(float("nan"), nan_ok=True))


def test_run_summaries_and_full_norms(tmp_path):
    fake_probes(tmp_path, 0.3, 20.0, 18.0, epochs=2)
    summary = summarize(read_rows(tmp_path / PROBES))
    assert summary.epochs == [0, 1, 2] and summary.gap() == pytest.approx(0.3 * (1 + 1.5 + 2) / 3 / 1.5)
    assert summary.trends["last_block_input_rms"] == [4.0, 4.0, 4.0]
    assert summary.final_test_error("batch") == 18.0 and summary.final_test_error("population") == 20.0
    assert full_norm("gn:16:mean-only") == "gn:16" and full_norm("bn:scale-only+ws") == "bn+ws"
    assert full_norm("bn") is None and full_norm("none") is None
