"""Group Normalization (Wu & He 2018) and its extremes LN (one group) and IN (one channel per group).

Statistics over (C/G, H, W) per sample and group, biased variance, eps = 1e-5 inside the square
root, per-channel gamma and beta. The fast path is the native ``F.group_norm``;
``group_norm_reference`` is the paper's six-line reshape formula, for tests and readers.
With ``act=True`` the layer is followed by its ReLU (the form used after a convolution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NormlabError

EPS = 1e-5


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def effective_groups(spec_text: str, channels: int, groups: int | None, per_group: int | None,
                     layer: str = "") -> int:
    """Group count for a layer of `channels` channels: clamped to the channels, and refused
    (naming the layer and the valid choices) when it does not divide them."""
    where = f" (layer {layer})" if layer else ""
    valid = ", ".join(str(d) for d in divisors(channels))
    if per_group is not None:
        per_group_here = min(per_group, channels)
        if channels % per_group_here:
            raise NormlabError(
                f"norm {spec_text} needs a channels-per-group count that divides the {channels} "
                f"channels of a layer{where}; choose cpg from: {valid}")
        return channels // per_group_here
    groups_here = min(groups, channels)
    if channels % groups_here:
        raise NormlabError(
            f"norm {spec_text} needs a group count that divides the {channels} channels of a "
            f"layer{where}; choose G from: {valid}")
    return groups_here


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


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, optionally followed by ReLU (act=True). Same parameters and state dict."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = EPS, act: bool = False):
        super().__init__(num_groups, num_channels, eps=eps)
        self.act = act

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        return F.relu(out) if self.act else out


class ReferenceGroupNorm(GroupNorm):
    """GN computed by the paper's reshape formula: slower, for benchmarks and readers."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_reference(x, self.num_groups, self.weight, self.bias, self.eps)
