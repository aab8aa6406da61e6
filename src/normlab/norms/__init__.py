"""Normalization layers chosen by a spec string: the registry.

Specs (``base[:argument][:ablation][+ws]``):
  bn                 BatchNorm, statistics over each device's N images (batch.py)
  gn, gn:G, gn:cpg=K GroupNorm with 32 / G groups / K channels per group (group.py)
  ln, in             GN with one group / one channel per group, per-channel gamma and beta
  brn                Batch Renormalization with the paper's r_max / d_max ramp (batch.py)
  frn, frn:learned-eps  Filter Response Normalization + TLU (response.py)
  evonorm-s0, evonorm-s0:G  EvoNorm-S0 with 32 / G groups (evonorm.py)
  evonorm-b0         EvoNorm-B0 (evonorm.py)
  none, none:skipinit  no normalization: the affine alone, or SkipInit's scalar (ablation.py)
  ...:mean-only, ...:scale-only  bn, gn, ln and in reduced to centering or to scaling by the
                     RMS, e.g. bn:mean-only, gn:16:scale-only (ablation.py)
  ...+ws             any of the above but none with Weight Standardization in every conv
                     (standardize.py)
PreciseBN is an evaluation option of the run (precise.py, ``--precise-bn M``), not a spec.

Building: ``make_norm(spec, channels, act=True)`` is the norm with its nonlinearity, for use
after a conv (BN then ReLU, FRN then TLU, EvoNorm whole); ``act=False`` the norm alone, for
use before a residual addition. ``make_conv(spec, ...)`` is the conv to put before it (a
WS conv for +ws specs). A new norm is one entry in FAMILIES.

For reports: ``label(spec, precise_bn=0)`` is a human label for any spec ("BN", "GN G=16",
"GN+WS G=16", "LN", "BRN", "FRN+TLU", "EvoNorm-S0 G=8", "BN + PreciseBN", "BN mean-only",
"no norm"), and ``family(spec)`` its family: bn, gn, ln, in, brn, frn, evonorm-s0, evonorm-b0,
none or skipinit, with "-mean-only" or "-scale-only" for ablations ("gn-scale-only") and "+ws"
appended for WS specs. Group counts above a layer's channels are clamped to them; counts that
do not divide them are refused, naming the layer and the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import NormlabError
from .ablation import MODES, Affine2d, BatchAblation2d, GroupAblation2d, SkipInitScale
from .batch import BatchRenorm2d, ChunkedStatistics, GhostBatchNorm2d, RenormRamp
from .evonorm import EvoNormB0, EvoNormS0
from .group import EPS, GroupNorm, ReferenceGroupNorm, divisors, effective_groups, group_norm_reference
from .precise import precise_statistics, statistics_layers
from .response import FilterResponseNorm2d
from .standardize import WSConv2d

PAPER_DEFAULT_GROUPS = 32
SPEC_HELP = ("bn, gn, gn:G (G groups), gn:cpg=K (K channels per group), ln, in, brn, frn, "
             "frn:learned-eps, evonorm-s0, evonorm-s0:G, evonorm-b0, none, none:skipinit; "
             "bn, gn, ln, in with :mean-only or :scale-only (e.g. gn:16:scale-only); any but none +ws")


@dataclass(frozen=True)
class NormSpec:
    """A parsed spec. kind is a FAMILIES key; groups / per_group for grouped kinds (gn, evonorm-s0);
    mode an ablation (mean-only, scale-only) of bn or gn."""

    kind: str
    groups: int | None = None
    per_group: int | None = None
    ws: bool = False
    learned_eps: bool = False
    mode: str | None = None
    skipinit: bool = False

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
        return self.entry.channels_last and not self.mode

    def groups_for(self, channels: int, layer: str = "") -> int:
        """Effective group count for a layer of `channels` channels (clamped, checked)."""
        if self.groups is None and self.per_group is None:
            raise ValueError(f"{self.kind} has no groups")
        return effective_groups(self.canonical(), channels, self.groups, self.per_group, layer)

    def norm_canonical(self) -> str:
        """The spec without its ablation and +ws: bn, ln, gn:16, frn:learned-eps, none:skipinit."""
        if self.kind == "gn":
            if self.groups == 1:
                return "ln"
            if self.per_group == 1:
                return "in"
            return f"gn:cpg={self.per_group}" if self.per_group else f"gn:{self.groups}"
        if self.kind == "evonorm-s0":
            return f"evonorm-s0:{self.groups}"
        if self.skipinit:
            return "none:skipinit"
        return "frn:learned-eps" if self.learned_eps else self.kind

    def base_canonical(self) -> str:
        """The spec without +ws: bn:mean-only, gn:16:scale-only, ln, none."""
        return self.norm_canonical() + (f":{self.mode}" if self.mode else "")

    def canonical(self) -> str:
        return self.base_canonical() + ("+ws" if self.ws else "")

    def tag(self) -> str:
        """Short name for run ids: bn, ln, in, gn16, gncpg4, brn, frn, frnle, evos0g16, evob0,
        none, skipinit; ablations end in mean or scale (bnmean, gn16scale); +ws."""
        base = self.norm_canonical()
        if self.kind == "gn" and base not in ("ln", "in"):
            base = f"gncpg{self.per_group}" if self.per_group else f"gn{self.groups}"
        elif self.kind == "evonorm-s0":
            base = f"evos0g{self.groups}"
        else:
            base = {"frn:learned-eps": "frnle", "evonorm-b0": "evob0", "none:skipinit": "skipinit"}.get(base, base)
        return base + (self.mode.split("-")[0] if self.mode else "") + ("ws" if self.ws else "")

    def label(self) -> str:
        base = self.norm_canonical()
        name = {"ln": "LN", "in": "IN", "none:skipinit": "SkipInit (no norm)"}.get(base, self.entry.label)
        name += "+WS" if self.ws else ""
        if self.kind in ("gn", "evonorm-s0") and base not in ("ln", "in"):
            name += f" {self.per_group} ch/group" if self.per_group else f" G={self.groups}"
        return name + (" (learned eps)" if self.learned_eps else "") + (f" {self.mode}" if self.mode else "")

    def family_name(self) -> str:
        base = self.norm_canonical()
        name = base if base in ("ln", "in") else "skipinit" if self.skipinit else self.kind
        return name + (f"-{self.mode}" if self.mode else "") + ("+ws" if self.ws else "")


@dataclass(frozen=True)
class Family:
    label: str
    build: Callable[[NormSpec, int, bool, str], nn.Module]   # (spec, channels, act, layer)
    argument: str            # what may follow "kind:": "" (nothing), "groups", "learned-eps", "skipinit"
    batch_dependent: bool = False
    channels_last: bool = False
    ablations: bool = False  # takes :mean-only and :scale-only


def _gn(spec, channels, act, layer, reference=False):
    groups = spec.groups_for(channels, layer)
    if spec.mode:
        return GroupAblation2d(groups, channels, spec.mode, eps=EPS, act=act)
    cls = ReferenceGroupNorm if reference else GroupNorm
    return cls(groups, channels, eps=EPS, act=act)


def _bn(spec, channels, act, layer):
    if spec.mode:
        return BatchAblation2d(channels, spec.mode, eps=EPS, act=act)
    return GhostBatchNorm2d(channels, eps=EPS, act=act)


FAMILIES: dict[str, Family] = {
    "bn": Family("BN", _bn, "", batch_dependent=True, channels_last=True, ablations=True),
    "gn": Family("GN", _gn, "groups", ablations=True),
    "brn": Family("BRN", lambda s, c, act, layer: BatchRenorm2d(c, eps=EPS, act=act), "",
                  batch_dependent=True, channels_last=True),
    "frn": Family("FRN+TLU", lambda s, c, act, layer: FilterResponseNorm2d(c, act=act, learned_eps=s.learned_eps),
                  "learned-eps"),
    "evonorm-s0": Family("EvoNorm-S0", lambda s, c, act, layer: EvoNormS0(s.groups_for(c, layer), c, act=act),
                         "groups"),
    "evonorm-b0": Family("EvoNorm-B0", lambda s, c, act, layer: EvoNormB0(c, act=act), "", batch_dependent=True),
    "none": Family("no norm", lambda s, c, act, layer: Affine2d(c, act=act, affine=not s.skipinit), "skipinit"),
}
ALIASES = {"ln": NormSpec("gn", groups=1), "in": NormSpec("gn", per_group=1)}
NORM_MODULES = (nn.BatchNorm2d, nn.GroupNorm, BatchRenorm2d, FilterResponseNorm2d, EvoNormS0, EvoNormB0,
                BatchAblation2d, GroupAblation2d, Affine2d, SkipInitScale)
ABLATABLE = "bn, gn, ln and in"


def split_mode(spec: str, base: str) -> tuple[str, str | None]:
    """'gn:16:scale-only' -> ('gn:16', 'scale-only'); the ablation must come last, once."""
    head, colon, last = base.rpartition(":")
    mode = last if colon and last in MODES else None
    rest = head if mode else base
    if any(part in MODES for part in rest.split(":")):
        raise NormlabError(f"norm '{spec}' takes one ablation, at the end: mean-only or scale-only, "
                           f"e.g. bn:mean-only, gn:16:scale-only")
    return rest, mode


def parse_norm(spec: str) -> NormSpec:
    """Parse a spec string; 'ln' and 'in' become GN extremes (1 group; 1 channel per group)."""
    text = str(spec).strip().lower()
    base, ws = (text[:-3], True) if text.endswith("+ws") else (text, False)
    if "+" in base:
        raise NormlabError(f"unknown modifier in norm '{spec}'; the only modifier is +ws, e.g. gn:16+ws")
    base, mode = split_mode(spec, base)
    kind, colon, argument = base.partition(":")
    if kind not in FAMILIES and kind not in ALIASES:
        if ws:
            raise NormlabError(f"unknown norm '{base}' in '{spec}'; +ws modifies one of: {SPEC_HELP}")
        raise NormlabError(f"unknown norm '{spec}'; use one of: {SPEC_HELP}")
    family = FAMILIES[ALIASES[kind].kind if kind in ALIASES else kind]
    if mode and not family.ablations:
        raise NormlabError(f"norm '{spec}': {mode} applies to {ABLATABLE} only (e.g. bn:{mode}, "
                           f"gn:16:{mode}); use plain {base}, or one of those")
    if ws and kind == "none":
        raise NormlabError(f"norm '{spec}': WS without a norm after the conv multiplies the activations' "
                           f"scale by about the fan-in at every layer; use none, or a norm with +ws")
    takes = "" if kind in ALIASES else family.argument
    if colon and takes != "groups" and argument != takes:
        allowed = f"use {kind} or {kind}:{takes}" if takes else f"use plain {kind}"
        raise NormlabError(f"norm '{spec}' takes no such argument ('{argument}'); {allowed} "
                           f"(norms: {SPEC_HELP})")
    if kind in ALIASES:
        return NormSpec(ALIASES[kind].kind, ALIASES[kind].groups, ALIASES[kind].per_group, ws=ws, mode=mode)
    if takes == "learned-eps":
        return NormSpec(kind, ws=ws, learned_eps=bool(colon))
    if takes == "skipinit":
        return NormSpec(kind, skipinit=bool(colon))
    if takes != "groups":
        return NormSpec(kind, ws=ws, mode=mode)
    per_group = kind == "gn" and argument.startswith("cpg=")
    value = argument[4:] if per_group else argument
    if colon and not value.isdigit():
        raise NormlabError(f"norm '{spec}' needs a positive whole count after ':', e.g. {kind}:16; "
                           f"use one of: {SPEC_HELP}")
    count = int(value) if colon else PAPER_DEFAULT_GROUPS
    if count < 1:
        raise NormlabError(f"norm '{spec}' needs a positive count; use one of: {SPEC_HELP}")
    if per_group:
        return NormSpec(kind, per_group=count, ws=ws, mode=mode)
    return NormSpec(kind, groups=count, ws=ws, mode=mode)


def as_spec(spec: str | NormSpec) -> NormSpec:
    return spec if isinstance(spec, NormSpec) else parse_norm(spec)


def canonical_norm(spec: str) -> str:
    """One name per distinct layer: 'gn:1' and 'ln' are the same norm, so is 'gn:cpg=1' and 'in'."""
    return parse_norm(spec).canonical()


def label(spec: str | NormSpec, precise_bn: int = 0) -> str:
    """A human label for reports, e.g. 'GN+WS G=16', 'FRN+TLU', 'BN + PreciseBN', 'BN mean-only'."""
    return as_spec(spec).label() + (" + PreciseBN" if precise_bn else "")


def family(spec: str | NormSpec) -> str:
    """The family of a spec: bn, gn, ln, in, brn, frn, evonorm-s0, evonorm-b0, none, skipinit,
    ablations as bn-mean-only, gn-scale-only... (+ws)."""
    return as_spec(spec).family_name()


def make_norm(spec: str | NormSpec, num_channels: int, *, act: bool = False, layer: str = "",
              reference: bool = False, branch_end: bool = False) -> nn.Module:
    """A norm layer for `num_channels` channels, e.g. make_norm("gn:16", 64, act=True).

    act=True: the norm with its nonlinearity (ReLU, or FRN's TLU, or EvoNorm's own);
    act=False: the norm alone. reference=True: GN by the paper's reshape formula.
    branch_end=True: the last layer of a residual branch (where SkipInit puts its scalar).
    """
    parsed = as_spec(spec)
    if branch_end and parsed.skipinit:
        return SkipInitScale(num_channels)
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
        if isinstance(module, NORM_MODULES):
            layers[name] = {"channels": getattr(module, "num_channels", getattr(module, "num_features", None)),
                            "groups": getattr(module, "num_groups", None)}
    return layers


__all__ = ["NormSpec", "Family", "FAMILIES", "SPEC_HELP", "EPS", "parse_norm", "canonical_norm", "label",
           "family", "make_norm", "make_conv", "set_chunk_size", "renorm_layers", "norm_layers",
           "divisors", "group_norm_reference", "GhostBatchNorm2d", "GroupNorm", "ReferenceGroupNorm",
           "BatchRenorm2d", "RenormRamp", "FilterResponseNorm2d", "EvoNormS0", "EvoNormB0", "WSConv2d",
           "BatchAblation2d", "GroupAblation2d", "Affine2d", "SkipInitScale", "MODES",
           "precise_statistics", "statistics_layers", "NORM_MODULES"]
