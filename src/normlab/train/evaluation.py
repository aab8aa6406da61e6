"""Evaluation of an array of runs: each run's loss and error on a split, PreciseBN's batches,
an epoch's metrics rows, the test set's reading, and the probes (Trainer's share, as a mixin)."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import probes
from ..data import augment
from ..errors import NormlabError
from ..norms import precise_statistics
from . import ranks
from .array import Network


def evaluate(network: Network, split, normalize, batch_size: int, autocast,
             group: ranks.Single = ranks.SINGLE) -> list[tuple[float, float]]:
    """Each run's mean loss and error (%) on a split, in eval mode (BN uses its running
    statistics). Under torchrun each rank evaluates its share and the sums are added up."""
    network.model.eval()
    share = group.shard(len(split))
    images, labels = split.images[share], split.labels[share]
    sums = torch.zeros(network.runs, 2, dtype=torch.float64, device=split.images.device)
    with torch.inference_mode(), autocast():
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start:start + batch_size])
            y = labels[start:start + batch_size]
            for r, out in enumerate(network.split(network.model(network.repeat(x)))):
                out = out.float()
                sums[r, 0] += F.cross_entropy(out, y, reduction="sum").double()
                sums[r, 1] += (out.argmax(1) != y).sum()
    n = len(split)
    return [(loss / n, 100.0 * wrong / n) for loss, wrong in group.sum(sums).tolist()]



class Evaluation:
    """What a Trainer measures: the metrics of an epoch, the test error, the probes."""

    def precise_bn_images(self) -> int:
        """PreciseBN's number of images: --precise-bn M rounded down to whole device batches."""
        m, n = self.cfg.precise_bn, self.cfg.batch_size
        if m and not n <= m <= len(self.data.train):
            raise NormlabError(f"--precise-bn {m} needs between {n} (one device batch) and "
                               f"{len(self.data.train)} (the training set) images")
        return m // n * n

    def precise_batches(self):
        """PreciseBN's inputs: training images chosen and augmented from each run's seed and the
        epoch (never from the training generators), in the training step's batches."""
        generators, orders = [], []
        for member in self.members:
            seed = int(np.random.SeedSequence([member.cfg.seed, self.epoch]).generate_state(1)[0])
            generators.append(torch.Generator().manual_seed(seed))
            orders.append(torch.randperm(len(self.data.train), generator=generators[-1])[:self.precise_images])
        for start in range(0, self.precise_images, self.cfg.images_per_step):
            xs = []
            for order, generator in zip(orders, generators):
                index = order[start:start + self.cfg.images_per_step].to(self.device)
                xs.append(self.normalize(augment(self.data.train.images[index], generator)))
            x = self.network.join(xs)
            yield x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def take_probes(self) -> None:
        """Each run's probes (probes.py) at the end of an epoch, or at initialization (epoch 0),
        taken on its lone model; they change nothing in its training."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for r, member in enumerate(self.members):
            model = self.model if self.runs == 1 else self.network.lone_model(r).to(self.device, memory_format=memory_format)
            member.probe_rows += probes.take(model, self.data, self.normalize, member.cfg, epoch=self.epoch,
                                             final=self.epoch == self.cfg.epochs, autocast=self.autocast,
                                             channels_last=self.channels_last)

    def finish_epoch(self) -> list[dict]:
        """Evaluate, then each run's metrics row (train numbers from the epoch's sums)."""
        eval_start = time.perf_counter()
        self.dist.average_buffers(self.model)  # per-rank BN running statistics -> their mean
        rows = []
        for member in self.members:
            loss_sum, wrong, n = member.sums.tolist()
            rows.append({"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                         "train_loss": loss_sum / n, "train_error": 100.0 * wrong / n})
        with (precise_statistics(self.model, self.precise_batches(), self.autocast) if self.precise_images
              else contextlib.nullcontext()):  # every rank computes the same (same images, weights)
            if self.data.val is not None:
                for row, (loss, error) in zip(rows, evaluate(self.network, self.data.val, self.normalize,
                                                             self.opts.eval_batch_size, self.autocast, self.dist)):
                    row["val_loss"], row["val_error"] = loss, error
            for row, (loss, error) in zip(rows, self.evaluate_test()):
                row["test_loss"], row["test_error"] = loss, error
        seconds = self.epoch_seconds + time.perf_counter() - eval_start
        for member, row in zip(self.members, rows):
            row["seconds"] = seconds
            row["images_per_s"] = member.sums[2].item() / self.epoch_seconds if self.epoch_seconds else float("nan")
        return rows

    def evaluate_test(self) -> list[tuple[float, float]]:
        """Each run's test loss and error, or NaNs when the test set is kept for later
        (RuntimeOptions.test_set off): evaluation changes nothing in training."""
        if not self.opts.test_set:
            return [(float("nan"), float("nan"))] * self.runs
        return evaluate(self.network, self.data.test, self.normalize, self.opts.eval_batch_size,
                        self.autocast, self.dist)

    def read_test(self) -> list[float]:
        """Each run's test error (%) with the weights of its last checkpoint, as the last epoch
        would have measured it: the test set's one reading for finished runs trained without
        it. Call on an opened trainer whose runs are finished."""
        if not self.load_checkpoints() or self.step:
            raise NormlabError(f"{self.where()} has no checkpoint at the end of an epoch to read the test set with")
        self.epoch -= 1  # PreciseBN's images are drawn for the epoch being evaluated
        with (precise_statistics(self.model, self.precise_batches(), self.autocast) if self.precise_images
              else contextlib.nullcontext()):
            return [error for _, error in evaluate(self.network, self.data.test, self.normalize,
                                                   self.opts.eval_batch_size, self.autocast, self.dist)]
