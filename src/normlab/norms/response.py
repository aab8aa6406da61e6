"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan 2020).

nu^2 = mean of x^2 over (H, W) per sample and channel (no mean subtraction, no batch
dependence); x_hat = x / sqrt(nu^2 + |eps|); y = gamma * x_hat + beta; with act=True the TLU
z = max(y, tau), tau a learned per-channel threshold (0 at initialization, so TLU starts as
ReLU). eps = 1e-6, the paper's constant (timm's FilterResponseNormTlu2d defaults to 1e-5); with
learned_eps, eps is a learned scalar entering as |eps| (the paper's Listing 1), started at 1e-6.
Before a residual addition (act=False) the layer is FRN alone, without TLU. Computed in the
parameters' precision: float32 under bf16 autocast
(GN's native kernel instead reads and writes bf16; this costs speed, see benchmarks/README.md).
"""
from __future__ import annotations

import torch
from torch import nn

FRN_EPS = 1e-6


def frn_reference(x, weight, bias, tau=None, eps=FRN_EPS) -> torch.Tensor:
    """The paper's formula, written out; tau None = no TLU."""
    shape = (1, -1, 1, 1)
    nu2 = (x ** 2).mean(dim=(2, 3), keepdim=True)
    y = weight.view(shape) * (x / torch.sqrt(nu2 + abs(eps))) + bias.view(shape)
    return y if tau is None else torch.maximum(y, tau.view(shape))


class FRNFunction(torch.autograd.Function):
    """FRN (+ TLU when tau is given) with a hand-written backward: a few passes over the
    tensor instead of autograd's chain of elementwise ops (see benchmarks/). With
    x_hat = x * s, s = (nu^2 + eps)^-1/2, the gradient is
    dx = gamma * s * gy - gamma * s^3 * sum_hw(gy * x) / HW * x, gy = dz masked by TLU."""

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps):
        hw = x.shape[2] * x.shape[3]
        nu2 = torch.linalg.vector_norm(x, dim=(2, 3)).square_().div_(hw)      # [N, C]
        s = torch.rsqrt(nu2 + eps)
        y = (x * (weight * s)[:, :, None, None]).add_(bias.view(1, -1, 1, 1))
        if tau is not None:
            y = torch.maximum(y, tau.view(1, -1, 1, 1))
        ctx.save_for_backward(x, s, y, weight, tau, eps if torch.is_tensor(eps) else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, s, z, weight, tau, eps = ctx.saved_tensors
        hw = x.shape[2] * x.shape[3]
        grad_tau = None
        if tau is not None:  # max(y, tau): the gradient goes to y where y > tau, else to tau
            masked = torch.ops.aten.threshold_backward(grad, z - tau.view(1, -1, 1, 1), 0.0)
            grad_tau = grad.sum(dim=(2, 3)).sum(0) - masked.sum(dim=(2, 3)).sum(0)
            grad = masked
        p = torch.linalg.vecdot(grad.flatten(2), x.flatten(2))               # sum_hw(gy * x), [N, C]
        grad_x = grad * (weight * s)[:, :, None, None]
        grad_x.addcmul_(x, (-weight * p * s ** 3 / hw)[:, :, None, None])
        grad_eps = None
        if eps is not None:  # a learned eps (its |.| is taken by the caller, so autograd chains it)
            grad_eps = (-0.5 * weight * p * s ** 3).sum()
        return grad_x, (p * s).sum(0), grad.sum(dim=(2, 3)).sum(0), grad_tau, grad_eps


class FilterResponseNorm2d(nn.Module):
    def __init__(self, num_channels: int, act: bool = False, learned_eps: bool = False):
        super().__init__()
        self.num_channels, self.act, self.learned_eps = num_channels, act, learned_eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.tau = nn.Parameter(torch.zeros(num_channels)) if act else None
        self.eps = nn.Parameter(torch.tensor(FRN_EPS)) if learned_eps else FRN_EPS

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.learned_eps:
            nn.init.constant_(self.eps, FRN_EPS)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, act={self.act}, learned_eps={self.learned_eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps.abs() if self.learned_eps else self.eps
        return FRNFunction.apply(x.to(self.weight.dtype), self.weight, self.bias, self.tau, eps)
