"""Verdicts that survive review: like compared with like (setups), every seed counted (the
divergence rule), paired tests, calibrated multi-comparison claims (a simulation with the real
verdict functions), and published settings told apart from the study's."""
import re

import numpy as np
import pytest

from normlab import references, rundir
from normlab.config import RunConfig
from normlab.report import build_report
from normlab.report.findings import (AGREES, DISAGREES, INCONCLUSIVE, best_verdict, flat_verdict,
                                     sign_verdict)
from normlab.report.runs import group_points, load_runs
from normlab.report.setups import partition
from normlab.stats import PAIRED, WELCH, contrast, difference, holm, holm_adjusted
from test_report import fake_run, study


def findings_table(text: str) -> list[list[str]]:
    """The rows of report.md's findings table, as cells."""
    section = text.split("## Findings")[1].split("How a verdict is reached")[0]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| claim")]


# -- like with like ------------------------------------------------------------------------------
def add_runs(root, norm, error, seeds, batch=32, **fields):
    """Finished runs of one point (seeds 0..seeds-1, errors a little apart)."""
    fields = {"model": "resnet56", "epochs": 6, "data": "cifar10", **fields}
    return [fake_run(root, RunConfig(norm=norm, batch_size=batch, seed=s, **fields), error + 0.05 * s)
            for s in range(seeds)]


def with_study(root, ids, name="norms"):
    rundir.write_json(root / "study.json", {"name": "synthetic", "studies": {name: ids}})
    return root


def two_setups(root):
    """One device: BN clearly ahead of GN at 32. Eight devices: GN clearly ahead. Seed counts
    are chosen so that matching by (norm, batch) and most seeds would take BN from the first
    setup and GN from the second."""
    ids = add_runs(root, "bn", 7.5, 3) + add_runs(root, "gn:16", 9.5, 2) + \
        add_runs(root, "bn", 9.5, 2, virtual_gpus=8) + add_runs(root, "gn:16", 8.5, 3, virtual_gpus=8)
    return with_study(root, ids)


def test_runs_of_other_setups_are_never_compared(tmp_path):
    root = two_setups(tmp_path / "r")
    text = build_report(root).read_text()
    rows = [r for r in findings_table(text) if r[0].startswith("BN is ahead of GN")]
    assert [(r[2], r[4].split()[0]) for r in rows] == [("resnet56, 1 device × N", "**agrees**"),
                                                      ("resnet56, 8 devices × N", "**disagrees**")]
    # each setup has its own section and figures, headed by what tells it apart
    assert "### resnet56, 1 device × N\n" in text and "### resnet56, 8 devices × N\n" in text
    assert "figures/synthetic/norms_resnet56-x1_b32.png" in text and "figures/synthetic/norms_resnet56-x8_b32x8.png" in text
    assert (root / "figures" / "synthetic" / "norms_resnet56-x1_b32.png").exists()


def test_setups_differ_in_every_field_but_norm_batch_and_seed(tmp_path):
    root = tmp_path / "r"
    add_runs(root, "bn", 7.5, 2) + add_runs(root, "gn:16", 9.5, 2, batch=8) + add_runs(root, "gn:cpg=4", 9.0, 2)
    add_runs(root, "bn", 7.5, 1, precise_bn=64)  # a variant of BN: the same setup
    add_runs(root, "bn", 7.5, 2, epochs=7)
    add_runs(root, "bn", 7.5, 2, epochs=7, weight_decay=5e-4)
    setups = partition(load_runs(root))
    assert [s.title for s in setups] == ["resnet56, 1 device × N, 6 epochs, weight decay 0.0001",
                                         "resnet56, 1 device × N, 7 epochs, weight decay 0.0001",
                                         "resnet56, 1 device × N, 7 epochs, weight decay 0.0005"]
    assert [len(s.runs) for s in setups] == [7, 2, 2]
    assert len({s.slug for s in setups}) == 3 and all(re.fullmatch(r"resnet56-[a-z0-9.-]+", s.slug) for s in setups)
    assert partition(load_runs(root))[0].slug == setups[0].slug  # stable


# -- every seed counted --------------------------------------------------------------------------
def batch_study(root, bn2_states, bn2=20.0, seeds=3):
    """BN and GN at batch 32 and 2; BN at batch 2 has the given states per seed."""
    members = []
    for s in range(seeds):
        for norm, batch, error in (("bn", 32, 7.5), ("gn:16", 32, 9.5), ("gn:16", 2, 9.6), ("bn", 2, bn2)):
            cfg = RunConfig(model="resnet56", norm=norm, batch_size=batch, epochs=6, seed=s, data="cifar10")
            state = bn2_states[s] if (norm, batch) == ("bn", 2) else "done"
            members.append(fake_run(root, cfg, error + 0.05 * s, epochs=6 if state == "done" else 2, state=state))
    rundir.write_json(root / "study.json", {"name": "s", "studies": {"batch-size": members}})
    return root


def claim_rows(root):
    return {r[0].split(" (")[0]: r for r in findings_table(build_report(root).read_text())}


def test_a_diverged_seed_counts_at_chance_error_and_is_said(tmp_path):
    root = batch_study(tmp_path / "r", ["done", "diverged", "done"])
    points = {(p.norm, p.cfg.batch_size): p for p in group_points(load_runs(root)).values()}
    bn2 = points[("bn", 2)]
    assert bn2.by_seed == {0: pytest.approx(20.0), 1: 90.0, 2: pytest.approx(20.1)}
    assert bn2.summary().mean == pytest.approx((20.0 + 90.0 + 20.1) / 3)
    rows = claim_rows(root)
    rises = rows["BN's error rises as the batch shrinks"]
    assert "1 of 3 seeds diverged, counted at 90 % error" in rises[3]
    # one diverged seed of three widens the interval: the rise is no longer certain
    assert rises[4].startswith("**inconclusive**")
    text = build_report(root).read_text()
    assert "a diverged seed counts at chance error (90 % on CIFAR-10" in text
    assert "1 of 3 seeds diverged, counted at 90 % error" in text.split("## resnet56")[1]  # the tables too


def test_divergence_of_every_seed_decides_the_claim(tmp_path):
    # before: a point whose seeds all diverged vanished, and with it the claim
    rows = claim_rows(batch_study(tmp_path / "r", ["diverged"] * 3))
    assert rows["BN's error rises as the batch shrinks"][4] == "**agrees**"
    assert rows["The gap BN − GN grows as the batch shrinks"][4] == "**agrees**"
    assert "3 of 3 seeds diverged" in rows["BN's error rises as the batch shrinks"][3]


def test_failed_and_unfinished_seeds_are_left_out_and_counted(tmp_path):
    root = batch_study(tmp_path / "r", ["done", "failed", "running"])
    bn2 = next(p for p in group_points(load_runs(root)).values() if (p.norm, p.cfg.batch_size) == ("bn", 2))
    assert bn2.finals == [pytest.approx(20.0)]
    assert bn2.seed_note() == "1 of 3 failed (left out); 1 of 3 running (left out)"


# -- paired where seeds pair ---------------------------------------------------------------------
def test_paired_where_seeds_pair_welch_otherwise():
    from scipy import stats as scipy_stats
    a = {0: 7.0, 1: 8.1, 2: 9.3, 3: 7.6}
    b = {0: 7.5, 1: 8.5, 2: 9.9, 3: 8.0}  # the seed moves both; b is higher by about 0.5 each time
    d = difference(a, b)
    assert d.test == PAIRED and d.dof == 3
    ci = scipy_stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert d.p_value() == pytest.approx(scipy_stats.ttest_rel(list(a.values()), list(b.values())).pvalue)
    welch = difference(list(a.values()), list(b.values()))
    assert welch.test == WELCH and welch.low < 0 < welch.high and d.high < 0  # pairing sees it, Welch not
    assert difference(a, {**b, 4: 8.0}).test == WELCH  # other seeds: Welch
    # a difference of differences pairs too, seed by seed
    c = contrast([(1, a), (-1, b), (-1, b), (1, a)])
    assert c.test == PAIRED and c.mean == pytest.approx(2 * d.mean)


def test_findings_pair_seeds_and_say_so(tmp_path):
    # each seed moves every norm by the same amount: Welch's interval holds 0, the paired one not
    root = tmp_path / "r"
    members = []
    for s, shift in enumerate((0.0, 1.5, -1.2)):
        for norm, error in (("bn", 7.5), ("gn:16", 8.0)):
            cfg = RunConfig(model="resnet56", norm=norm, batch_size=32, epochs=6, seed=s, data="cifar10")
            members.append(fake_run(root, cfg, error + shift + 0.01 * s))
    rundir.write_json(root / "study.json", {"name": "s", "studies": {"norms": members}})
    row = claim_rows(root)["BN is ahead of GN at batch 32"]
    assert "(paired)" in row[3] and row[4] == "**agrees**"


# -- calibrated verdicts -------------------------------------------------------------------------
def test_holm():
    assert holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]  # 0.01 <= 0.05/3; 0.03 > 0.05/2
    assert holm([0.01, 0.02, 0.04], 0.05) == [True, True, True]
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def simulate(rng, means, seeds, paired=True):
    """Each point: mean + noise of standard deviation 1 (one seed-standard-deviation); paired
    points hold seeds 0..n-1, unpaired ones each their own seeds (plain lists: Welch)."""
    values = [m + rng.standard_normal(seeds) for m in means]
    return [dict(enumerate(v.tolist())) if paired else v.tolist() for v in values]


def rate(claim, sims, seed=0):
    rng = np.random.default_rng(seed)
    verdicts = [claim(rng) for _ in range(sims)]
    return {v: verdicts.count(v) / sims for v in (AGREES, DISAGREES, INCONCLUSIVE)}


def flat(rng, change, paired, batches=4, margin=1.0):
    points = simulate(rng, [0.0] + [change] * (batches - 1), 3, paired)
    return flat_verdict([difference(p, points[0]) for p in points[1:]], margin)[0]


# (name, claim, the verdict that would be false): no true difference anywhere, 3 seeds
NULL = [
    ("one difference, paired", lambda r: sign_verdict(difference(*simulate(r, [0, 0], 3)), +1)[0], None),
    ("one difference, Welch", lambda r: sign_verdict(difference(*simulate(r, [0, 0], 3, False)), +1)[0], None),
    ("difference of differences, paired",
     lambda r: sign_verdict(contrast(list(zip([1, -1, -1, 1], simulate(r, [0] * 4, 3)))), +1)[0], None),
    ("S is the best of 8, paired", lambda r: best_verdict(0, dict(enumerate(simulate(r, [0] * 8, 3))))[0], None),
    ("S is the best of 5, Welch", lambda r: best_verdict(0, dict(enumerate(simulate(r, [0] * 5, 3, False))))[0], None),
    ("flat at 3 smaller batches, truly flat", lambda r: flat(r, 0.0, True), DISAGREES),
    ("flat at 3 smaller batches, truly changed by the margin", lambda r: flat(r, 1.0, True), AGREES),
    ("flat, truly changed by the margin, Welch", lambda r: flat(r, 1.0, False), AGREES),
]


@pytest.mark.parametrize("name,claim,false", NULL, ids=[n for n, _, _ in NULL])
def test_no_true_difference_gives_false_verdicts_at_or_under_5_percent(name, claim, false):
    sims = 2000
    found = rate(claim, sims)
    wrong = found[false] if false else found[AGREES] + found[DISAGREES]
    # at most the nominal 5 %, give or take the simulation's own error (3 standard errors)
    assert wrong <= 0.05 + 3 * (0.05 * 0.95 / sims) ** 0.5, (name, found)


# "agrees" with a true difference of two seed-standard-deviations and 5 seeds, seeds independent
# (measured over 20,000 simulated studies with this code: 66.3 %, 76.8 %, 23.5 %); floors a
# little below. Pairing costs power when the seeds share nothing (4 degrees of freedom instead of
# Welch's 8) and gains it as soon as they do; "best of 5" needs all 4 comparisons, Holm-corrected.
POWER = [
    ("one difference, paired", lambda r: sign_verdict(difference(*simulate(r, [2, 0], 5)), +1)[0], 0.62),
    ("one difference, Welch", lambda r: sign_verdict(difference(*simulate(r, [2, 0], 5, False)), +1)[0], 0.72),
    ("S is the best of 5, paired",
     lambda r: best_verdict(0, dict(enumerate(simulate(r, [0, 2, 2, 2, 2], 5))))[0], 0.20),
]


@pytest.mark.parametrize("name,claim,floor", POWER, ids=[n for n, _, _ in POWER])
def test_two_standard_deviations_with_5_seeds_agree_this_often(name, claim, floor):
    found = rate(claim, 1000, seed=1)
    assert found[AGREES] >= floor and found[DISAGREES] == 0, (name, found)


def test_verdict_rules_of_multi_comparison_claims():
    # S = 0 is better than every other by a clear margin: agrees; one other is better: disagrees
    values = {0: {0: 1.0, 1: 1.1, 2: 0.9}, 1: {0: 5.0, 1: 5.2, 2: 4.9}, 2: {0: 6.0, 1: 6.1, 2: 5.8}}
    assert best_verdict(0, values)[0] == AGREES
    assert best_verdict(2, values)[0] == DISAGREES
    tied = {**values, 3: {0: 1.0, 1: 1.2, 2: 0.8}}
    verdict, why = best_verdict(0, tied)
    assert verdict == INCONCLUSIVE and why.startswith("tied with 3 (Holm-adjusted p")
    # flat: agrees only when every change lies within the margin
    within = difference({0: 0.1, 1: 0.2, 2: 0.0}, {0: 0.0, 1: 0.1, 2: 0.1})
    beyond = difference({0: 3.1, 1: 3.2, 2: 3.0}, {0: 0.0, 1: 0.1, 2: 0.1})
    assert flat_verdict([within, within])[0] == AGREES
    assert flat_verdict([within, beyond])[0] == DISAGREES
    assert flat_verdict([within, beyond], margin=5.0)[0] == AGREES


def test_flat_margin_is_an_option_of_the_report(tmp_path):
    root = tmp_path / "r"
    study(root, {("batch-size", "bn", 32): 7.5, ("batch-size", "bn", 2): 20.0,
                 ("batch-size", "gn:16", 32): 9.5, ("batch-size", "gn:16", 2): 10.0})
    rows = claim_rows(root)
    assert rows["GN's error stays flat as the batch shrinks"][4] == "**agrees**"  # 0.5 within ± 1
    text = build_report(root, flat_margin=0.2).read_text()
    flat_row = next(r for r in findings_table(text) if r[0].startswith("GN's error stays flat"))
    assert "within ± 0.2 points" in flat_row[0] and flat_row[4] == "**disagrees**"
    assert "The flat margin is ± 0.2 points (`normlab report --flat-margin`" in text


# -- published settings --------------------------------------------------------------------------
def test_same_setting_needs_model_data_devices_epochs_and_schedule():
    published = references.load()
    impl = next(p for p in published if p.source == "impl-report")
    he56 = next(p for p in published if p.source == "he2016" and p.model == "resnet56")
    he110 = next(p for p in published if p.source == "he2016" and p.model == "resnet110")
    report_run = RunConfig(model="resnet56", data="cifar10", epochs=100, schedule="step", step_size=30)
    assert impl.same_setting(report_run)
    for other in ({"epochs": 164}, {"base_lr": 0.025}, {"virtual_gpus": 8}, {"schedule": "cosine"},
                  {"step_size": 40}, {"data": "sample"}, {"model": "resnet20"}, {"warmup_epochs": 1.0}):
        assert not impl.same_setting(RunConfig(**{**report_run.__dict__, **other})), other
    # He et al.: 2 GPUs x 64 images, lr 0.1, / 10 at epochs 82 and 123 of 164
    he = RunConfig(model="resnet56", data="cifar10", virtual_gpus=2, batch_size=64, epochs=164,
                   schedule="multistep", milestones=(82, 123), base_lr=0.05, base_batch=32)
    assert (he56.devices, he56.batch_size) == (2, 64) and he56.same_setting(he)
    assert not he56.same_setting(RunConfig(**{**he.__dict__, "virtual_gpus": 1, "batch_size": 128}))
    assert not he56.same_setting(RunConfig(**{**he.__dict__, "epochs": 100}))
    # ResNet-110 warms up at lr 0.01 for 400 iterations
    he_110 = RunConfig(**{**he.__dict__, "model": "resnet110"})
    assert not he110.same_setting(he_110)
    assert he110.same_setting(RunConfig(**{**he_110.__dict__, "warmup_steps": 400, "warmup_shape": "constant"}))


def test_findings_name_a_source_of_the_same_setting(tmp_path):
    root = study(tmp_path / "r", {("norms", "bn", 32): 7.5, ("norms", "gn:16", 32): 9.5}, epochs=100)
    row = claim_rows(root)["BN is ahead of GN at batch 32"]
    assert "impl. report, CIFAR-10 ResNet-56 (same setting): BN ≈ 7.45" in row[1]
    assert "GN paper, ImageNet ResNet-50: BN 23.6" in row[1]
    row = claim_rows(study(tmp_path / "s", {("norms", "bn", 32): 7.5, ("norms", "gn:16", 32): 9.5}))[
        "BN is ahead of GN at batch 32"]
    assert "(same setting)" not in row[1]  # 6 epochs: another setting
