"""Training throughput, side by side with the usual research pipeline and the machine's limit.

For each model x norm x batch size: normlab's training step (data on the device as uint8,
batched augmentation, the fast norm kernels) against a reference written the way CIFAR research
scripts usually are (a Dataset doing per-sample crop, flip and normalization, a DataLoader,
fp32, NCHW, the norm as a plain module: for GN the paper's reshape formula). Both are timed in
the same process, alternating, after warm-up; the ratio is the number to quote. The machine's
matmul peak and the model's counted training FLOPs per image give the achieved fraction.
"""
from __future__ import annotations

import contextlib
import dataclasses
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import probes
from .config import RunConfig, RuntimeOptions
from .data import SIZES
from .train import Trainer, resolve_device
from .models import cifar_resnet
from .norms import GhostBatchNorm2d, ReferenceGroupNorm, group_norm_reference, make_conv, make_norm, parse_norm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_matmul_flops(device: torch.device, seconds: float = 1.0, n: int | None = None,
                      dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s in `dtype`: the practical compute limit of this device in it.
    n: 8192 on CUDA (smaller products leave a large GPU partly idle), 2048 elsewhere."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def training_flops_per_image(model_name: str, norm: str, batch: int = 8) -> float:
    """Counted (not guessed) FLOPs of forward + backward per image (convs and matmuls)."""
    model = cifar_resnet(model_name, norm)
    x = torch.randn(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long)).backward()
    return counter.get_total_flops() / batch


class PerSampleCifar(torch.utils.data.Dataset):
    """The usual research-script dataset: one image at a time, numpy crop/flip/normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        self.images = images.numpy().transpose(0, 2, 3, 1)  # HWC uint8, like PIL images
        self.labels = labels.numpy()
        self.mean = np.array(mean, dtype=np.float32)
        self.std = np.array(std, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = np.pad(self.images[i], ((4, 4), (4, 4), (0, 0)))
        y, x = np.random.randint(0, 9, size=2)
        img = img[y:y + 32, x:x + 32]
        if np.random.rand() < 0.5:
            img = img[:, ::-1]
        img = (img.astype(np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(img.transpose(2, 0, 1).copy()), int(self.labels[i])


def reference_model(cfg: RunConfig) -> torch.nn.Module:
    """The same network with plain norm modules: nn.BatchNorm2d (+ ReLU), or GN by the
    reshape formula; the other norms are kept as they are (they have no plain counterpart)."""
    model = cifar_resnet(cfg.model, cfg.norm)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, child_name, ReferenceGroupNorm(child.num_groups, child.num_channels, act=child.act))
            elif isinstance(child, GhostBatchNorm2d):
                setattr(module, child_name, (PlainBatchNormReLU if child.act else torch.nn.BatchNorm2d)(child.num_features))
    return model


class PlainBatchNormReLU(torch.nn.BatchNorm2d):
    """nn.BatchNorm2d then ReLU, with BatchNorm2d's parameter names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def time_steps(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def bench_config(cfg: RunConfig, opts: RuntimeOptions, steps: int, warmup: int, repeats: int,
                 reference: bool, reference_workers: int,
                 precisions: tuple[str, ...] = ("fp32",), progress=None) -> dict:
    """Time normlab's step in each of `precisions` ('fp32', 'bf16' autocast) and the reference
    (fp32, as the usual scripts train), alternating. normlab_images_per_s is the precision the
    run would choose by default (opts.amp, or auto), or the first one timed if that was not.
    `progress(text)`, if given, hears of each timing as it starts; the result's "ratios" are
    those measured (ratios())."""
    say = progress or (lambda text: None)
    device = resolve_device(opts.device)
    run = Trainer([cfg], ["unused"], dataclasses.replace(opts, progress=False))
    run.model.train()
    per_step = cfg.images_per_step
    n_train = len(run.data.train)
    cursor = [0]
    default = "bf16" if run.amp else "fp32"
    autocasts = {"fp32": contextlib.nullcontext,
                 "bf16": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}

    def normlab_step():
        start = cursor[0] % (n_train - per_step)
        cursor[0] += per_step
        run.train_step([torch.arange(start, start + per_step, device=device)], cfg.lr)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ref_step = None
    if reference:
        ref_cfg = dataclasses.replace(cfg, virtual_gpus=1)  # the usual script: plain batch N
        model = reference_model(ref_cfg).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        data = run.data
        loader = torch.utils.data.DataLoader(
            PerSampleCifar(data.train.images.cpu(), data.train.labels.cpu(), data.mean, data.std),
            batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=reference_workers,
            pin_memory=device.type == "cuda", persistent_workers=reference_workers > 0)
        batches = [iter(loader)]

        def ref_step():
            try:
                x, y = next(batches[0])
            except StopIteration:
                batches[0] = iter(loader)
                x, y = next(batches[0])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    rates, ref_rates = {p: [] for p in precisions}, []
    for repeat in range(repeats):  # alternate, so that drift in machine speed hits all alike
        for precision in precisions:
            say(f"repeat {repeat + 1}/{repeats}: normlab {precision}")
            run.autocast = autocasts[precision]
            rates[precision].append(steps * per_step / time_steps(normlab_step, steps, warmup, device))
        if ref_step:
            say(f"repeat {repeat + 1}/{repeats}: reference fp32")
            ref_steps = max(1, steps * per_step // cfg.batch_size)
            ref_rates.append(ref_steps * cfg.batch_size / time_steps(ref_step, ref_steps, warmup, device))
    chosen = default if default in precisions else precisions[0]
    result = {
        "model": cfg.model, "norm": cfg.norm, "batch_size": cfg.batch_size,
        "virtual_gpus": cfg.virtual_gpus, "images_per_step": per_step, "device": run.describe(run.members[0])["device"],
        "threads": torch.get_num_threads(), "speed_options": run.describe(run.members[0])["speed_options"],
        "precision": chosen,
        "normlab_images_per_s": statistics.median(rates[chosen]),
        "normlab_images_per_s_all": rates[chosen],
        "precisions": {p: {"images_per_s": statistics.median(r), "images_per_s_all": r}
                       for p, r in rates.items()},
    }
    if ref_rates:
        result["reference_images_per_s"] = statistics.median(ref_rates)
        result["reference_images_per_s_all"] = ref_rates
        result["reference_batch_size"] = cfg.batch_size
        result["speedup"] = result["normlab_images_per_s"] / result["reference_images_per_s"]
        for entry in result["precisions"].values():
            entry["speedup"] = entry["images_per_s"] / result["reference_images_per_s"]
    result["ratios"] = ratios(result)
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def ratios(result: dict) -> dict[str, float]:
    """The ratios of throughput measured side by side: 'bf16/fp32' where both precisions ran,
    and 'normlab fp32/reference', 'normlab bf16/reference' where the reference ran."""
    rates = {p: entry["images_per_s"] for p, entry in result["precisions"].items()}
    out = {}
    if "fp32" in rates and "bf16" in rates:
        out["bf16/fp32"] = rates["bf16"] / rates["fp32"]
    if "reference_images_per_s" in result:
        out.update({f"normlab {p}/reference": r / result["reference_images_per_s"] for p, r in rates.items()})
    return out


def bench_norm_layers(device: torch.device, batch: int = 32, groups: int = 16, repeats: int = 50) -> list[dict]:
    """Forward + backward of one norm layer at the ResNet-56 shapes, in both memory formats."""
    rows = []
    for channels, size in ((16, 32), (32, 16), (64, 8)):
        layer = make_norm(f"gn:{groups}", channels).to(device)
        bn = make_norm("bn", channels).to(device)
        impls = {
            "normlab gn (nn.GroupNorm)": lambda x: layer(x),
            "F.group_norm": lambda x: F.group_norm(x, layer.num_groups, layer.weight, layer.bias),
            "reference formula": lambda x: group_norm_reference(x, layer.num_groups, layer.weight, layer.bias),
            "bn (for scale)": lambda x: bn(x),
        }
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=fmt)
            x.requires_grad_(True)
            grad = torch.randn_like(x)
            for name, fn in impls.items():
                def step():
                    fn(x).backward(grad)
                seconds = time_steps(step, repeats, 5, device)
                rows.append({"shape": [batch, channels, size, size], "groups": min(groups, channels),
                             "format": fmt_name, "impl": name, "microseconds": 1e6 * seconds / repeats})
    return rows


ZOO_LAYERS = ("gn:16", "bn", "brn", "frn", "evonorm-s0:16", "evonorm-b0")


def bench_zoo_layers(device: torch.device, batch: int = 32, repeats: int = 30) -> list[dict]:
    """Forward + backward of each norm with its activation (the layer after a conv) at the
    ResNet-56 shapes, in its default memory format, against GN (G = 16, NCHW); and the WS conv
    against the plain 3x3 conv. Timed alternately, `repeats` calls each, median of 3 rounds."""
    rows = []
    for channels, size in ((16, 32), (32, 16), (64, 8)):
        layers = {spec: make_norm(spec, channels, act=True).to(device) for spec in ZOO_LAYERS}
        layers["conv 3x3"] = make_conv("gn", channels, channels, 3, 1, 1).to(device)
        layers["conv 3x3 + WS"] = make_conv("gn+ws", channels, channels, 3, 1, 1).to(device)
        formats = {name: "channels_last" if name in ZOO_LAYERS and parse_norm(name).channels_last else "NCHW"
                   for name in layers}
        inputs = {name: torch.randn(batch, channels, size, size, device=device).contiguous(
            memory_format=torch.channels_last if formats[name] == "channels_last" else torch.contiguous_format
        ).requires_grad_(True) for name in layers}
        times = {name: [] for name in layers}
        for _ in range(3):
            for name, layer in layers.items():
                x, grad = inputs[name], torch.randn_like(inputs[name])
                times[name].append(time_steps(lambda: layer(x).backward(grad), repeats, 3, device) / repeats)
        median = {name: statistics.median(t) for name, t in times.items()}
        for name in layers:
            base = "conv 3x3" if name.startswith("conv") else "gn:16"
            rows.append({"shape": [batch, channels, size, size], "layer": name, "format": formats[name],
                         "microseconds": 1e6 * median[name], "relative": median[name] / median[base],
                         "relative_to": base})
    return rows


def bench_fused(cfg: RunConfig, opts: RuntimeOptions, runs: int, steps: int, warmup: int,
                repeats: int) -> dict:
    """R runs (seeds 0..R-1) trained as one fused array against the same R runs trained one
    after another, alternating in one process; images/s over all R runs, at opts' precision."""
    device = resolve_device(opts.device)
    opts = dataclasses.replace(opts, progress=False)
    seeds = [dataclasses.replace(cfg, seed=s) for s in range(runs)]
    fused = Trainer(seeds, ["unused"] * runs, opts)
    alone = [Trainer([c], ["unused"], opts) for c in seeds]
    per_step = cfg.images_per_step
    n_train = len(fused.data.train)
    cursor = [0]

    def indices():
        start = cursor[0] % (n_train - per_step)
        cursor[0] += per_step
        return torch.arange(start, start + per_step, device=device)

    def fused_step():
        fused.train_step([indices() for _ in range(runs)], cfg.lr)

    def separate_steps():
        for trainer in alone:
            trainer.train_step([indices()], cfg.lr)

    for trainer in (fused, *alone):
        trainer.model.train()
    fused_rates, separate_rates = [], []
    for _ in range(repeats):  # alternate, so that drift in machine speed hits both alike
        fused_rates.append(runs * steps * per_step / time_steps(fused_step, steps, warmup, device))
        separate_rates.append(runs * steps * per_step / time_steps(separate_steps, steps, warmup, device))
    fused_rate, separate_rate = statistics.median(fused_rates), statistics.median(separate_rates)
    return {"model": cfg.model, "norm": cfg.norm, "batch_size": cfg.batch_size,
            "virtual_gpus": cfg.virtual_gpus, "runs": runs, "precision": "bf16" if fused.amp else "fp32",
            "device": fused.describe(fused.members[0])["device"], "threads": torch.get_num_threads(),
            "fused_images_per_s": fused_rate, "separate_images_per_s": separate_rate,
            "fused_images_per_s_all": fused_rates, "separate_images_per_s_all": separate_rates,
            "speedup": fused_rate / separate_rate}


def compare_fast_paths(cfg: RunConfig, opts: RuntimeOptions, paths: tuple[str, ...], steps: int, warmup: int,
                       repeats: int, check_steps: int = 20) -> dict:
    """--fast-path: each of `paths` against the eager step ('off') in one process. First every
    path trains `check_steps` steps from the same initial model on the same images and learning
    rates, and its losses and weights are compared with eager's, beside a second eager run's
    (the floor of float noise on this device); then each is timed, alternating, as bench_config
    times normlab's step. Precision: the run's default (opts.amp), the same for all."""
    device = resolve_device(opts.device)
    opts = dataclasses.replace(opts, progress=False)
    names = ("off", "off (again)", *paths)
    trainers = {name: Trainer([cfg], ["unused"], dataclasses.replace(opts, fast_path=name.split()[0]))
                for name in names}
    per_step, n_train = cfg.images_per_step, len(trainers["off"].data.train)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).to(device)
    losses = {name: [] for name in names}
    setup = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        start = time.perf_counter()
        for step in range(check_steps):
            index = order[(step * per_step) % (n_train - per_step):][:per_step]
            (loss,), _ = trainer.train_step([index], cfg.lr * (1 - step / (2 * check_steps)))
            losses[name].append(loss.item())
        setup[name] = time.perf_counter() - start
    eager = trainers["off"].model.state_dict()

    def gaps(name: str) -> dict:
        state = trainers[name].model.state_dict()
        weights = max(((state[k].float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1)).item()
                      for k, v in eager.items() if v.is_floating_point())
        loss = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[name], losses["off"]))
        return {"max_relative_loss_gap": loss, "max_relative_weight_gap": weights}
    compared = {name: gaps(name) for name in names[1:]}  # before timing trains them on

    cursor = [0]

    def step_of(trainer):
        def step():
            start = cursor[0] % (n_train - per_step)
            cursor[0] += per_step
            trainer.train_step([torch.arange(start, start + per_step, device=device)], cfg.lr)
        return step
    rates = {name: [] for name in ("off", *paths)}
    for _ in range(repeats):  # alternate, so that drift in machine speed hits all alike
        for name in rates:
            rates[name].append(steps * per_step / time_steps(step_of(trainers[name]), steps, warmup, device))
    eager_rate = statistics.median(rates["off"])
    return {"model": cfg.model, "norm": cfg.norm, "batch_size": cfg.batch_size, "virtual_gpus": cfg.virtual_gpus,
            "images_per_step": per_step, "precision": "bf16" if trainers["off"].amp else "fp32",
            "device": trainers["off"].describe(trainers["off"].members[0])["device"], "check_steps": check_steps,
            "noise_floor": compared["off (again)"],
            "paths": {name: {"images_per_s": statistics.median(rates[name]), "images_per_s_all": rates[name],
                             "speedup": statistics.median(rates[name]) / eager_rate,
                             "first_steps_seconds": setup[name], **compared.get(name, {})}
                      for name in rates}}


def bench_probes(cfg: RunConfig, opts: RuntimeOptions, steps: int, warmup: int, repeats: int) -> dict:
    """The probes' cost against training, timed alternately in one process: `steps` training
    steps, a probe pass (probes.take at an epoch before the last) and a final one (at the last
    epoch, which adds the test errors over the test set). For a run of cfg.epochs epochs on a
    data set of T training and V test images, the probes cost (epochs + 1) probe passes and one
    test-error pass over V images, against epochs x T images of training steps (evaluation not
    counted, so the share is an upper bound)."""
    device = resolve_device(opts.device)
    trainer = Trainer([cfg], ["unused"], dataclasses.replace(opts, progress=False))
    per_step, n_train = cfg.images_per_step, len(trainer.data.train)
    cursor = [0]

    def train_step():
        start = cursor[0] % (n_train - per_step)
        cursor[0] += per_step
        trainer.train_step([torch.arange(start, start + per_step, device=device)], cfg.lr)

    def take(final: bool) -> float:
        start = time.perf_counter()
        probes.take(trainer.model, trainer.data, trainer.normalize, cfg, epoch=1, final=final,
                    autocast=trainer.autocast, channels_last=trainer.channels_last)
        sync(device)
        return time.perf_counter() - start

    take(True)  # warm-up
    per_image, probe, final = [], [], []
    for _ in range(repeats):
        trainer.model.train()
        per_image.append(time_steps(train_step, steps, warmup, device) / (steps * per_step))
        probe.append(take(False))
        final.append(take(True))
    per_image, probe = statistics.median(per_image), statistics.median(probe)
    per_test_image = max(0.0, statistics.median(final) - probe) / len(trainer.data.test)
    result = {"model": cfg.model, "norm": cfg.norm, "batch_size": cfg.batch_size, "virtual_gpus": cfg.virtual_gpus,
              "precision": "bf16" if trainer.amp else "fp32", "epochs": cfg.epochs,
              "probe_images": len(probes.probe_indices(n_train, cfg.seed, cfg.batch_size)),
              "train_seconds_per_image": per_image, "probe_pass_seconds": probe,
              "test_errors_seconds_per_test_image": per_test_image, "overhead": {}}
    for data in ("sample", "cifar10"):
        train_images, test_images = SIZES[data]
        epoch = train_images * per_image
        result["overhead"][data] = {
            "per_epoch": probe / epoch,
            "final_epoch": (probe + per_test_image * test_images) / epoch,
            "run": ((cfg.epochs + 1) * probe + per_test_image * test_images) / (cfg.epochs * epoch)}
    return result
