"""How the report names, orders and draws each norm: the one place for families and labels.

A family is what a reader compares (BN, LN, IN, GN, BRN, FRN, EvoNorm-S0/B0, their +WS forms,
the mean-only and scale-only ablations of BN, LN, IN and GN, no norm and SkipInit); every GN variant (gn:G, gn:cpg=K) is one family, told apart by label and marker. Names
come from the norm registry (normlab.norms.label); a new norm family gets one entry in FAMILIES
(colour, marker, line style) here.

A run evaluated with PreciseBN is a variant of its norm: `variant(cfg)` is its norm spec with
`@precise-bn=M` appended, which every function here accepts wherever a norm is expected, so
that BN and BN + PreciseBN get their own rows and lines.
"""
from __future__ import annotations

from .. import norms
from ..errors import NormlabError

PRECISE = "@precise-bn="

# family -> style. Families take the Okabe-Ito colours; a variant of a family (+WS, + PreciseBN,
# the other EvoNorm) takes a shade of its colour and a marker of its own, so that every norm in a
# figure differs in colour and in marker, and variants still read as one family. The order of
# this mapping is the order of rows and legends.
FAMILIES = {
    "bn": {"color": "#000000", "marker": "o", "linestyle": "-"},
    "bn+pbn": {"color": "#9A9A9A", "marker": "p", "linestyle": ":"},
    "bn+ws": {"color": "#575757", "marker": "h", "linestyle": "--"},
    "brn": {"color": "#E69F00", "marker": "v", "linestyle": "-"},
    "brn+pbn": {"color": "#F2CF7F", "marker": "d", "linestyle": ":"},
    "ln": {"color": "#0072B2", "marker": "^", "linestyle": "-."},
    "in": {"color": "#009E73", "marker": "D", "linestyle": ":"},
    "gn": {"color": "#D55E00", "marker": "s", "linestyle": "--"},
    "gn+ws": {"color": "#EDA06B", "marker": "X", "linestyle": "-"},
    "frn": {"color": "#CC79A7", "marker": "P", "linestyle": "-"},
    "evonorm-s0": {"color": "#56B4E9", "marker": "<", "linestyle": "-"},
    "evonorm-b0": {"color": "#2D7DAA", "marker": ">", "linestyle": "--"},
    "evonorm-b0+pbn": {"color": "#A9D9F4", "marker": "H", "linestyle": ":"},
    # ablations take a shade of their norm's colour; mean-only dashed, scale-only dotted
    "bn-mean-only": {"color": "#303030", "marker": "d", "linestyle": (0, (5, 2))},
    "bn-scale-only": {"color": "#7A7A7A", "marker": "*", "linestyle": (0, (1, 1))},
    "ln-mean-only": {"color": "#00507D", "marker": "d", "linestyle": (0, (5, 2))},
    "ln-scale-only": {"color": "#66AAD1", "marker": "*", "linestyle": (0, (1, 1))},
    "in-mean-only": {"color": "#006E50", "marker": "d", "linestyle": (0, (5, 2))},
    "in-scale-only": {"color": "#66C5AB", "marker": "*", "linestyle": (0, (1, 1))},
    "gn-mean-only": {"color": "#A34700", "marker": "d", "linestyle": (0, (5, 2))},
    "gn-scale-only": {"color": "#F4B98E", "marker": "*", "linestyle": (0, (1, 1))},
    # no normalization: the palette's yellow, darkened to read on white
    "none": {"color": "#C9BC1F", "marker": "8", "linestyle": "-"},
    "skipinit": {"color": "#8F861A", "marker": "H", "linestyle": "--"},
}
OTHER = {"color": "#7F7F7F", "marker": "x", "linestyle": "-"}
MARKERS = "osD^v<>phHdPX*8"   # every filled marker, for norms of one family in one figure


def variant(cfg) -> str:
    """A run config's norm as the report tells it apart: 'bn', or 'bn@precise-bn=4096'."""
    return cfg.norm + (f"{PRECISE}{cfg.precise_bn}" if getattr(cfg, "precise_bn", 0) else "")


def split(norm: str) -> tuple[str, int]:
    """'bn@precise-bn=4096' -> ('bn', 4096); 'gn:16' -> ('gn:16', 0)."""
    base, _, images = norm.partition(PRECISE)
    return base, int(images) if images.isdigit() else 0


def family(norm: str) -> str:
    """'bn', 'ln', 'in', 'gn', 'brn', 'frn', ..., with '+ws' and '+pbn' (PreciseBN) forms."""
    base, precise = split(norm)
    try:
        name = norms.family(base)
    except NormlabError:  # a spec this version cannot parse still gets a row, in grey
        return norm
    return name + ("+pbn" if precise else "")


def label(norm: str) -> str:
    """'BN', 'GN G=16', 'GN 4 ch/group', 'GN+WS G=16', 'BN + PreciseBN', 'EvoNorm-S0 G=16'."""
    base, precise = split(norm)
    try:
        return norms.label(base, precise)
    except NormlabError:
        return norm


def sort_key(norm: str) -> tuple:
    """Families in FAMILIES order; GN by channels per group, then by group count."""
    fam = family(norm)
    order = list(FAMILIES).index(fam) if fam in FAMILIES else len(FAMILIES)
    groups = per_group = 0
    if fam in FAMILIES:
        spec = norms.parse_norm(split(norm)[0])
        groups, per_group = spec.groups or 0, spec.per_group or 0
    return (order, per_group, groups, norm)


def sweep_value(norm: str, key: str) -> int | None:
    """G (key 'groups') or channels per group (key 'per_group') of a group-type norm, else None.
    LN is G = 1 and IN is 1 channel per group, as in the GN paper's Table 3."""
    if family(norm) not in ("ln", "in", "gn"):
        return None
    return getattr(norms.parse_norm(norm), key)


def shade(color: str, k: int) -> str:
    """The k-th shade of a colour (k = 1, 2, ...): alternately lighter and darker."""
    from matplotlib.colors import to_hex, to_rgb

    rgb = to_rgb(color)
    towards, amount = (1.0, 0.3 * ((k + 1) // 2)) if k % 2 else (0.0, 0.3 * (k // 2))
    if max(rgb) < 0.2:  # black only gets lighter
        towards, amount = 1.0, min(0.8, 0.25 * k)
    return to_hex(tuple(c + (towards - c) * min(amount, 0.8) for c in rgb))


def styles(names) -> dict[str, dict]:
    """Norm -> matplotlib style, every norm its own colour and marker: by family; further norms
    of a family in the same figure (GN G=4 beside GN G=16, say) take shades of its colour and
    markers that no family in the figure uses."""
    ordered = sorted(set(names), key=sort_key)
    out, firsts = {}, {}
    for norm in ordered:
        firsts.setdefault(family(norm), norm)
    own = {norm: dict(FAMILIES.get(family(norm), OTHER)) for norm in firsts.values()}
    taken = {style["marker"] for style in own.values()}
    markers = set()
    for norm, style in own.items():  # families that share a marker (the ablations): the first keeps it
        if style["marker"] in markers:
            style["marker"] = next((m for m in MARKERS if m not in markers | taken), style["marker"])
        markers.add(style["marker"])
        out[norm] = style
    colors = {s["color"] for s in out.values()}
    shades = {}
    for norm in ordered:
        if norm in out:
            continue
        style = dict(FAMILIES.get(family(norm), OTHER))
        base, k = style["color"], shades.get(family(norm), 0) + 1
        while shade(base, k) in colors and k < 6:  # six shades per family, then colours repeat
            k += 1
        shades[family(norm)] = k
        style["color"] = shade(base, k)
        style["marker"] = next((m for m in MARKERS if m not in markers), style["marker"])
        colors.add(style["color"])
        markers.add(style["marker"])
        out[norm] = style
    return {norm: out[norm] for norm in ordered}
