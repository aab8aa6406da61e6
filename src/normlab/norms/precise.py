"""PreciseBN (Wu & Johnson 2021): population statistics recomputed over training images.

Before an evaluation, the model runs its train-mode forward (with the run's per-device chunks)
over M training images without gradients; every layer with running statistics records the
mean and biased variance of its input over each chunk, and is given their pooled values: the
mean of the chunk means, and the biased variance of all the images' values together (mean of
the chunk variances plus the variance of the chunk means; fvcore's update_bn_stats pools the
same way, torch.optim.swa_utils.update_bn averages unbiased per-batch variances instead).
During the pass each layer's moving averages are put back after every forward, so Batch
Renorm's r and d read the same running statistics as in training. On leaving the block the
moving averages are restored: PreciseBN changes the evaluation only, never the training.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from .batch import ChunkedStatistics


def statistics_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of `model` that keep running statistics (BN, BRN, EvoNorm-B0 with its act)."""
    return [m for m in model.modules() if isinstance(m, ChunkedStatistics)
            and any(name.startswith("running_") for name, _ in m.named_buffers(recurse=False))]


@contextlib.contextmanager
def precise_statistics(model: nn.Module, batches: Iterable[torch.Tensor], autocast=contextlib.nullcontext):
    """Within the block, every statistics layer of `model` holds the population statistics of
    its input over `batches` (model inputs, each a multiple of the chunk size)."""
    layers = statistics_layers(model)
    saved = {layer: {k: b.clone() for k, b in layer.named_buffers(recurse=False)} for layer in layers}
    records: dict[nn.Module, tuple[list, list]] = {layer: ([], []) for layer in layers}

    def record(layer, args):
        chunks = layer.chunk_view(args[0]).float()
        var, mean = torch.var_mean(chunks, dim=(1, 3, 4), unbiased=False)   # [K, C]
        records[layer][0].append(mean.double())
        records[layer][1].append(var.double())

    def put_back(layer, args, output):
        for name, value in saved[layer].items():
            getattr(layer, name).copy_(value)

    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(record),
                                             layer.register_forward_hook(put_back))]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad(), autocast():
            for x in batches:
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    with torch.no_grad():
        for layer, (means, variances) in records.items():
            means, variances = torch.cat(means), torch.cat(variances)
            pooled_var = variances.mean(0) + means.var(0, unbiased=False)
            layer.set_population(means.mean(0), pooled_var)  # copied into the buffers' dtype
    try:
        yield layers
    finally:
        with torch.no_grad():
            for layer in layers:
                for name, value in saved[layer].items():
                    getattr(layer, name).copy_(value)
