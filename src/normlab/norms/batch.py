"""Batch-dependent norms: BN with per-device chunks (ghost BN) and Batch Renormalization.

Both take their training statistics over each chunk of `chunk_size` images (the N images one
device normalizes; None = the whole batch), so that K virtual devices of N images in one step
are exactly K devices with unsynchronized statistics. Running statistics are registered float
buffers updated with the average of the chunks' updates; every update here is linear in the
chunk statistics (running <- running + momentum * (mean over chunks - running)), so averaging
the buffers of K processes gives the same numbers as K chunks in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .group import EPS


class ChunkedStatistics:
    """Mixin of the norms whose training statistics are over each device's N images.

    Subclasses keep running statistics and implement set_population(mean, var) for PreciseBN:
    `mean` and `var` are the pooled per-channel mean and biased variance of the layer's input.
    For the probes (probes.py) they say what they normalize by: batch_statistics(x) gives, per
    chunk and channel [K, C], the centre and the scale (the divisor, eps included) that the
    training forward takes from a batch x, population_statistics() those that evaluation uses
    [C]; None for an operation the layer does not do (EvoNorm-B0 and scale-only BN do not centre).
    """

    chunk_size: int | None = None

    def chunk_view(self, x: torch.Tensor) -> torch.Tensor:
        """x [K*N, C, H, W] as [K, N, C, H, W] (a view; any memory format), K = 1 without chunks."""
        n = self.chunk_size
        if n is None or x.shape[0] <= n:
            return x.unsqueeze(0)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} is not a multiple of the chunk size {n}")
        return x.view(x.shape[0] // n, n, *x.shape[1:])

    def set_population(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        raise NotImplementedError

    def batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def population_statistics(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def chunk_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per chunk and channel [K, C]: the mean and sqrt(biased variance + eps)."""
        var, mean = torch.var_mean(self.chunk_view(x), dim=(1, 3, 4), unbiased=False)
        return mean, torch.sqrt(var + self.eps)


class GhostBatchNorm2d(ChunkedStatistics, nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over each chunk of `chunk_size` images,
    optionally followed by ReLU (act=True).

    With chunk_size = N and a batch of K*N images this is exactly K devices of N images each
    with unsynchronized BN (the GN paper's setting) run on one device. Running statistics are
    updated with the average of the chunks' statistics. chunk_size None = ordinary BN.
    """

    def __init__(self, num_features: int, eps: float = EPS, act: bool = False):
        super().__init__(num_features, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        return F.relu(out) if self.act else out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
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

    def set_population(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)

    def batch_statistics(self, x: torch.Tensor):
        return self.chunk_moments(x)

    def population_statistics(self):
        return self.running_mean, torch.sqrt(self.running_var + self.eps)


# -- Batch Renormalization ---------------------------------------------------------------------
# The paper's schedule (Inception-v3, 50 workers x 32 images): r_max = 1, d_max = 0 for the
# first 5k steps, then relaxed until r_max = 3 at 40k steps and d_max = 5 at 25k steps. As
# fractions of a run we take the paper's step counts over 130k steps, the length at which it
# compares its runs: 5/130 = 0.038, 40/130 = 0.31, 25/130 = 0.19 of the run's total steps.
PAPER_RENORM_STEPS = 130_000


@dataclass(frozen=True)
class RenormRamp:
    """r_max and d_max over a run: 1 and 0 until `start` (a fraction of the run's steps), then
    rising linearly to `r_max` at `r_end` and to `d_max` at `d_end` (the paper says only
    "gradually relaxed"; linear is what public implementations do)."""

    r_max: float = 3.0
    d_max: float = 5.0
    start: float = 5_000 / PAPER_RENORM_STEPS
    r_end: float = 40_000 / PAPER_RENORM_STEPS
    d_end: float = 25_000 / PAPER_RENORM_STEPS

    def limits(self, progress: float) -> tuple[float, float]:
        """(r_max, d_max) at `progress` = steps done / total steps of the run."""
        def ramp(end: float, initial: float, final: float) -> float:
            if progress <= self.start:
                return initial
            if progress >= end:
                return final
            return initial + (final - initial) * (progress - self.start) / (end - self.start)
        return ramp(self.r_end, 1.0, self.r_max), ramp(self.d_end, 0.0, self.d_max)


def batch_renorm_reference(x, running_mean, running_std, weight, bias, r_max: float, d_max: float,
                           eps: float = EPS, momentum: float = 0.01, training: bool = True):
    """Algorithm 1 of Ioffe (2017) for one batch, written out: returns (y, new mean, new std).

    sigma_B = sqrt(biased var_B + eps); r = clip(sigma_B / sigma, 1/r_max, r_max) and
    d = clip((mu_B - mu) / sigma, -d_max, d_max), both without gradient;
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta; mu += a (mu_B - mu), sigma += a (sigma_B - sigma).
    At inference y = gamma * (x - mu) / sigma + beta.
    """
    shape = (1, -1, 1, 1)
    if not training:
        return (weight.view(shape) * (x - running_mean.view(shape)) / running_std.view(shape)
                + bias.view(shape)), running_mean, running_std
    mu = x.mean(dim=(0, 2, 3))
    sigma = torch.sqrt(((x - mu.view(shape)) ** 2).mean(dim=(0, 2, 3)) + eps)
    r = torch.clamp(sigma.detach() / running_std, 1 / r_max, r_max)
    d = torch.clamp((mu.detach() - running_mean) / running_std, -d_max, d_max)
    x_hat = (x - mu.view(shape)) / sigma.view(shape) * r.view(shape) + d.view(shape)
    y = weight.view(shape) * x_hat + bias.view(shape)
    return (y, running_mean + momentum * (mu.detach() - running_mean),
            running_std + momentum * (sigma.detach() - running_std))


class BatchRenorm2d(ChunkedStatistics, nn.Module):
    """Batch Renormalization (Ioffe 2017, Algorithm 1), optionally followed by ReLU (act=True).

    Choices (the paper's, where public implementations differ): eps = 1e-5 inside the square
    root of the biased batch variance (ludvb/batchrenorm adds it outside); the running
    statistics are the mean and the standard deviation sigma (not the variance), sigma
    including eps, as in the algorithm; r and d carry no gradient. Momentum (the paper's alpha)
    0.01 by default: the paper used fast moving-average updates because r and d read them during
    training. r_max / d_max are buffers set before every step by the trainer from a RenormRamp
    (`set_limits`); they start at 1 and 0, where Batch Renorm is exactly BN.

    The training forward reads the running statistics (through r and d): under DDP they must
    be averaged across processes after every step, not only before evaluation, for K processes
    to equal K virtual devices (the average itself is linear, see the module docstring).
    """

    def __init__(self, num_features: int, eps: float = EPS, momentum: float = 0.01, act: bool = False):
        super().__init__()
        self.num_features, self.eps, self.momentum, self.act = num_features, eps, momentum, act
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        # schedule state: a function of the step, which checkpoints keep, so not saved here
        self.register_buffer("r_max", torch.tensor(1.0), persistent=False)
        self.register_buffer("d_max", torch.tensor(0.0), persistent=False)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def set_limits(self, r_max: float, d_max: float) -> None:
        self.r_max.fill_(r_max)
        self.d_max.fill_(d_max)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, act={self.act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        return F.relu(out) if self.act else out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            scale = self.weight / self.running_std
            shift = self.bias - self.running_mean * scale
            return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        chunks = self.chunk_view(x.to(self.weight.dtype))  # float32 under bf16 autocast
        with torch.no_grad():  # per-chunk mean and biased variance by the native kernel
            stats = [torch.batch_norm_update_stats(chunk, None, None, 0.0) for chunk in chunks]
            mean, var = (torch.stack(s) for s in zip(*stats))                       # [K, C]
            std = torch.sqrt(var + self.eps)
            r = torch.clamp(std / self.running_std, self.r_max.reciprocal(), self.r_max)
            d = torch.clamp((mean - self.running_mean) / self.running_std, -self.d_max, self.d_max)
        # gamma * (x_hat * r + d) + beta is BN with weight gamma * r and bias beta + gamma * d:
        # the native kernel computes x_hat and its gradient through mu_B and sigma_B.
        outs = [F.batch_norm(chunk, None, None, self.weight * r[k], self.bias + self.weight * d[k],
                             True, 0.0, self.eps) for k, chunk in enumerate(chunks)]
        with torch.no_grad():
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            self.running_std.lerp_(std.mean(0), self.momentum)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def set_population(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_mean.copy_(mean)
        self.running_std.copy_(torch.sqrt(var + self.eps))

    def batch_statistics(self, x: torch.Tensor):
        return self.chunk_moments(x)  # mu_B and sigma_B, before r and d pull them to the population

    def population_statistics(self):
        return self.running_mean, self.running_std
