"""Ablations: a norm reduced to one of its two operations, and no normalization at all.

Normalization centres (subtracts a mean) and scales (divides by a spread). The ablations keep
one of the two, over BN's statistics (per channel over each device's N images, with running
statistics for evaluation) or GN's (per sample over each group of C/G channels and H, W; LN and
IN as its extremes), and keep the per-channel gamma and beta:

  mean-only   y = gamma * (x - mu) + beta
  scale-only  y = gamma * x / sqrt(nu^2 + eps) + beta,  nu^2 = mean of x^2 (about 0, not the mean)

Mean-only BN is Salimans & Kingma's "mean-only batch normalization" (Weight Normalization,
NeurIPS 2016, section 3): the minibatch mean in training, its running average at test time.
Scale-only divides by the root mean square without centering, as the issue's ablation defines
it: RMSNorm (Zhang & Sennrich, NeurIPS 2019) over GN's groups, and over BN's batch the quadratic
mean of PowerNorm (Shen et al., ICML 2020) without PowerNorm's running statistics in the
training forward. (Lubana et al.'s "variance scaling only", from Daneshmand et al. 2020, divides
by the centred standard deviation instead; the RMS keeps scale-only free of any mean statistic.)
The batch forms keep running statistics like BN's (momentum 0.1, averaged over a step's device
chunks): the mean for mean-only, the second moment nu^2 for scale-only; eps = 1e-5 inside the
root, as GN's and BN's.

No normalization (`none`): every norm layer is the affine alone, y = gamma * x + beta (its
activation kept), so the network keeps every parameter of the normalized ones and the
zero-initialised gamma of each residual block's last layer (models.init_weights) still starts
every block as the identity, which keeps the unnormalized ResNet trainable (as Fixup's
zero-initialised last layer does). `none:skipinit` is SkipInit (De & Smith, NeurIPS 2020): no
norm layers at all, and a learned scalar alpha, 0 at initialization, at the end of each
residual branch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import ChunkedStatistics
from .group import EPS

MEAN_ONLY, SCALE_ONLY = "mean-only", "scale-only"
MODES = (MEAN_ONLY, SCALE_ONLY)


class Ablation(nn.Module):
    """Per-channel gamma and beta, ReLU after when act=True; subclasses define normalize()."""

    def __init__(self, num_channels: int, mode: str, eps: float = EPS, act: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.num_channels, self.mode, self.eps, self.act = num_channels, mode, eps, act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.affine(self.normalize(x.to(self.weight.dtype)))  # float32 under bf16 autocast
        return F.relu(out) if self.act else out


class BatchAblation2d(ChunkedStatistics, Ablation):
    """Mean-only or scale-only BN, statistics per channel over each chunk of `chunk_size`
    images (one device's N; None = the whole batch)."""

    def __init__(self, num_features: int, mode: str, eps: float = EPS, momentum: float = 0.1, act: bool = False):
        super().__init__(num_features, mode, eps, act)
        self.num_features, self.momentum = num_features, momentum
        if mode == MEAN_ONLY:
            self.register_buffer("running_mean", torch.zeros(num_features))
        else:
            self.register_buffer("running_sq_mean", torch.ones(num_features))

    @property
    def running(self) -> torch.Tensor:
        return self.running_mean if self.mode == MEAN_ONLY else self.running_sq_mean

    def extra_repr(self) -> str:
        return f"{self.num_features}, {self.mode}, eps={self.eps}, momentum={self.momentum}, act={self.act}"

    def chunk_moment(self, chunks: torch.Tensor) -> torch.Tensor:
        """Per chunk and channel [K, C]: the mean (mean-only) or the mean of x^2 (scale-only)."""
        return (chunks if self.mode == MEAN_ONLY else chunks * chunks).mean(dim=(1, 3, 4))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            chunks = self.chunk_view(x)                                     # [K, N, C, H, W]
            moment = self.chunk_moment(chunks)                              # with its gradient
            with torch.no_grad():
                self.running.lerp_(moment.detach().mean(0), self.momentum)
            moment = moment[:, None, :, None, None]
        else:
            chunks, moment = x.unsqueeze(0), self.running.view(1, 1, -1, 1, 1)
        out = chunks - moment if self.mode == MEAN_ONLY else chunks * torch.rsqrt(moment + self.eps)
        return out.reshape(x.shape)

    def set_population(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running.copy_(mean if self.mode == MEAN_ONLY else var + mean * mean)

    def batch_statistics(self, x: torch.Tensor):
        moment = self.chunk_moment(self.chunk_view(x))
        return (moment, None) if self.mode == MEAN_ONLY else (None, torch.sqrt(moment + self.eps))

    def population_statistics(self):
        if self.mode == MEAN_ONLY:
            return self.running_mean, None
        return None, torch.sqrt(self.running_sq_mean + self.eps)


class GroupAblation2d(Ablation):
    """Mean-only or scale-only GN: statistics per sample over each group of C/G channels and
    H, W (LN: one group; IN: one channel per group)."""

    def __init__(self, num_groups: int, num_channels: int, mode: str, eps: float = EPS, act: bool = False):
        super().__init__(num_channels, mode, eps, act)
        self.num_groups = num_groups

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, {self.mode}, eps={self.eps}, act={self.act}"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        if self.mode == MEAN_ONLY:
            out = grouped - grouped.mean(dim=-1, keepdim=True)
        else:
            out = grouped * torch.rsqrt((grouped * grouped).mean(dim=-1, keepdim=True) + self.eps)
        return out.reshape(x.shape)


class Affine2d(nn.Module):
    """No normalization: y = gamma * x + beta per channel (affine=True) or y = x, then ReLU
    when act=True."""

    def __init__(self, num_channels: int, act: bool = False, affine: bool = True):
        super().__init__()
        self.num_channels, self.act = num_channels, act
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, affine={self.weight is not None}, act={self.act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x = torch.addcmul(self.bias.view(1, -1, 1, 1).to(x.dtype), x, self.weight.view(1, -1, 1, 1).to(x.dtype))
        return F.relu(x) if self.act else x


class SkipInitScale(nn.Module):
    """SkipInit's learned scalar at the end of a residual branch: y = alpha * x, alpha = 0 at
    initialization (De & Smith 2020). Named `weight`, like a norm's gamma."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self.act = False
        self.weight = nn.Parameter(torch.zeros(()))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, alpha={float(self.weight):g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.to(x.dtype)


def mean_only_reference(x, running_mean, weight, bias, momentum: float = 0.1, training: bool = True):
    """Mean-only BN for one device batch, written out: returns (y, new running mean)."""
    shape = (1, -1, 1, 1)
    mu = x.mean(dim=(0, 2, 3)) if training else running_mean
    y = weight.view(shape) * (x - mu.view(shape)) + bias.view(shape)
    new = running_mean + momentum * (mu.detach() - running_mean) if training else running_mean
    return y, new


def scale_only_reference(x, running_sq_mean, weight, bias, eps: float = EPS, momentum: float = 0.1,
                         training: bool = True):
    """Scale-only BN for one device batch, written out: returns (y, new running second moment)."""
    shape = (1, -1, 1, 1)
    nu2 = (x ** 2).mean(dim=(0, 2, 3)) if training else running_sq_mean
    y = weight.view(shape) * x / torch.sqrt(nu2.view(shape) + eps) + bias.view(shape)
    new = running_sq_mean + momentum * (nu2.detach() - running_sq_mean) if training else running_sq_mean
    return y, new


def group_ablation_reference(x, groups: int, mode: str, weight, bias, eps: float = EPS):
    """Mean-only or scale-only GN, written out with an explicit loop over samples and groups."""
    out = torch.empty_like(x)
    per_group = x.shape[1] // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            block = x[n, g * per_group:(g + 1) * per_group]
            if mode == MEAN_ONLY:
                out[n, g * per_group:(g + 1) * per_group] = block - block.mean()
            else:
                out[n, g * per_group:(g + 1) * per_group] = block / torch.sqrt((block ** 2).mean() + eps)
    return weight.view(1, -1, 1, 1) * out + bias.view(1, -1, 1, 1)
