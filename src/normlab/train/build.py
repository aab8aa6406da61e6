"""The pieces a training is built from: its device, each run's initial model, the optimizer."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..config import RunConfig
from ..errors import NormlabError
from ..models import cifar_resnet
from ..norms import set_chunk_size


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NormlabError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:K") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NormlabError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NormlabError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} "
                           f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of those")
    return device


def set_deterministic(on: bool) -> None:
    """--deterministic: only deterministic algorithms (cuDNN's and cuBLAS's included), so that
    the same step on the same state gives the same bits on CUDA and a resumed run continues
    exactly. Process-wide, like the settings it makes. cuBLAS reads its workspace setting when
    it starts, so this runs before the first CUDA operation of the process. An operation that
    has no deterministic version warns, naming itself (torch's warn_only), rather than stopping
    the run; the CPU's kernels are deterministic already."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_model(cfg: RunConfig, num_classes: int) -> torch.nn.Module:
    """The run's model as its seed initialises it (the same whether it trains alone or in an
    array), with its batch-dependent norms taking statistics per device."""
    seed_everything(cfg.seed)
    model = cifar_resnet(cfg.model, cfg.norm, num_classes, cfg.shortcut, cfg.zero_init_residual)
    ghost = cfg.virtual_gpus > 1 and not cfg.sync_bn  # --sync-bn: BN over all K*N
    set_chunk_size(model, cfg.batch_size if ghost else None)
    return model


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on every parameter unless wd_on_norm is off, in which
    case norm parameters and biases (all 1-d tensors) are not decayed."""
    if cfg.wd_on_norm:
        groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    else:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
