"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2), with any norm from the registry.

Three stages of n BasicBlocks with 16/32/64 channels on 32/16/8 maps. Shortcut option A
(stride-2 subsampling and zero-padded channels, no parameters) as in the paper; option B
(1x1 projection + norm) as a choice. Every conv, norm and the activation after a norm come from
the registry (norms/): "norm + act" after a conv, "norm alone" before the residual addition,
then ReLU after the addition for every norm (as EvoNorm's reference ResNet does).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NormlabError
from .norms import NORM_MODULES, NormSpec, make_conv, make_norm, parse_norm

STAGE_WIDTHS = (16, 32, 64)
KNOWN_DEPTHS = (20, 32, 44, 56, 110, 1202)
MAX_DEPTH = 1202  # He et al.'s deepest; deeper ones are refused before anything is built


class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the new channels on both sides."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormSpec,
                 shortcut: str, name: str):
        super().__init__()
        self.conv1 = make_conv(norm, in_planes, planes, 3, stride, 1)
        self.norm1 = make_norm(norm, planes, act=True, layer=f"{name}.norm1")
        self.conv2 = make_conv(norm, planes, planes, 3, 1, 1)
        self.norm2 = make_norm(norm, planes, layer=f"{name}.norm2", branch_end=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    make_conv(norm, in_planes, planes, 1, stride),
                    make_norm(norm, planes, layer=f"{name}.shortcut.1"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, norm: NormSpec, num_classes: int, shortcut: str):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = make_conv(norm, 3, STAGE_WIDTHS[0], 3, 1, 1)
        self.norm1 = make_norm(norm, STAGE_WIDTHS[0], act=True, layer="norm1")
        stages, in_planes = [], STAGE_WIDTHS[0]
        for s, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, norm, shortcut,
                                         name=f"layer{s + 1}.{b}"))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv1(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def init_weights(model: nn.Module, zero_init_residual: bool = True) -> None:
    """He (fan_out) init for convs, gamma = 1 / beta = 0 for norms (and each norm's own init of
    its other parameters: EvoNorm's v = 1, TLU's tau = 0, SkipInit's alpha = 0), and gamma = 0
    in the last norm of every residual block so that each block starts as the identity (GN
    paper; with `none`, the zero-initialised last layer that keeps the unnormalized net trainable)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, NORM_MODULES):
            module.reset_parameters()
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.norm2.weight)


def parse_model(name: str) -> int:
    """'resnet56' -> 56, refusing depths that are not 6n+2."""
    match = re.fullmatch(r"resnet(\d{1,9})", str(name).strip().lower()[:100])
    depth = int(match.group(1)) if match else 0
    if depth > MAX_DEPTH:
        raise NormlabError(f"model '{name}' is deeper than any normlab builds (at most resnet{MAX_DEPTH}, "
                           f"He et al.'s deepest); use a smaller depth")
    if depth < 8 or (depth - 2) % 6:
        raise NormlabError(
            f"unknown model '{str(name)[:60]}'; use resnetD with D = 6n+2, e.g. "
            + ", ".join(f"resnet{d}" for d in KNOWN_DEPTHS))
    return depth


def check_norm_fits(norm: str | NormSpec) -> None:
    """Refuse, before anything is built, a group setting that some stage width cannot take."""
    spec = norm if isinstance(norm, NormSpec) else parse_norm(norm)
    if spec.groups is not None or spec.per_group is not None:
        for layer, width in zip(("norm1", "layer2.0.norm1", "layer3.0.norm1"), STAGE_WIDTHS):
            spec.groups_for(width, layer)


def cifar_resnet(depth: int | str, norm: str | NormSpec = "bn", num_classes: int = 10,
                 shortcut: str = "A", zero_init_residual: bool = True) -> CifarResNet:
    """A CIFAR ResNet, e.g. cifar_resnet(56, norm="gn:16"); depth may be 56 or 'resnet56'."""
    depth = parse_model(depth if isinstance(depth, str) else f"resnet{depth}")
    shortcut = str(shortcut).upper()
    if shortcut not in ("A", "B"):
        raise NormlabError(f"unknown shortcut '{shortcut}'; use A (zero-padding) or B (projection)")
    if num_classes < 1:
        raise NormlabError(f"num_classes must be positive, got {num_classes}")
    spec = norm if isinstance(norm, NormSpec) else parse_norm(norm)
    model = CifarResNet(depth, spec, num_classes, shortcut)
    init_weights(model, zero_init_residual)
    return model
