"""What is measured inside the network, never changing training.

The probes follow what the literature after the GN paper measures to explain why a norm helps
(reference/anchors.md, section 13): the train/test inconsistency of batch statistics (Wu &
Johnson 2021, "Rethinking 'Batch' in BatchNorm"), and how a norm shapes the signal as it
propagates (Lubana, Dick & Tanaka 2021, "Beyond BatchNorm": activation and gradient norms per
layer, rank collapse of the features). Every function takes a lone CIFAR ResNet
(`normlab.cifar_resnet`; in a run array, each run's lone model) and returns tidy rows:
{"epoch", "layer", "depth", "probe", "value"}.

`measure` runs one probe pass over a fixed probe set of training images in the training mode,
each batch-dependent norm normalizing each device batch of N images apart (as in training,
whatever the run's number of devices), with one backward pass whose gradients are returned by
autograd.grad, never stored in the parameters. The model's parameters, their .grad, its
buffers (restored after every batch, so Batch Renorm reads the same running statistics
throughout), the optimizer and every random number generator are left as they were. Probes,
per `probe` name:

  batch_mean_shift      per statistics layer (BN, BRN, EvoNorm-B0, mean-only BN): how far a
                        device batch's mean lies from the population mean that evaluation uses
                        (the running mean), in population standard deviations (the divisor
                        evaluation uses, eps included; for mean-only BN, which keeps no spread,
                        the probe set's pooled std); root mean square over channels and device batches
  batch_log_std_ratio   per statistics layer that divides (BN, BRN, EvoNorm-B0, scale-only BN):
                        log(batch divisor / population divisor), root mean square over channels
                        and device batches (0: the batch normalizes exactly as evaluation will)
  block_input_rms       per residual block: the root mean square of its input
  branch_rms, skip_rms  per residual block: RMS of the residual branch (after its last norm)
                        and of the shortcut, before they are added; branch_skip_ratio = their ratio
  grad_norm             per conv and the classifier: the L2 norm of the gradient of the mean
                        cross-entropy over the probe set with respect to the weight
  feature_effective_rank  the penultimate features (the classifier's input, M images x 64):
                        exp of the entropy of their normalized singular values (Roy & Vetterli
                        2007), uncentred, so that features collapsing to one direction give 1
  feature_mean_cosine   the mean cosine similarity over all pairs of distinct probe images

`test_errors` adds, for models with statistics layers, the test error (%) with batch
statistics at test time (the training mode over device batches of test images, as training
normalizes) and with population statistics (evaluation as usual), on the same images.

`take` is what the training loop calls for a run (train/loop.py): a probe pass at
initialization (epoch 0) and after every epoch, and the test errors after the last one; the
rows go to the run's probes.csv (`write`) and into its checkpoint (`pack`, `unpack`), so that a
resumed run rewrites them exactly. `by_default` says where a study probes unless told: where
the probes cost at most 5 % of the run's training.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rundir
from .models import BasicBlock
from .norms import ChunkedStatistics, statistics_layers

PROBES = "probes.csv"                 # in the run directory: the rows of every probed epoch
PROBE_IMAGES = 128                    # the probe set's size, rounded to whole device batches
BATCH = 512                           # images per forward pass (rounded down to whole device batches)
PROBE_STREAM = 0x70726F6265           # "probe": the probe set's own random stream, apart from training's
FIELDS = ("epoch", "layer", "depth", "probe", "value")


# What the probes cost, in images of training (forward and backward), measured with `normlab
# bench --probes` (README): a probe pass about 1.5 training images per probe image (a forward
# and backward pass, and the statistics), the final epoch's test errors about 1 per test image
# (a training-mode and an evaluation pass over the test set).
COST_PER_PROBE_IMAGE, COST_PER_TEST_IMAGE = 1.5, 1.0
DEFAULT_BUDGET = 0.05                 # probes are on by default in studies where they cost at most this


def cost_share(epochs: int, train_images: int, test_images: int) -> float:
    """The probes' estimated cost as a share of a run's training: a probe pass at
    initialization and after each of `epochs` epochs, and the test errors once."""
    cost = (epochs + 1) * COST_PER_PROBE_IMAGE * PROBE_IMAGES + COST_PER_TEST_IMAGE * test_images
    return cost / (epochs * train_images)


def by_default(epochs: int, train_images: int, test_images: int) -> bool:
    """Whether a study probes a run unless told: where they cost at most 5 % of its training
    (a CIFAR-10 run of 5 epochs or more; not the few epochs of the bundled sample's presets)."""
    return cost_share(epochs, train_images, test_images) <= DEFAULT_BUDGET


def probe_indices(train_images: int, seed: int, device_batch: int, size: int = PROBE_IMAGES) -> torch.Tensor:
    """The probe set: training image indices chosen from the run's seed alone (the same images
    for every run of a seed), by a generator of its own, never the training generator. Its
    size is `size` rounded to whole device batches of `device_batch` images, at least one."""
    batches = max(1, round(size / device_batch))
    count = min(batches * device_batch, train_images // device_batch * device_batch)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, PROBE_STREAM]).generate_state(1)[0]))
    return torch.randperm(train_images, generator=generator)[:count]


TEST_STREAM = 0x74657374               # "test": the order of the test images in device batches


def test_order(test_images: int, seed: int) -> torch.Tensor:
    """The order in which the test images form device batches for `test_errors`, from the seed."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, TEST_STREAM]).generate_state(1)[0]))
    return torch.randperm(test_images, generator=generator)


test_order.__test__ = False  # not a test for pytest to collect


def take(model: nn.Module, data, normalize, cfg, *, epoch: int, final: bool, autocast=contextlib.nullcontext,
         channels_last: bool = False) -> list[dict]:
    """A run's probes at `epoch` (0: at initialization): `measure` on its probe set, and on its
    final epoch `test_errors`. `data` is the run's Dataset on the model's device, `normalize`
    its Normalizer, `cfg` its RunConfig (the device batch: N images, or the step's K*N with
    --sync-bn)."""
    device_batch = cfg.images_per_step if cfg.sync_bn else cfg.batch_size

    def inputs(split, index):
        x = normalize(split.images[index.to(split.images.device)])
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x, \
            split.labels[index.to(split.labels.device)]

    index = probe_indices(len(data.train), cfg.seed, device_batch)
    rows = measure(model, *inputs(data.train, index), epoch=epoch, device_batch=device_batch, autocast=autocast)
    if final:
        order = test_order(len(data.test), cfg.seed)
        rows += test_errors(model, *inputs(data.test, order), epoch=epoch, device_batch=device_batch,
                            autocast=autocast)
    return rows


def write(run_dir, rows: list[dict]) -> None:
    """The run's probes.csv, written atomically (rundir), columns FIELDS, values to 7 digits."""
    rundir.write_metrics(Path(run_dir) / PROBES, [{"epoch": r["epoch"], "layer": r["layer"], "depth": r["depth"],
                                                   "probe": r["probe"], "value": f"{r['value']:.7g}"} for r in rows])


def pack(rows: list[dict]) -> dict:
    """Rows as a checkpoint holds them: plain lists and tensors (torch.load(weights_only=True))."""
    keys = list(dict.fromkeys((r["layer"], -1 if r["depth"] is None else r["depth"], r["probe"]) for r in rows))
    where = {k: i for i, k in enumerate(keys)}
    return {"layers": [k[0] for k in keys], "depths": [k[1] for k in keys], "probes": [k[2] for k in keys],
            "epoch": torch.tensor([r["epoch"] for r in rows], dtype=torch.int64),
            "key": torch.tensor([where[(r["layer"], -1 if r["depth"] is None else r["depth"], r["probe"])]
                                 for r in rows], dtype=torch.int64),
            "value": torch.tensor([r["value"] for r in rows], dtype=torch.float64)}


def unpack(packed: dict | None) -> list[dict]:
    if not packed:
        return []
    keys = list(zip(packed["layers"], packed["depths"], packed["probes"]))
    return [row(e, keys[k][0], None if keys[k][1] < 0 else keys[k][1], keys[k][2], v)
            for e, k, v in zip(packed["epoch"].tolist(), packed["key"].tolist(), packed["value"].tolist())]


def row(epoch: int, layer: str, depth: int | None, probe: str, value: float) -> dict:
    return {"epoch": epoch, "layer": layer, "depth": depth, "probe": probe, "value": float(value)}


@contextlib.contextmanager
def left_as_it_was(model: nn.Module, device_batch: int):
    """Within the block, the model may run in training mode, its batch-dependent norms taking
    their statistics over each `device_batch` images of a batch; on leaving it, its buffers,
    its mode and its chunk sizes are as they were. The caller puts the buffers back between
    batches with `restore`."""
    saved = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    chunked = [m for m in model.modules() if isinstance(m, ChunkedStatistics)]
    sizes = [m.chunk_size for m in chunked]
    for m in chunked:
        m.chunk_size = device_batch

    def restore():
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])

    try:
        yield restore
    finally:
        restore()
        model.train(was_training)
        for m, size in zip(chunked, sizes):
            m.chunk_size = size


def batches(n: int, device_batch: int, size: int = BATCH):
    """(start, end) of batches of at most `size` images (at least one device batch), whole
    device batches, over the first n // device_batch * device_batch images."""
    step = max(1, size // device_batch) * device_batch
    n = n // device_batch * device_batch
    return [(start, min(start + step, n)) for start in range(0, n, step)], n


def at_least_float(x: torch.Tensor) -> torch.Tensor:
    """bf16 activations (autocast) as float32, for statistics; float32 and float64 as they are."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


class Hooks:
    """Forward hooks that record what the probes need, removed on leaving the block."""

    def __init__(self):
        self.handles = []

    def pre(self, module, fn):
        self.handles.append(module.register_forward_pre_hook(lambda m, args: fn(at_least_float(args[0]))))

    def post(self, module, fn):
        self.handles.append(module.register_forward_hook(lambda m, args, out: fn(at_least_float(out))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class SumSquares:
    """A running sum of squares and count, for an RMS over many batches."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, x: torch.Tensor) -> None:
        self.total += float(torch.linalg.vector_norm(x)) ** 2
        self.count += x.numel()

    def rms(self) -> float:
        return math.sqrt(self.total / self.count) if self.count else math.nan


class Gap:
    """One statistics layer's batch statistics against its population statistics."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        center, scale = layer.population_statistics()
        self.center = None if center is None else center.detach().double().clone()
        self.scale = None if scale is None else scale.detach().double().clone()
        self.centers, self.scales = [], []
        self.count, self.sum_x, self.sum_x2 = 0, 0.0, 0.0   # per channel, over the probe set

    def add(self, x: torch.Tensor) -> None:
        center, scale = self.layer.batch_statistics(x)
        if center is not None:
            self.centers.append(center.double())
        if scale is not None:
            self.scales.append(scale.double())
        if self.scale is None:  # no population spread: the probe set's pooled one is the unit
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            n = x.numel() // x.shape[1]
            self.sum_x = self.sum_x + n * mean.double()
            self.sum_x2 = self.sum_x2 + n * (var.double() + mean.double() ** 2)
            self.count += n

    def unit(self) -> torch.Tensor:
        """The population std: evaluation's divisor, or the probe set's pooled std (eps inside)."""
        if self.scale is not None:
            return self.scale
        mean = self.sum_x / self.count
        return torch.sqrt((self.sum_x2 / self.count - mean * mean).clamp_min(0) + self.layer.eps)

    def values(self) -> dict[str, float]:
        out = {}
        if self.centers and self.center is not None:
            shift = (torch.cat(self.centers) - self.center) / self.unit()
            out["batch_mean_shift"] = float(torch.sqrt(torch.mean(shift ** 2)))
        if self.scales and self.scale is not None:
            ratio = torch.log(torch.cat(self.scales) / self.scale)
            out["batch_log_std_ratio"] = float(torch.sqrt(torch.mean(ratio ** 2)))
        return out


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of the singular values normalized to sum 1) of an [M, D] matrix (Roy &
    Vetterli 2007): D for features spread evenly over D directions, 1 for one direction."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def mean_cosine(features: torch.Tensor) -> float:
    """The mean cosine similarity over all pairs of distinct rows (a zero row counts as 0)."""
    f = features.double()
    unit = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.T
    m = len(f)
    return float((gram.sum() - gram.diagonal().sum()) / (m * (m - 1)))


def measure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epoch: int,
            device_batch: int, autocast=contextlib.nullcontext, batch: int = BATCH) -> list[dict]:
    """One probe pass over `images` (model inputs, normalized as for training) and their
    `labels`, batch-dependent norms normalizing each `device_batch` images apart (the images
    one device normalizes together in training), in forward passes of at most `batch` images,
    returning tidy rows for `epoch`. Leaves the model, its gradients and buffers, and every
    random generator untouched."""
    spans, n = batches(len(images), device_batch, batch)
    if n == 0:
        raise ValueError(f"the probe set ({len(images)} images) is smaller than a device batch ({device_batch})")
    names = {m: name for name, m in model.named_modules()}
    gaps = [Gap(layer) for layer in statistics_layers(model)]
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    acts = {b: (SumSquares(), SumSquares(), SumSquares()) for b in blocks}   # input, branch, skip
    weights = [(name.removesuffix(".weight"), p) for name, p in model.named_parameters()
               if name.endswith("weight") and p.ndim > 1]                     # convs and the classifier
    grads = [torch.zeros_like(p, dtype=torch.float64) for _, p in weights]
    features = []
    with left_as_it_was(model, device_batch) as restore, Hooks() as hooks, torch.enable_grad():
        for gap in gaps:
            hooks.pre(gap.layer, gap.add)
        for b in blocks:
            hooks.pre(b, acts[b][0].add)
            hooks.post(b.norm2, acts[b][1].add)
            hooks.post(b.shortcut, acts[b][2].add)
        hooks.pre(model.fc, features.append)
        model.train()
        for start, end in spans:
            x, y = images[start:end], labels[start:end]
            with autocast():
                out = model(x)
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            loss = F.cross_entropy(out, y, reduction="sum") / n           # the mean over the probe set
            for total, g in zip(grads, torch.autograd.grad(loss, [p for _, p in weights])):
                total += g.double()
            restore()
    rows = []
    for depth, gap in enumerate(gaps, 1):
        rows += [row(epoch, names[gap.layer], depth, probe, v) for probe, v in gap.values().items()]
    for depth, b in enumerate(blocks, 1):
        inputs, branch, skip = (s.rms() for s in acts[b])
        rows += [row(epoch, names[b], depth, "block_input_rms", inputs), row(epoch, names[b], depth, "branch_rms", branch),
                 row(epoch, names[b], depth, "skip_rms", skip),
                 row(epoch, names[b], depth, "branch_skip_ratio", branch / skip if skip else math.nan)]
    rows += [row(epoch, name, depth, "grad_norm", torch.linalg.vector_norm(g))
             for depth, ((name, _), g) in enumerate(zip(weights, grads), 1)]
    feats = torch.cat(features)
    rows += [row(epoch, names[model.fc], None, "feature_effective_rank", effective_rank(feats)),
             row(epoch, names[model.fc], None, "feature_mean_cosine", mean_cosine(feats))]
    return rows


def test_errors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epoch: int,
                device_batch: int, autocast=contextlib.nullcontext, batch: int = BATCH) -> list[dict]:
    """The test error (%) with batch statistics at test time (each `device_batch` test images
    normalized together, as training normalizes) and with population statistics, on the same
    test images: the first len(images) // device_batch * device_batch of them. Pass them in a
    fixed shuffled order: sorted by class, a device batch would hold one class. No rows for a
    model without statistics layers (its two errors are the same)."""
    if not statistics_layers(model):
        return []
    spans, n = batches(len(images), device_batch, batch)
    wrong = {"batch": 0, "population": 0}
    with left_as_it_was(model, device_batch) as restore, torch.no_grad():
        for mode, training in (("batch", True), ("population", False)):
            model.train(training)
            for start, end in spans:
                with autocast():
                    out = model(images[start:end])
                wrong[mode] += int((out.argmax(1) != labels[start:end]).sum())
                restore()
    return [row(epoch, "model", None, f"test_error_{mode}_stats", 100.0 * w / n) for mode, w in wrong.items()]


test_errors.__test__ = False  # a probe, not a test for pytest to collect
