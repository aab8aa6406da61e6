"""Normalization layers chosen by a spec string.

Specs: ``bn``; ``gn`` (the paper's default, 32 groups); ``gn:G`` (G groups);
``gn:cpg=K`` (K channels per group); ``ln`` (GN with one group); ``in`` (GN with one
group per channel). Every layer has per-channel gamma and beta, as in the GN paper.

``make_norm(spec, num_channels)`` is the single entry point. The GN fast path is
``F.group_norm``; ``group_norm_reference`` is the paper's formula, for tests and readers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NormlabError

EPS = 1e-5
PAPER_DEFAULT_GROUPS = 32
SPEC_HELP = "bn, gn, gn:G (G groups), gn:cpg=K (K channels per group), ln, in"


@dataclass(frozen=True)
class NormSpec:
    """A parsed spec. kind is 'bn' or 'gn'; for gn exactly one of groups / per_group is set."""

    kind: str
    groups: int | None = None
    per_group: int | None = None

    @property
    def batch_dependent(self) -> bool:
        return self.kind == "bn"

    def groups_for(self, channels: int, layer: str = "") -> int:
        """Effective group count for a layer of `channels` channels (clamped, checked)."""
        if self.kind != "gn":
            raise ValueError("only group-type norms have groups")
        where = f" (layer {layer})" if layer else ""
        valid = ", ".join(str(d) for d in divisors(channels))
        if self.per_group is not None:
            per_group = min(self.per_group, channels)
            if channels % per_group:
                raise NormlabError(
                    f"norm gn:cpg={self.per_group} needs a channels-per-group count that divides "
                    f"the {channels} channels of a layer{where}; choose cpg from: {valid}")
            return channels // per_group
        groups = min(self.groups, channels)
        if channels % groups:
            raise NormlabError(
                f"norm gn:{self.groups} needs a group count that divides the {channels} channels "
                f"of a layer{where}; choose G from: {valid}")
        return groups

    def tag(self) -> str:
        """Short name for run ids: bn, ln, in, gn16, gncpg4."""
        if self.kind == "bn":
            return "bn"
        if self.groups == 1 or self.per_group == 1:
            return "ln" if self.groups == 1 else "in"
        return f"gncpg{self.per_group}" if self.per_group is not None else f"gn{self.groups}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_SPEC = re.compile(r"^(bn|ln|in|gn)(?::(?:(\d+)|cpg=(\d+)))?$")


def parse_norm(spec: str) -> NormSpec:
    """Parse a spec string; 'ln' and 'in' become GN extremes (1 group; 1 channel per group)."""
    text = str(spec).strip().lower()
    match = _SPEC.match(text)
    if not match:
        raise NormlabError(f"unknown norm '{spec}'; use one of: {SPEC_HELP}")
    kind, groups, per_group = match.groups()
    if kind in ("bn", "ln", "in") and (groups or per_group):
        raise NormlabError(f"norm '{spec}' takes no argument; use one of: {SPEC_HELP}")
    if kind == "bn":
        return NormSpec("bn")
    if kind == "ln":
        return NormSpec("gn", groups=1)
    if kind == "in":
        return NormSpec("gn", per_group=1)
    value = int(groups or per_group or PAPER_DEFAULT_GROUPS)
    if value < 1:
        raise NormlabError(f"norm '{spec}' needs a positive count; use one of: {SPEC_HELP}")
    return NormSpec("gn", per_group=value) if per_group else NormSpec("gn", groups=value)


def canonical_norm(spec: str) -> str:
    """One name per distinct layer: 'gn:1' and 'ln' are the same norm, so is 'gn:cpg=1' and 'in'."""
    parsed = parse_norm(spec)
    if parsed.kind == "bn":
        return "bn"
    if parsed.groups == 1:
        return "ln"
    if parsed.per_group == 1:
        return "in"
    return f"gn:cpg={parsed.per_group}" if parsed.per_group else f"gn:{parsed.groups}"


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over each chunk of `chunk_size` images.

    With chunk_size = N and a batch of K*N images this is exactly K devices of N images each
    with unsynchronized BN (the GN paper's setting) run on one device. Running statistics are
    updated with the average of the chunks' statistics. chunk_size None = ordinary BN.
    """

    chunk_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.chunk_size
        if not self.training or n is None or x.shape[0] <= n:
            return super().forward(x)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} is not a multiple of the chunk size {n}")
        # Native BN on each chunk (a view: memory format kept, fast kernels). Each chunk updates
        # its own copy of the running statistics; their mean is the averaged update.
        chunks = x.split(n)
        means = [self.running_mean.clone() for _ in chunks]
        variances = [self.running_var.clone() for _ in chunks]
        out = torch.cat([F.batch_norm(chunk, m, v, self.weight, self.bias, True, self.momentum, self.eps)
                         for chunk, m, v in zip(chunks, means, variances)])
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return out


def group_norm_reference(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, eps: float = EPS) -> torch.Tensor:
    """The GN paper's formula: moments over (C/G, H, W) per sample and group, biased variance."""
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = grouped.var(dim=-1, unbiased=False, keepdim=True)
    out = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


class ReferenceGroupNorm(nn.GroupNorm):
    """GN computed by the paper's reshape formula: slower, for benchmarks and readers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_reference(x, self.num_groups, self.weight, self.bias, self.eps)


def make_norm(spec: str | NormSpec, num_channels: int, *, layer: str = "",
              reference: bool = False) -> nn.Module:
    """A norm layer for `num_channels` channels from a spec string, e.g. make_norm("gn:16", 64).

    Group counts above the channel count are clamped to it; counts that do not divide the
    channels raise NormlabError naming the layer and the valid choices.
    """
    parsed = spec if isinstance(spec, NormSpec) else parse_norm(spec)
    if parsed.kind == "bn":
        return GhostBatchNorm2d(num_channels, eps=EPS)
    groups = parsed.groups_for(num_channels, layer)
    cls = ReferenceGroupNorm if reference else nn.GroupNorm
    return cls(groups, num_channels, eps=EPS)


def set_chunk_size(model: nn.Module, chunk_size: int | None) -> None:
    """Make every BN in `model` normalize over chunks of `chunk_size` images (virtual GPUs)."""
    for module in model.modules():
        if isinstance(module, GhostBatchNorm2d):
            module.chunk_size = chunk_size


def norm_layers(model: nn.Module) -> dict[str, dict]:
    """Each norm layer's name, channel count and effective group count (None for BN)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            layers[name] = {"channels": module.num_channels, "groups": module.num_groups}
        elif isinstance(module, nn.BatchNorm2d):
            layers[name] = {"channels": module.num_features, "groups": None}
    return layers
