"""Weight Standardization (Qiao et al. 2019): each conv standardizes its weight before use.

W_hat = (W - mean) / sqrt(var + eps) per output channel over (C_in, kh, kw), with the biased
variance and eps inside the square root, as the paper's equation writes it; eps = 1e-5 (the
value of the authors' code, which instead adds it to the unbiased std outside the root; timm's
StdConv2d is biased with eps inside, 1e-6 by default). The stored weight is never modified: the
standardized copy is computed in every forward, so gradients reach W through it.
"""
from __future__ import annotations

import torch
from torch import nn

WS_EPS = 1e-5


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """The paper's formula, written out."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = ((flat - mean) ** 2).mean(dim=1, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(weight.shape)


class WSConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is standardized per output channel in every forward."""

    eps = WS_EPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
        weight = (self.weight - mean) * torch.rsqrt(var + self.eps)
        return self._conv_forward(x, weight, self.bias)
