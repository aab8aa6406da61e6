"""The probes against hand computations on ResNet-8, and the promise that they change nothing."""
import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab import cifar_resnet
from normlab.norms import make_norm, set_chunk_size
from normlab.probes import effective_rank, mean_cosine, measure, probe_indices, test_errors
from test_zoo_norms import randomize

D = torch.float64
EPS = 1e-5
BN_LAYERS = ["norm1"] + [f"layer{s}.0.norm{i}" for s in (1, 2, 3) for i in (1, 2)]
BLOCKS = ["layer1.0", "layer2.0", "layer3.0"]


def bn_resnet8(seed: int = 0):
    """ResNet-8 with BN over device batches of 2, random weights and running statistics."""
    torch.manual_seed(seed)
    model = randomize(cifar_resnet(8, "bn", zero_init_residual=False).double(), seed)
    for name in BN_LAYERS:
        layer = model.get_submodule(name)
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    set_chunk_size(model, 2)
    return model


def by_hand(model, x, chunk=2):
    """ResNet-8's training forward written out: BN by its formula over each chunk of `chunk`
    images. Returns the logits, the features and what each layer and block saw."""
    seen = {}

    def bn(name, h, act):
        layer = model.get_submodule(name)
        seen[name] = h
        outs = []
        for c in h.split(chunk):
            mean = c.mean(dim=(0, 2, 3), keepdim=True)
            var = ((c - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            outs.append((c - mean) / torch.sqrt(var + EPS) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))
        out = torch.cat(outs)
        return out.clamp_min(0) if act else out

    h = bn("norm1", model.conv1(x), True)
    for name in BLOCKS:
        block = model.get_submodule(name)
        branch = bn(f"{name}.norm2", block.conv2(bn(f"{name}.norm1", block.conv1(h), True)), False)
        skip = block.shortcut(h)
        seen[name] = (h, branch, skip)
        h = (branch + skip).clamp_min(0)
    features = h.mean(dim=(2, 3))
    return model.fc(features), features, seen


def rms(tensors):
    return math.sqrt(sum(float((t.detach() ** 2).sum()) for t in tensors) / sum(t.numel() for t in tensors))


def values(rows, probe):
    return {(r["layer"], r["depth"]): r["value"] for r in rows if r["probe"] == probe}


def test_every_probe_equals_the_hand_computation_on_resnet8():
    model = bn_resnet8()
    images, labels = torch.randn(8, 3, 32, 32, dtype=D), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    rows = measure(model, images, labels, epoch=3, device_batch=2, batch=4)
    assert all(r["epoch"] == 3 for r in rows)
    # one device batch per forward pass, or all at once, or a model that trains on one device
    # (no chunks): the same statistics, and the model's chunk size is left as it was
    assert values(rows, "batch_mean_shift") == pytest.approx(
        values(measure(model, images, labels, epoch=3, device_batch=2, batch=2), "batch_mean_shift"), rel=1e-12)
    set_chunk_size(model, None)
    assert values(rows, "batch_mean_shift") == pytest.approx(
        values(measure(model, images, labels, epoch=3, device_batch=2), "batch_mean_shift"), rel=1e-12)
    assert model.norm1.chunk_size is None
    set_chunk_size(model, 2)

    steps = [by_hand(model, images[i:i + 4]) for i in (0, 4)]
    shift, ratio = values(rows, "batch_mean_shift"), values(rows, "batch_log_std_ratio")
    assert len(shift) == len(ratio) == 7
    for depth, name in enumerate(BN_LAYERS, 1):
        layer = model.get_submodule(name)
        unit = torch.sqrt(layer.running_var + EPS)
        shifts, logs = [], []
        for _, _, seen in steps:
            for c in seen[name].split(2):                      # each device batch of 2 images
                mean = c.mean(dim=(0, 2, 3))
                std = torch.sqrt(((c - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3)) + EPS)
                shifts.append((mean - layer.running_mean) / unit)
                logs.append(torch.log(std / unit))
        assert shift[(name, depth)] == pytest.approx(rms(shifts), rel=1e-9)
        assert ratio[(name, depth)] == pytest.approx(rms(logs), rel=1e-9)

    for probe, i in (("block_input_rms", 0), ("branch_rms", 1), ("skip_rms", 2)):
        got = values(rows, probe)
        for depth, name in enumerate(BLOCKS, 1):
            assert got[(name, depth)] == pytest.approx(rms([s[2][name][i] for s in steps]), rel=1e-9)
    for depth, name in enumerate(BLOCKS, 1):
        assert values(rows, "branch_skip_ratio")[(name, depth)] == pytest.approx(
            values(rows, "branch_rms")[(name, depth)] / values(rows, "skip_rms")[(name, depth)])

    logits = torch.cat([s[0] for s in steps])
    convs = ["conv1"] + [f"{b}.conv{i}" for b in BLOCKS for i in (1, 2)] + ["fc"]
    weights = [model.get_submodule(name).weight for name in convs]
    expected = torch.autograd.grad(F.cross_entropy(logits, labels), weights)
    grad = values(rows, "grad_norm")
    assert sorted(grad) == sorted((name, d) for d, name in enumerate(convs, 1))
    for depth, (name, g) in enumerate(zip(convs, expected), 1):
        assert grad[(name, depth)] == pytest.approx(float(g.norm()), rel=1e-9)

    features = torch.cat([s[1] for s in steps]).detach().numpy()
    singular = np.linalg.svd(features, compute_uv=False)
    p = singular / singular.sum()
    assert values(rows, "feature_effective_rank")[("fc", None)] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    pairs = [(i, j) for i in range(8) for j in range(8) if i != j]
    cosines = [features[i] @ features[j] / np.linalg.norm(features[i]) / np.linalg.norm(features[j]) for i, j in pairs]
    assert values(rows, "feature_mean_cosine")[("fc", None)] == pytest.approx(np.mean(cosines))


def test_rank_and_cosine_on_matrices_known_by_heart():
    assert effective_rank(torch.eye(3)) == pytest.approx(3)
    assert effective_rank(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])) == pytest.approx(2)
    assert effective_rank(torch.tensor([[1.0, 2.0], [2.0, 4.0], [-1.0, -2.0]])) == pytest.approx(1)
    assert mean_cosine(torch.eye(4)) == pytest.approx(0)
    assert mean_cosine(torch.ones(5, 3)) == pytest.approx(1)
    assert mean_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))


def test_the_mean_only_shift_is_in_the_probe_sets_pooled_std():
    torch.manual_seed(0)
    model = randomize(cifar_resnet(8, "bn:mean-only").double())
    model.norm1.running_mean.normal_()
    set_chunk_size(model, 2)
    images = torch.randn(8, 3, 32, 32, dtype=D)
    rows = measure(model, images, torch.zeros(8, dtype=torch.long), epoch=1, device_batch=2)
    seen = model.conv1(images).detach()                      # the stem norm's input, by hand
    unit = torch.sqrt(seen.var(dim=(0, 2, 3), unbiased=False) + EPS)
    shifts = [(c.mean(dim=(0, 2, 3)) - model.norm1.running_mean) / unit for c in seen.split(2)]
    assert values(rows, "batch_mean_shift")[("norm1", 1)] == pytest.approx(rms(shifts), rel=1e-9)
    assert not values(rows, "batch_log_std_ratio")        # mean-only does not divide


@pytest.mark.parametrize("spec,center,scale", [
    ("bn", "mean", "std"), ("brn", "mean", "std"), ("evonorm-b0", None, "std"),
    ("bn:mean-only", "mean", None), ("bn:scale-only", None, "rms")])
def test_each_statistics_layer_says_what_it_normalizes_by(spec, center, scale):
    layer = randomize(make_norm(spec, 5, act=True).double())
    set_chunk_size(layer, 3)
    x = torch.randn(6, 5, 4, 4, dtype=D) * 2 + 1
    batch_center, batch_scale = layer.batch_statistics(x)
    chunks = x.view(2, 3, 5, 4, 4)
    mean = chunks.mean(dim=(1, 3, 4))
    formula = {"mean": mean, "std": torch.sqrt(((chunks - mean[:, None, :, None, None]) ** 2).mean(dim=(1, 3, 4)) + EPS),
               "rms": torch.sqrt((chunks ** 2).mean(dim=(1, 3, 4)) + EPS), None: None}
    for got, want in ((batch_center, formula[center]), (batch_scale, formula[scale])):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)
    pop_center, pop_scale = layer.population_statistics()
    buffers = dict(layer.named_buffers())
    expected_scale = {"bn": lambda: torch.sqrt(buffers["running_var"] + EPS), "brn": lambda: buffers["running_std"],
                      "evonorm-b0": lambda: torch.sqrt(buffers["running_var"] + EPS),
                      "bn:scale-only": lambda: torch.sqrt(buffers["running_sq_mean"] + EPS)}
    assert (pop_center is None) == (center is None) and (pop_scale is None) == (scale is None)
    if center:
        torch.testing.assert_close(pop_center, buffers["running_mean"])
    if scale:
        torch.testing.assert_close(pop_scale, expected_scale[spec]())


def test_test_errors_with_batch_and_population_statistics_by_hand():
    model = bn_resnet8(seed=1)
    images = torch.randn(11, 3, 32, 32, dtype=D)
    labels = copy.deepcopy(model).eval()(images).argmax(1)       # population statistics: no error
    rows = test_errors(model, images, labels, epoch=2, device_batch=2, batch=4)   # 10 images: 4, 4, 2
    logits = by_hand(model, images[:10])[0]
    batch = 100 * float((logits.argmax(1) != labels[:10]).double().mean())
    assert batch > 0
    assert {r["probe"]: r["value"] for r in rows} == {"test_error_batch_stats": pytest.approx(batch),
                                                      "test_error_population_stats": 0}
    assert all(r["epoch"] == 2 and r["layer"] == "model" for r in rows)
    assert test_errors(cifar_resnet(8, "gn:4"), images.float(), labels, epoch=2, device_batch=2) == []


def snapshot(model, optimizer):
    return (copy.deepcopy(model.state_dict()), [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(optimizer.state_dict()), torch.get_rng_state(), np.random.get_state()[1].copy(),
            random.getstate(), model.training)


def assert_same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert str(a[2]) == str(b[2])
    assert torch.equal(a[3], b[3]) and np.array_equal(a[4], b[4]) and a[5] == b[5] and a[6] == b[6]


@pytest.mark.parametrize("spec,training", [("bn", True), ("bn", False), ("brn", True), ("evonorm-b0", True),
                                           ("bn:scale-only", True), ("gn:4", False), ("none:skipinit", True)])
def test_probes_change_nothing(spec, training):
    torch.manual_seed(0)
    model = cifar_resnet(8, spec)
    set_chunk_size(model, 2)
    for layer in model.modules():
        if hasattr(layer, "set_limits"):
            layer.set_limits(2.0, 1.0)   # Batch Renorm reads its running statistics in training
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)   # small images: the net pools them
    for _ in range(2):  # momentum buffers, running statistics and .grad all in use
        optimizer.zero_grad()
        F.cross_entropy(model(images[:4]), labels[:4]).backward()
        optimizer.step()
    model.train(training)
    before = snapshot(model, optimizer)
    twin = copy.deepcopy(model)
    rows = measure(model, images, labels, epoch=1, device_batch=2) + test_errors(model, images, labels, epoch=1,
                                                                                  device_batch=2)
    assert rows and all(math.isfinite(r["value"]) for r in rows)
    assert_same(before, snapshot(model, optimizer))
    # and the next training step is the one it would have been without the probes
    model.train(), twin.train()
    torch.testing.assert_close(model(images[4:]), twin(images[4:]), rtol=0, atol=0)


def test_the_probe_set_comes_from_the_seed_alone():
    state = torch.get_rng_state()
    a = probe_indices(4000, seed=1, device_batch=2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(a, probe_indices(4000, seed=1, device_batch=2))
    assert not torch.equal(a, probe_indices(4000, seed=2, device_batch=2))
    assert len(a) == 128 and len(set(a.tolist())) == 128
    assert len(probe_indices(4000, 0, device_batch=48)) == 144     # whole device batches
    assert len(probe_indices(4000, 0, device_batch=512)) == 512    # at least one
    assert len(probe_indices(300, 0, device_batch=256)) == 256     # never beyond the data


def test_every_probe_batch_sees_the_running_statistics_training_would():
    """Batch Renorm's forward reads its running statistics: each probe batch starts from the
    model's, so the order of the batches does not matter (it would if one batch's update
    reached the next)."""
    torch.manual_seed(0)
    model = randomize(cifar_resnet(8, "brn").double())
    for layer in model.modules():
        if hasattr(layer, "set_limits"):
            layer.set_limits(3.0, 5.0)
            layer.momentum = 0.5
    set_chunk_size(model, 2)
    images, labels = torch.randn(8, 3, 16, 16, dtype=D), torch.arange(8)
    swapped = torch.cat([images[4:], images[:4]]), torch.cat([labels[4:], labels[:4]])
    a = measure(model, images, labels, epoch=1, device_batch=2, batch=4)    # two forward passes
    b = measure(model, *swapped, epoch=1, device_batch=2, batch=4)
    assert [(r["layer"], r["probe"]) for r in a] == [(r["layer"], r["probe"]) for r in b]
    for x, y in zip(a, b):
        assert x["value"] == pytest.approx(y["value"], rel=1e-9), (x, y)
