"""Normalization layers chosen by a spec string: the registry.

Specs (``base[:argument][+ws]``):
  bn                 BatchNorm, statistics over each device's N images (batch.py)
  gn, gn:G, gn:cpg=K GroupNorm with 32 / G groups / K channels per group (group.py)
  ln, in             GN with one group / one channel per group, per-channel gamma and beta
  brn                Batch Renormalization with the paper's r_max / d_max ramp (batch.py)
  frn, frn:learned-eps  Filter Response Normalization + TLU (response.py)
  evonorm-s0, evonorm-s0:G  EvoNorm-S0 with 32 / G groups (evonorm.py)
  evonorm-b0         EvoNorm-B0 (evonorm.py)
  ...+ws             any of the above with Weight Standardization in every conv (standardize.py)
PreciseBN is an evaluation option of the run (precise.py, ``--precise-bn M``), not a spec.

Building: ``make_norm(spec, channels, act=True)`` is the norm with its nonlinearity, for use
after a conv (BN then ReLU, FRN then TLU, EvoNorm whole); ``act=False`` the norm alone, for
use before a residual addition. ``make_conv(spec, ...)`` is the conv to put before it (a
WS conv for +ws specs). A new norm is one entry in FAMILIES.

For reports: ``label(spec, precise_bn=0)`` is a human label for any spec ("BN", "GN G=16",
"GN+WS G=16", "LN", "BRN", "FRN+TLU", "EvoNorm-S0 G=8", "BN + PreciseBN"), and
``family(spec)`` its family: bn, gn, ln, in, brn, frn, evonorm-s0 or evonorm-b0, with "+ws"
appended for WS specs. Group counts above a layer's channels are clamped to them; counts that
do not divide them are refused, naming the layer and the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import NormlabError
from .batch import BatchRenorm2d, ChunkedStatistics, GhostBatchNorm2d, RenormRamp
from .evonorm import EvoNormB0, EvoNormS0
from .group import EPS, GroupNorm, ReferenceGroupNorm, divisors, effective_groups, group_norm_reference
from .precise import precise_statistics, statistics_layers
from .response import FilterResponseNorm2d
from .standardize import WSConv2d

PAPER_DEFAULT_GROUPS = 32
SPEC_HELP = ("bn, gn, gn:G (G groups), gn:cpg=K (K channels per group), ln, in, brn, frn, "
             "frn:learned-eps, evonorm-s0, evonorm-s0:G, evonorm-b0; any of them +ws")


@dataclass(frozen=True)
class NormSpec:
    """A parsed spec. kind is a FAMILIES key; groups / per_group for grouped kinds (gn, evonorm-s0)."""

    kind: str
    groups: int | None = None
    per_group: int | None = None
    ws: bool = False
    learned_eps: bool = False

    @property
    def entry(self) -> "Family":
        return FAMILIES[self.kind]

    @property
    def batch_dependent(self) -> bool:
        return self.entry.batch_dependent

    @property
    def has_running_stats(self) -> bool:
        return self.entry.batch_dependent  # BN, BRN and EvoNorm-B0 keep running statistics

    @property
    def channels_last(self) -> bool:
        """Whether the layer's kernels run faster in channels_last (see benchmarks/)."""
        return self.entry.channels_last

    def groups_for(self, channels: int, layer: str = "") -> int:
        """Effective group count for a layer of `channels` channels (clamped, checked)."""
        if self.groups is None and self.per_group is None:
            raise ValueError(f"{self.kind} has no groups")
        return effective_groups(self.canonical(), channels, self.groups, self.per_group, layer)

    def base_canonical(self) -> str:
        if self.kind == "gn":
            if self.groups == 1:
                return "ln"
            if self.per_group == 1:
                return "in"
            return f"gn:cpg={self.per_group}" if self.per_group else f"gn:{self.groups}"
        if self.kind == "evonorm-s0":
            return f"evonorm-s0:{self.groups}"
        return "frn:learned-eps" if self.learned_eps else self.kind

    def canonical(self) -> str:
        return self.base_canonical() + ("+ws" if self.ws else "")

    def tag(self) -> str:
        """Short name for run ids: bn, ln, in, gn16, gncpg4, brn, frn, frnle, evos0g16, evob0; +ws."""
        base = self.base_canonical()
        if self.kind == "gn" and base not in ("ln", "in"):
            base = f"gncpg{self.per_group}" if self.per_group else f"gn{self.groups}"
        elif self.kind == "evonorm-s0":
            base = f"evos0g{self.groups}"
        else:
            base = {"frn:learned-eps": "frnle", "evonorm-b0": "evob0"}.get(base, base)
        return base + ("ws" if self.ws else "")

    def label(self) -> str:
        base = self.base_canonical()
        name = {"ln": "LN", "in": "IN"}.get(base, self.entry.label)
        name += "+WS" if self.ws else ""
        if self.kind in ("gn", "evonorm-s0") and base not in ("ln", "in"):
            name += f" {self.per_group} ch/group" if self.per_group else f" G={self.groups}"
        return name + (" (learned eps)" if self.learned_eps else "")

    def family_name(self) -> str:
        base = self.base_canonical()
        return (base if base in ("ln", "in") else self.kind) + ("+ws" if self.ws else "")


@dataclass(frozen=True)
class Family:
    label: str
    build: Callable[[NormSpec, int, bool, str], nn.Module]   # (spec, channels, act, layer)
    argument: str            # what may follow "kind:": "" (nothing), "groups", "learned-eps"
    batch_dependent: bool = False
    channels_last: bool = False


def _gn(spec, channels, act, layer, reference=False):
    cls = ReferenceGroupNorm if reference else GroupNorm
    return cls(spec.groups_for(channels, layer), channels, eps=EPS, act=act)


FAMILIES: dict[str, Family] = {
    "bn": Family("BN", lambda s, c, act, layer: GhostBatchNorm2d(c, eps=EPS, act=act), "",
                 batch_dependent=True, channels_last=True),
    "gn": Family("GN", _gn, "groups"),
    "brn": Family("BRN", lambda s, c, act, layer: BatchRenorm2d(c, eps=EPS, act=act), "",
                  batch_dependent=True, channels_last=True),
    "frn": Family("FRN+TLU", lambda s, c, act, layer: FilterResponseNorm2d(c, act=act, learned_eps=s.learned_eps),
                  "learned-eps"),
    "evonorm-s0": Family("EvoNorm-S0", lambda s, c, act, layer: EvoNormS0(s.groups_for(c, layer), c, act=act),
                         "groups"),
    "evonorm-b0": Family("EvoNorm-B0", lambda s, c, act, layer: EvoNormB0(c, act=act), "", batch_dependent=True),
}
ALIASES = {"ln": NormSpec("gn", groups=1), "in": NormSpec("gn", per_group=1)}
NORM_MODULES = (nn.BatchNorm2d, nn.GroupNorm, BatchRenorm2d, FilterResponseNorm2d, EvoNormS0, EvoNormB0)


def parse_norm(spec: str) -> NormSpec:
    """Parse a spec string; 'ln' and 'in' become GN extremes (1 group; 1 channel per group)."""
    text = str(spec).strip().lower()
    base, ws = (text[:-3], True) if text.endswith("+ws") else (text, False)
    kind, colon, argument = base.partition(":")
    if "+" in base:
        raise NormlabError(f"unknown modifier in norm '{spec}'; the only modifier is +ws, e.g. gn:16+ws")
    if kind not in FAMILIES and kind not in ALIASES:
        if ws:
            raise NormlabError(f"unknown norm '{base}' in '{spec}'; +ws modifies one of: {SPEC_HELP}")
        raise NormlabError(f"unknown norm '{spec}'; use one of: {SPEC_HELP}")
    takes = "" if kind in ALIASES else FAMILIES[kind].argument
    if colon and takes != "groups" and argument != takes:
        allowed = f"use {kind} or {kind}:{takes}" if takes else f"use plain {kind}"
        raise NormlabError(f"norm '{spec}' takes no such argument ('{argument}'); {allowed} "
                           f"(norms: {SPEC_HELP})")
    if kind in ALIASES:
        return NormSpec(ALIASES[kind].kind, ALIASES[kind].groups, ALIASES[kind].per_group, ws=ws)
    if takes == "learned-eps":
        return NormSpec(kind, ws=ws, learned_eps=bool(colon))
    if takes != "groups":
        return NormSpec(kind, ws=ws)
    per_group = kind == "gn" and argument.startswith("cpg=")
    value = argument[4:] if per_group else argument
    if colon and not value.isdigit():
        raise NormlabError(f"norm '{spec}' needs a positive whole count after ':', e.g. {kind}:16; "
                           f"use one of: {SPEC_HELP}")
    count = int(value) if colon else PAPER_DEFAULT_GROUPS
    if count < 1:
        raise NormlabError(f"norm '{spec}' needs a positive count; use one of: {SPEC_HELP}")
    return NormSpec(kind, per_group=count, ws=ws) if per_group else NormSpec(kind, groups=count, ws=ws)


def as_spec(spec: str | NormSpec) -> NormSpec:
    return spec if isinstance(spec, NormSpec) else parse_norm(spec)


def canonical_norm(spec: str) -> str:
    """One name per distinct layer: 'gn:1' and 'ln' are the same norm, so is 'gn:cpg=1' and 'in'."""
    return parse_norm(spec).canonical()


def label(spec: str | NormSpec, precise_bn: int = 0) -> str:
    """A human label for reports, e.g. 'GN+WS G=16', 'FRN+TLU', 'BN + PreciseBN'."""
    return as_spec(spec).label() + (" + PreciseBN" if precise_bn else "")


def family(spec: str | NormSpec) -> str:
    """The family of a spec: bn, gn, ln, in, brn, frn, evonorm-s0, evonorm-b0 (+ws)."""
    return as_spec(spec).family_name()


def make_norm(spec: str | NormSpec, num_channels: int, *, act: bool = False, layer: str = "",
              reference: bool = False) -> nn.Module:
    """A norm layer for `num_channels` channels, e.g. make_norm("gn:16", 64, act=True).

    act=True: the norm with its nonlinearity (ReLU, or FRN's TLU, or EvoNorm's own);
    act=False: the norm alone. reference=True: GN by the paper's reshape formula.
    """
    parsed = as_spec(spec)
    if reference and parsed.kind == "gn":
        return _gn(parsed, num_channels, act, layer, reference=True)
    return parsed.entry.build(parsed, num_channels, act, layer)


def make_conv(spec: str | NormSpec, in_channels: int, out_channels: int, kernel_size: int,
              stride: int = 1, padding: int = 0) -> nn.Conv2d:
    """The bias-free conv before a norm: Weight-Standardized for +ws specs."""
    cls = WSConv2d if as_spec(spec).ws else nn.Conv2d
    return cls(in_channels, out_channels, kernel_size, stride, padding, bias=False)


def set_chunk_size(model: nn.Module, chunk_size: int | None) -> None:
    """Make every batch-dependent norm in `model` take its statistics over chunks of
    `chunk_size` images (virtual GPUs); None = over the whole batch."""
    for module in model.modules():
        if isinstance(module, ChunkedStatistics):
            module.chunk_size = chunk_size


def renorm_layers(model: nn.Module) -> list[BatchRenorm2d]:
    return [m for m in model.modules() if isinstance(m, BatchRenorm2d)]


def norm_layers(model: nn.Module) -> dict[str, dict]:
    """Each norm layer's name, channel count and effective group count (None if ungrouped)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            layers[name] = {"channels": module.num_channels, "groups": module.num_groups}
        elif isinstance(module, EvoNormS0):
            layers[name] = {"channels": module.num_channels, "groups": module.num_groups}
        elif isinstance(module, nn.BatchNorm2d):
            layers[name] = {"channels": module.num_features, "groups": None}
        elif isinstance(module, NORM_MODULES):
            layers[name] = {"channels": getattr(module, "num_channels", getattr(module, "num_features", None)),
                            "groups": None}
    return layers


__all__ = ["NormSpec", "Family", "FAMILIES", "SPEC_HELP", "EPS", "parse_norm", "canonical_norm", "label",
           "family", "make_norm", "make_conv", "set_chunk_size", "renorm_layers", "norm_layers",
           "divisors", "group_norm_reference", "GhostBatchNorm2d", "GroupNorm", "ReferenceGroupNorm",
           "BatchRenorm2d", "RenormRamp", "FilterResponseNorm2d", "EvoNormS0", "EvoNormB0", "WSConv2d",
           "precise_statistics", "statistics_layers", "NORM_MODULES"]
