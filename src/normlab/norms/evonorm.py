"""EvoNorm-S0 and EvoNorm-B0 (Liu et al. 2020), norm and activation in one layer.

Defined as in the reference code the paper links (tensorflow/tpu, models/official/resnet/
resnet_model.py, `evonorm`), with v = 1, gamma = 1, beta = 0 at initialization:
  S0: y = x * sigmoid(v * x) / sqrt(var over (C/G, H, W) per sample and group + eps) * gamma + beta
  B0: y = x / max(sqrt(var_B + eps), v * x + sqrt(var over (H, W) per sample and channel + eps))
        * gamma + beta, var_B over (N, H, W) per channel in training, its moving average at
        evaluation
Every variance is biased (tf.nn.moments), eps = 1e-5, and the moving variance decays by 0.9
(momentum 0.1) without Bessel's correction (timm's EvoNorm2dB0 applies Bessel's correction and
uses eps = 1e-3). With act=False (the layer before a residual addition) the reference code
applies only gamma * x + beta, and so does this one.

S0's group count is clamped to the channels and refused when it does not divide them, like
GN's (the reference code silently lowers it until it divides; timm refuses C % G != 0).
Both are computed in the parameters' precision: float32 under bf16 autocast (GN's native kernel
instead reads and writes bf16; this costs speed, see benchmarks/README.md).
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import ChunkedStatistics
from .group import EPS


def evonorm_s0_reference(x, groups: int, v, weight, bias, eps: float = EPS) -> torch.Tensor:
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    std = torch.sqrt(grouped.var(dim=-1, unbiased=False, keepdim=True) + eps)
    std = std.expand_as(grouped).reshape(x.shape)
    shape = (1, c, 1, 1)
    return x * torch.sigmoid(v.view(shape) * x) / std * weight.view(shape) + bias.view(shape)


def evonorm_b0_reference(x, running_var, v, weight, bias, eps: float = EPS, momentum: float = 0.1,
                         training: bool = True):
    """Returns (y, new running variance) for one batch."""
    shape = (1, -1, 1, 1)
    var_b = x.var(dim=(0, 2, 3), unbiased=False) if training else running_var
    left = torch.sqrt(var_b + eps).view(shape)
    right = v.view(shape) * x + torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + eps)
    y = x / torch.maximum(left, right) * weight.view(shape) + bias.view(shape)
    new_var = running_var + momentum * (var_b.detach() - running_var) if training else running_var
    return y, new_var


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """[N, G] per-group values as [N, C, 1, 1] per-channel ones."""
    return t.repeat_interleave(channels // t.shape[1], dim=1)[:, :, None, None]


class S0Function(torch.autograd.Function):
    """EvoNorm-S0 with its nonlinearity and a hand-written backward (fewer passes over the
    tensor than autograd's chain). With s = sigmoid(v x), h = x s, rho = (var_g + eps)^-1/2:
    y = h * gamma * rho + beta and
    dx = q s + v q x s (1 - s) - d_rho rho^3 (x - mu) / M,  q = dy * gamma * rho,
    d_rho = sum over the group of dy * gamma * h,  M = C/G * H * W."""

    @staticmethod
    def forward(ctx, x, v, weight, bias, groups: int, eps: float):
        n, c, h, w = x.shape
        _, mean, rstd = torch.native_group_norm(x, None, None, n, c, h * w, groups, eps)   # [N, G]
        gate = (x * v.view(1, -1, 1, 1)).sigmoid_()
        gated = x * gate
        out = (gated * (weight.view(1, -1, 1, 1) * _per_channel(rstd, c))).add_(bias.view(1, -1, 1, 1))
        ctx.groups = groups
        ctx.save_for_backward(x, v, weight, gate, gated, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, v, weight, gate, gated, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        groups = ctx.groups
        size = c // groups * h * w
        gh = torch.linalg.vecdot(grad.flatten(2), gated.flatten(2))                  # [N, C]
        grad_weight = (gh * _per_channel(rstd, c)[:, :, 0, 0]).sum(0)
        grad_rstd = (gh * weight).view(n, groups, -1).sum(-1)                        # [N, G]
        q = grad * (weight.view(1, -1, 1, 1) * _per_channel(rstd, c))
        t = q * torch.addcmul(gated, gated, gate, value=-1.0)                        # q x s (1 - s)
        grad_v = torch.linalg.vecdot(t.flatten(2), x.flatten(2)).sum(0)
        alpha = -grad_rstd * rstd ** 3 / size                                        # on (x - mu)
        grad_x = (x * _per_channel(alpha, c)).add_(_per_channel(-alpha * mean, c))
        grad_x.addcmul_(q, gate).addcmul_(t, v.view(1, -1, 1, 1))
        return grad_x, grad_v, grad_weight, grad.sum(dim=(2, 3)).sum(0), None, None


class B0Function(torch.autograd.Function):
    """EvoNorm-B0 with its nonlinearity and a hand-written backward, over K chunks of N images.
    d = max(sqrt(var_B + eps), v x + sigma_I), y = x / d * gamma + beta. The batch statistics
    of each chunk come from the per-image ones (mean of the variances plus variance of the
    means), and the gradient through sigma_B and sigma_I is gathered into per-(image, channel)
    coefficients of x, so that the backward is a handful of passes. Returns (y, var_B [K, C])."""

    @staticmethod
    def forward(ctx, x, v, weight, bias, running_var, chunks: int, eps: float, training: bool):
        nk, c, h, w = x.shape
        _, mean_i, rstd_i = torch.native_group_norm(x, None, None, nk, c, h * w, c, eps)  # [NK, C]
        if training:
            means = mean_i.view(chunks, -1, c)
            var_b = (rstd_i.view(chunks, -1, c) ** -2 - eps).mean(1) + means.var(1, unbiased=False)  # [K, C]
            mean_b = means.mean(1)
        else:
            var_b, mean_b, chunks = running_var.unsqueeze(0), None, 1
        left = torch.sqrt(var_b + eps)                                              # [K, C]
        d = (x * v.view(1, -1, 1, 1)).add_(rstd_i.reciprocal()[:, :, None, None])
        d5 = d.view(chunks, -1, *d.shape[1:])
        torch.maximum(d5, left[:, None, :, None, None], out=d5)
        x_hat = x / d
        out = (x_hat * weight.view(1, -1, 1, 1)).add_(bias.view(1, -1, 1, 1))
        ctx.chunks, ctx.training = chunks, training
        ctx.save_for_backward(x, v, weight, d, x_hat, left, mean_i, rstd_i, mean_b)
        ctx.mark_non_differentiable(var_b)
        return out, var_b

    @staticmethod
    def backward(ctx, grad, _grad_var):
        x, v, weight, d, x_hat, left, mean_i, rstd_i, mean_b = ctx.saved_tensors
        nk, c, h, w = x.shape
        k = ctx.chunks
        gamma = weight.view(1, -1, 1, 1)
        q = grad / d                                                                # dL/dx_hat / gamma / d
        grad_weight = torch.linalg.vecdot(grad.flatten(2), x_hat.flatten(2)).sum(0)
        e = q * x_hat                                                               # -dL/dd / gamma
        left_full = left.repeat_interleave(nk // k, dim=0)[:, :, None, None]        # [NK, C, 1, 1]
        e_right = torch.ops.aten.threshold_backward(e, d - left_full, 0.0)          # where v x + sigma_I won
        sum_e, sum_right = e.sum(dim=(2, 3)), e_right.sum(dim=(2, 3))                # [NK, C]
        grad_sigma_i = -weight * sum_right                                          # [NK, C]
        grad_v = -(weight * torch.linalg.vecdot(e_right.flatten(2), x.flatten(2))).sum(0)
        alpha = grad_sigma_i * rstd_i / (h * w)               # sigma_I: (x - mu_I) / (HW sigma_I)
        shift = -alpha * mean_i
        if ctx.training:                                      # sigma_B: (x - mu_B) / (N HW sigma_B)
            grad_left = -weight * (sum_e - sum_right).view(k, -1, c).sum(1)           # [K, C]
            beta_b = grad_left / left / (nk // k * h * w)
            alpha = alpha + beta_b.repeat_interleave(nk // k, dim=0)
            shift = shift - (beta_b * mean_b).repeat_interleave(nk // k, dim=0)
        grad_x = (x * alpha[:, :, None, None]).add_(shift[:, :, None, None])
        grad_x.addcmul_(q, gamma).addcmul_(e_right, -v.view(1, -1, 1, 1) * gamma)
        return grad_x, grad_v, grad_weight, grad.sum(dim=(2, 3)).sum(0), None, None, None, None


class EvoNormAffine(nn.Module):
    """Shared parameters: gamma (weight), beta (bias), and v when the nonlinearity is on."""

    def __init__(self, num_channels: int, act: bool):
        super().__init__()
        self.num_channels, self.act = num_channels, act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.v = nn.Parameter(torch.ones(num_channels)) if act else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.v is not None:
            nn.init.ones_(self.v)

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class EvoNormS0(EvoNormAffine):
    def __init__(self, num_groups: int, num_channels: int, eps: float = EPS, act: bool = False):
        super().__init__(num_channels, act)
        self.num_groups, self.eps = num_groups, eps

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, act={self.act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act:
            return self.affine(x)
        return S0Function.apply(x.to(self.weight.dtype), self.v, self.weight, self.bias, self.num_groups, self.eps)


class EvoNormB0(ChunkedStatistics, EvoNormAffine):
    """EvoNorm-B0; its batch variance is over each chunk of `chunk_size` images (one device's)."""

    def __init__(self, num_channels: int, eps: float = EPS, momentum: float = 0.1, act: bool = False):
        super().__init__(num_channels, act)
        self.eps, self.momentum = eps, momentum
        if act:  # without the nonlinearity the layer is affine only and keeps no statistics
            self.register_buffer("running_var", torch.ones(num_channels))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, act={self.act}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act:
            return self.affine(x)
        chunks = self.chunk_view(x).shape[0] if self.training else 1
        out, var_b = B0Function.apply(x.to(self.weight.dtype), self.v, self.weight, self.bias, self.running_var,
                                      chunks, self.eps, self.training)
        if self.training:
            with torch.no_grad():
                self.running_var.lerp_(var_b.mean(0), self.momentum)
        return out

    def set_population(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_var.copy_(var)

    def batch_statistics(self, x: torch.Tensor):
        return None, self.chunk_moments(x)[1]   # the batch half of B0's divisor, sqrt(var_B + eps)

    def population_statistics(self):
        return None, torch.sqrt(self.running_var + self.eps)
