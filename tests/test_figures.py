"""Every kind of figure of the report, rendered from small fixtures (several studies, one seed
and several, mid-study) with warnings turned into errors, and checked on its artists: legends
outside the data, a colour and a marker of its own per norm, G and channels per group on
separate axes, no line through published numbers that are not a series, whole epochs, a title
on every panel, no empty panel."""
import colorsys

import pytest
from matplotlib.colors import to_rgb

from normlab import records, rundir
from normlab.config import RunConfig
from normlab.report import build_report, figures
from normlab.report.labels import FAMILIES, styles
from test_report import fake_run, paper_like, study

pytestmark = pytest.mark.filterwarnings("error")  # "No artists with labels" and the like fail


def drawn(monkeypatch) -> dict:
    """Capture every figure the report saves (name -> figure, drawn), instead of closing it."""
    seen = {}
    plain = figures.save

    def save(plt, fig, path):
        plain(plt, fig, path)  # draws it: every artist has its place
        seen[f"{path.parent.name}/{path.name}"] = fig
        check(fig, path.name)
    monkeypatch.setattr(figures, "save", save)
    return seen


def panels(fig) -> list:
    return [ax for ax in fig.get_axes() if ax.get_visible()]


def legends(fig) -> list:
    found = list(fig.legends)
    for sub in fig.subfigs:
        found += sub.legends
    return found + [ax.get_legend() for ax in fig.get_axes() if ax.get_legend()]


def entries(legend) -> list[str]:
    return [text.get_text() for text in legend.get_texts()]


def series(axes) -> dict[str, set]:
    """Label -> the (colour, marker) of the study's own series so labelled, in these panels
    (error bars: their data line; published numbers, hollow, and unmarked lines left out)."""
    found: dict[str, set] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            line = handle[0] if hasattr(handle, "lines") else handle
            if line.get_markerfacecolor() == "none" or line.get_marker() in ("", "None", None):
                continue
            found.setdefault(name, set()).add((to_rgb(line.get_color()), line.get_marker()))
    return found


def distinct(styles_of: dict[str, set], name: str) -> None:
    assert all(len(s) == 1 for s in styles_of.values()), f"{name}: one series drawn two ways"
    colors = [c for (c, _), in styles_of.values()]
    markers = [m for (_, m), in styles_of.values()]
    assert len(set(colors)) == len(colors), f"{name}: series share a colour: {list(styles_of)}"
    assert len(set(markers)) == len(markers), f"{name}: series share a marker: {list(styles_of)}"


def check(fig, name: str) -> None:
    """What every figure of the report must hold."""
    axes = panels(fig)
    assert axes, name
    for ax in axes:
        assert ax.get_title(), f"{name}: a panel without a title"
        assert ax.get_lines() or ax.collections, f"{name}: an empty panel ({ax.get_title()})"
        if ax.get_xlabel() == "epoch":
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), f"{name}: epoch ticks {ticks}"
        assert not ("G" in ax.get_xlabel() and "channels per group" in ax.get_xlabel()), name
        for line in ax.get_lines():  # published numbers (hollow markers) are a line only as a series
            if line.get_markerfacecolor() == "none" and len(line.get_xdata()) < 3:
                assert line.get_linestyle() == "None", f"{name}: a line through {len(line.get_xdata())} points"
    boxes = [ax.get_window_extent() for ax in axes]
    assert legends(fig) or name.startswith("none"), f"{name}: no legend"
    for legend in legends(fig):
        box = legend.get_window_extent()
        assert not any(box.overlaps(b) for b in boxes), f"{name}: a legend over the data"
    for ax in axes:  # in a panel, every series its own colour and marker
        distinct(series([ax]), name)
    if fig.legends:  # one legend for all panels: a label is one style throughout
        distinct(series(axes), name)


def hue(color: str) -> tuple[float, float]:
    h, _, s = colorsys.rgb_to_hls(*to_rgb(color))
    return h, s


def test_variants_share_their_familys_colour_and_differ_by_marker():
    for variant in ("bn+pbn", "bn+ws", "brn+pbn", "gn+ws", "evonorm-b0", "evonorm-b0+pbn"):
        base = FAMILIES[variant.split("+")[0] if variant != "evonorm-b0" else "evonorm-s0"]
        mine = FAMILIES[variant]
        assert mine["color"] != base["color"] and mine["marker"] != base["marker"], variant
        (h1, s1), (h2, s2) = hue(mine["color"]), hue(base["color"])
        assert (s1 < 0.05 and s2 < 0.05) or abs(h1 - h2) < 0.05, variant  # greys, or one hue
    # several norms of one family in one figure: shades of its colour, markers of their own
    many = styles(["bn", "ln", "in", "gn:2", "gn:4", "gn:16", "gn:cpg=4", "gn:cpg=16", "gn:16+ws"])
    assert len({s["color"] for s in many.values()}) == len({s["marker"] for s in many.values()}) == 9


def two_studies(root):
    """A results directory with two study records: 'quick' (its three parts, 2 seeds) and
    'zoo-quick' (one seed)."""
    errors = {**paper_like(), ("norms", "bn", 32): 7.5, ("norms", "ln", 32): 11.0, ("norms", "in", 32): 11.5,
              ("norms", "gn:16", 32): 9.5}
    study(root, errors, seeds=2, model="resnet8", data="sample")
    members = rundir.read_json(root / "study.json")["studies"]
    (root / "study.json").unlink()
    records.write_record(root, "quick", "the quick study", members, {i: {} for ids in members.values() for i in ids})
    zoo = []
    for norm in ("bn", "brn", "gn:16", "gn:16+ws", "frn", "evonorm-s0:16", "evonorm-b0"):
        for batch in (8, 2):
            cfg = RunConfig(model="resnet8", norm=norm, batch_size=batch, epochs=3, data="sample",
                            virtual_gpus=8).normalized()
            zoo.append(fake_run(root, cfg, 40.0 + batch + len(norm), epochs=3))
    for batch in (8, 2):
        cfg = RunConfig(model="resnet8", norm="bn", batch_size=batch, epochs=3, data="sample",
                        virtual_gpus=8, precise_bn=512).normalized()
        zoo.append(fake_run(root, cfg, 39.0 + batch, epochs=3))
    records.write_record(root, "zoo-quick", "the zoo", {"zoo": zoo}, {i: {} for i in zoo})
    return root


def test_every_figure_of_two_studies(tmp_path, monkeypatch):
    seen = drawn(monkeypatch)
    build_report(two_studies(tmp_path / "r"))
    assert set(seen) == {"quick/norms_resnet8_b32.png", "quick/batch_size_resnet8.png",
                         "quick/batch_curves_resnet8.png", "quick/groups_resnet8.png",
                         "zoo-quick/zoo_resnet8.png"}
    groups = seen["quick/groups_resnet8.png"]
    xlabels = [ax.get_xlabel() for ax in panels(groups)]
    assert any(x.startswith("groups per layer G") for x in xlabels)
    assert any(x.startswith("channels per group") for x in xlabels)
    zoo = seen["zoo-quick/zoo_resnet8.png"]
    labels = [t for legend in legends(zoo) for t in entries(legend)]
    assert {"BN", "BN + PreciseBN", "GN G=16", "GN+WS G=16", "EvoNorm-S0 G=16", "EvoNorm-B0"} <= set(labels)
    # the bands are named where there are any (2 seeds); one seed is said once, in report.md only
    for name, fig in seen.items():
        title = fig.get_suptitle() + " ".join(ax.get_title() for ax in panels(fig))
        assert ("95 % CI" in title) == name.startswith("quick/"), name
        assert "one seed" not in title, name


def test_one_epoch_runs_get_whole_epoch_ticks(tmp_path, monkeypatch):
    seen = drawn(monkeypatch)
    root = tmp_path / "r"
    for norm in ("bn", "gn:4"):
        fake_run(root, RunConfig(model="resnet8", norm=norm, batch_size=32, epochs=1, data="sample"), 50.0, epochs=1)
    build_report(root)
    curves = seen[f"{root.name}/norms_resnet8_b32.png"]
    assert [list(ax.get_xticks()) for ax in panels(curves)] == [[1], [1]]


def test_mid_study_figures_have_no_empty_panel(tmp_path, monkeypatch):
    """Runs of a study under way: some finished, some with epochs done, some not started."""
    seen = drawn(monkeypatch)
    root = tmp_path / "r"
    ids = {}
    for norm, batch, state, epochs in [("bn", 32, "done", 6), ("gn:16", 32, "running", 2),
                                       ("bn", 8, "interrupted", 1), ("gn:4", 32, "running", 1)]:
        cfg = RunConfig(model="resnet8", norm=norm, batch_size=batch, epochs=6, data="sample").normalized()
        ids[(norm, batch)] = fake_run(root, cfg, 40.0, epochs=epochs, state=state)
    later = RunConfig(model="resnet8", norm="gn:16", batch_size=8, epochs=6, data="sample").normalized().run_id()
    records.write_record(root, "quick", "", {
        "norms": [ids[("bn", 32)], ids[("gn:16", 32)]],
        "batch-size": [ids[("bn", 32)], ids[("gn:16", 32)], ids[("bn", 8)], later],
        "groups": [ids[("gn:4", 32)], ids[("gn:16", 32)]]}, {**{i: {} for i in ids.values()}, later: {}})
    text = build_report(root).read_text()
    assert "Under way: 1 of 5 runs finished (1 interrupted, 2 running, 1 not started)" in text
    assert "(No figure of the GN group sweep yet" not in text  # its curves are there
    assert set(seen) == {"quick/norms_resnet8_b32.png", "quick/batch_size_resnet8.png",
                         "quick/batch_curves_resnet8.png", "quick/groups_resnet8.png"}
    groups = seen["quick/groups_resnet8.png"]
    titles = [ax.get_title() for ax in panels(groups)]  # nothing finished: no final errors yet
    assert "test error per epoch, by G" in titles and not any(t.startswith("final") for t in titles)


def test_nothing_finished_yet_draws_no_figure(tmp_path, monkeypatch):
    seen = drawn(monkeypatch)
    root = tmp_path / "r"
    cfg = RunConfig(model="resnet8", norm="bn", batch_size=32, epochs=6, data="sample")
    run = root / fake_run(root, cfg, 40.0, epochs=1, state="running")
    (run / "metrics.csv").unlink()  # its first epoch is still training
    text = build_report(root).read_text()
    assert not seen and "(No figure of the train and test error per norm yet" in text
