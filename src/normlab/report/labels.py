"""How the report names, orders and draws each norm: the one place for families and labels.

A family is what a reader compares (BN, LN, IN, GN); every GN variant (gn:G, gn:cpg=K) is
one family, told apart by label and marker. A new norm family gets one entry in FAMILIES
(display name, colour, marker, line style) and, if its spec is not BN/GN-shaped, a case in
`family` and `label`.
"""
from __future__ import annotations

from ..errors import NormlabError
from ..norms import parse_norm

# family -> display name and style; colours from the Okabe-Ito palette, readable in grey too.
# The order of this mapping is the order of rows and legends.
FAMILIES = {
    "bn": {"name": "BN", "color": "#000000", "marker": "o", "linestyle": "-"},
    "ln": {"name": "LN", "color": "#0072B2", "marker": "^", "linestyle": "-."},
    "in": {"name": "IN", "color": "#009E73", "marker": "D", "linestyle": ":"},
    "gn": {"name": "GN", "color": "#D55E00", "marker": "s", "linestyle": "--"},
}
OTHER = {"name": "other", "color": "#7F7F7F", "marker": "x", "linestyle": "-"}
GN_MARKERS = "sPXv<>*"


def family(norm: str) -> str:
    """'bn', 'ln', 'in' or 'gn' for a canonical norm spec."""
    if norm in ("bn", "ln", "in"):
        return norm
    try:
        return "gn" if parse_norm(norm).kind == "gn" else norm
    except NormlabError:  # a spec this version cannot parse still gets a row, in grey
        return norm


def label(norm: str) -> str:
    """'BN', 'GN G=16', 'GN 4 ch/group'."""
    fam = family(norm)
    if fam in ("bn", "ln", "in"):
        return FAMILIES[fam]["name"]
    if fam != "gn":
        return norm
    spec = parse_norm(norm)
    return f"GN {spec.per_group} ch/group" if spec.per_group else f"GN G={spec.groups}"


def sort_key(norm: str) -> tuple:
    """Families in FAMILIES order; GN by channels per group, then by group count."""
    fam = family(norm)
    order = list(FAMILIES).index(fam) if fam in FAMILIES else len(FAMILIES)
    groups = per_group = 0
    if fam == "gn":
        spec = parse_norm(norm)
        groups, per_group = spec.groups or 0, spec.per_group or 0
    return (order, per_group, groups, norm)


def sweep_value(norm: str, key: str) -> int | None:
    """G (key 'groups') or channels per group (key 'per_group') of a group-type norm, else None.
    LN is G = 1 and IN is 1 channel per group, as in the GN paper's Table 3."""
    if family(norm) not in ("ln", "in", "gn"):
        return None
    return getattr(parse_norm(norm), key)


def styles(norms) -> dict[str, dict]:
    """Norm -> matplotlib style: by family; several GN variants in one figure differ by marker."""
    out, gn_index = {}, 0
    for norm in sorted(set(norms), key=sort_key):
        style = FAMILIES.get(family(norm), OTHER)
        out[norm] = {k: v for k, v in style.items() if k != "name"}
        if family(norm) == "gn":
            out[norm]["marker"] = GN_MARKERS[gn_index % len(GN_MARKERS)]
            gn_index += 1
    return out
