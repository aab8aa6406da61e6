"""The candidates of a group search: every distinct GN grouping that a CIFAR ResNet's widths allow.

A grouping is identified by the effective group count of each stage (a group count above a
stage's width is clamped to it, see norms.py), so two specs that build identical layers are
one candidate: gn:64 and gn:cpg=1 are both IN (16/32/64 groups), gn:cpg=64 is LN.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NormlabError
from ..models import STAGE_WIDTHS
from ..norms import canonical_norm, parse_norm

# Always trained to the end with every seed: the winner's margin over each is reported.
BASELINES = ("gn:16", "ln", "in")


@dataclass(frozen=True)
class Candidate:
    spec: str                   # canonical norm spec: ln, in, gn:G or gn:cpg=K
    groups: tuple[int, ...]     # effective groups of each stage (16/32/64 channels)

    @property
    def label(self) -> str:
        """'gn:cpg=4 (4/8/16 groups)'."""
        return f"{self.spec} ({'/'.join(map(str, self.groups))} groups)"


def effective_groups(spec: str, widths: tuple[int, ...] = STAGE_WIDTHS) -> tuple[int, ...]:
    """Groups per stage for a group-type spec; NormlabError naming the fix for any other."""
    parsed = parse_norm(spec)
    if parsed.kind != "gn":
        raise NormlabError(f"search-groups compares groupings of GroupNorm; '{spec}' has no groups: "
                           f"use ln, in, gn:G or gn:cpg=K")
    return tuple(parsed.groups_for(w) for w in widths)


def all_candidates(widths: tuple[int, ...] = STAGE_WIDTHS) -> list[Candidate]:
    """Every valid group count G and channels-per-group K, one per distinct set of layers,
    from the fewest groups (LN) to the most (IN). Simpler names win: ln, in, gn:G, gn:cpg=K."""
    top = max(widths)
    specs = ["ln", "in"] + [f"gn:{g}" for g in range(2, top + 1)] + \
            [f"gn:cpg={k}" for k in range(2, top + 1)]
    found: dict[tuple[int, ...], str] = {}
    for spec in specs:
        try:
            groups = effective_groups(spec, widths)
        except NormlabError:
            continue  # does not divide some width
        found.setdefault(groups, spec)
    return sorted((Candidate(spec, groups) for groups, spec in found.items()), key=lambda c: c.groups)


def parse_candidates(text: str | None, widths: tuple[int, ...] = STAGE_WIDTHS) -> list[Candidate]:
    """--candidates 'ln,gn:4,gn:16' (default: all), checked and de-duplicated by their layers."""
    every = all_candidates(widths)
    if text is None:
        return every
    by_groups = {c.groups: c for c in every}
    chosen: dict[tuple[int, ...], Candidate] = {}
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        groups = effective_groups(canonical_norm(spec), widths)
        chosen.setdefault(groups, by_groups[groups])
    if len(chosen) < 2:
        names = ", ".join(c.label for c in chosen.values()) or "none"
        raise NormlabError(f"--candidates gives {len(chosen)} distinct grouping(s) ({names}); a search "
                           f"needs at least two: name more, or leave out --candidates to search all "
                           f"{len(every)}")
    return sorted(chosen.values(), key=lambda c: c.groups)


def baselines(candidates: list[Candidate]) -> list[Candidate]:
    """The baselines (G = 16, LN, IN) among the candidates."""
    return [c for name in BASELINES for c in candidates if c.groups == effective_groups(name)]
