"""The ablations (mean-only, scale-only, none, SkipInit), in float64 against their formulas."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab import cifar_resnet
from normlab.errors import NormlabError
from normlab.models import BasicBlock
from normlab.norms import (Affine2d, BatchAblation2d, GroupAblation2d, SkipInitScale, make_norm, norm_layers,
                           precise_statistics, set_chunk_size)
from normlab.norms.ablation import group_ablation_reference, mean_only_reference, scale_only_reference
from test_zoo_norms import check_names, compare, randomize

D = torch.float64
SHAPES = [(4, 16, 6, 4), (3, 12, 1, 1), (2, 8, 7, 7)]


@pytest.mark.parametrize("spec,canonical,tag,text,fam", [
    ("bn:mean-only", "bn:mean-only", "bnmean", "BN mean-only", "bn-mean-only"),
    ("BN:Scale-Only", "bn:scale-only", "bnscale", "BN scale-only", "bn-scale-only"),
    ("gn:16:scale-only", "gn:16:scale-only", "gn16scale", "GN G=16 scale-only", "gn-scale-only"),
    ("gn:mean-only", "gn:32:mean-only", "gn32mean", "GN G=32 mean-only", "gn-mean-only"),
    ("gn:cpg=4:mean-only", "gn:cpg=4:mean-only", "gncpg4mean", "GN 4 ch/group mean-only", "gn-mean-only"),
    ("gn:1:scale-only", "ln:scale-only", "lnscale", "LN scale-only", "ln-scale-only"),
    ("in:mean-only", "in:mean-only", "inmean", "IN mean-only", "in-mean-only"),
    ("bn:scale-only+ws", "bn:scale-only+ws", "bnscalews", "BN+WS scale-only", "bn-scale-only+ws"),
    ("none", "none", "none", "no norm", "none"),
    ("none:skipinit", "none:skipinit", "skipinit", "SkipInit (no norm)", "skipinit"),
])
def test_ablation_names_tags_labels_and_families(spec, canonical, tag, text, fam):
    check_names(spec, canonical, tag, text, fam)


@pytest.mark.parametrize("spec,message", [
    ("brn:mean-only", "mean-only applies to bn, gn, ln and in only"),
    ("evonorm-s0:8:scale-only", "use plain evonorm-s0:8"),
    ("none:mean-only", "use plain none"),
    ("bn:mean-only:scale-only", "takes one ablation, at the end"),
    ("gn:mean-only:16", "takes one ablation, at the end"),
    ("none+ws", "WS without a norm after the conv"),
    ("none:skipinit+ws", "WS without a norm after the conv"),
    ("none:4", "use none or none:skipinit"),
    ("gn:5:mean-only", None),  # refused when the model is built: 5 does not divide 16
])
def test_refused_ablations(spec, message):
    with pytest.raises(NormlabError) as err:
        cifar_resnet(8, spec)
    assert message is None or message in str(err.value)


# -- mean-only and scale-only BN -------------------------------------------------------------------
def ablation(spec: str, channels: int, seed: int = 0) -> nn.Module:
    layer = randomize(make_norm(spec, channels).double(), seed)
    with torch.no_grad():
        layer.running.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec,buffer,reference", [("bn:mean-only", "running_mean", mean_only_reference),
                                                   ("bn:scale-only", "running_sq_mean", scale_only_reference)])
def test_bn_ablations_are_the_formula_in_train_and_eval(spec, buffer, reference, shape):
    layer = ablation(spec, shape[1])
    start = getattr(layer, buffer).clone()
    x = torch.randn(shape, dtype=D) * 2 + 0.7
    compare(layer, lambda x: reference(x, start, layer.weight, layer.bias)[0], x)
    assert isinstance(layer, BatchAblation2d) and not hasattr(layer, "running_var")
    layer.eval()
    compare(layer, lambda x: reference(x, getattr(layer, buffer), layer.weight, layer.bias, training=False)[0], x)


def test_ablations_by_hand_on_one_channel():
    x = torch.tensor([1.0, 3.0, -2.0, 6.0], dtype=D).view(2, 1, 2, 1)   # mean 2, mean square 12.5
    mean_only, scale_only = make_norm("bn:mean-only", 1).double(), make_norm("bn:scale-only", 1).double()
    torch.testing.assert_close(mean_only(x).flatten(), torch.tensor([-1.0, 1.0, -4.0, 4.0], dtype=D))
    torch.testing.assert_close(scale_only(x).flatten(), x.flatten() / (12.5 + 1e-5) ** 0.5)
    torch.testing.assert_close(mean_only.running_mean, torch.tensor([0.2], dtype=D))           # 0.9 * 0 + 0.1 * 2
    torch.testing.assert_close(scale_only.running_sq_mean, torch.tensor([0.9 + 1.25], dtype=D))  # 0.9 * 1 + 0.1 * 12.5
    # scale-only does not centre: a shifted input is not normalized to the same output
    assert not torch.allclose(scale_only(x + 5), scale_only(x))
    assert torch.allclose(mean_only(x + 5), mean_only(x))


@pytest.mark.parametrize("spec", ["bn:mean-only", "bn:scale-only"])
def test_running_statistics_over_steps_with_momentum_0_1(spec):
    torch.manual_seed(1)
    layer = make_norm(spec, 5, act=True).double()
    expected = layer.running.clone()
    for _ in range(4):
        x = torch.randn(3, 5, 4, 2, dtype=D) * 3 + 1
        layer(x)
        moment = x.mean(dim=(0, 2, 3)) if spec.endswith("mean-only") else (x ** 2).mean(dim=(0, 2, 3))
        expected = 0.9 * expected + 0.1 * moment
    torch.testing.assert_close(layer.running, expected)


@pytest.mark.parametrize("spec", ["bn:mean-only", "bn:scale-only"])
def test_chunks_equal_each_chunk_alone_and_averaged_buffers(spec):
    ghost = ablation(spec, 6)
    alone = [copy.deepcopy(ghost) for _ in range(3)]
    set_chunk_size(ghost, 2)
    x = torch.randn(6, 6, 4, 3, dtype=D) * 2 + 1
    torch.testing.assert_close(ghost(x), torch.cat([a(c) for a, c in zip(alone, x.split(2))]))
    torch.testing.assert_close(ghost.running, torch.stack([a.running for a in alone]).mean(0))
    whole = copy.deepcopy(alone[0])  # and unlike one batch of 6 (the test can fail)
    assert not torch.allclose(ghost(x), whole(x))


@pytest.mark.parametrize("spec", ["bn:mean-only", "bn:scale-only"])
def test_virtual_gpus_equal_chunks_through_the_whole_model(spec):
    torch.manual_seed(0)
    model = cifar_resnet("resnet8", spec, zero_init_residual=False).double()
    plain = copy.deepcopy(model)
    set_chunk_size(model, 2)
    x = torch.randn(6, 3, 32, 32, dtype=D)
    torch.testing.assert_close(model(x), torch.cat([copy.deepcopy(plain)(c) for c in x.split(2)]))


@pytest.mark.parametrize("spec", ["bn:mean-only", "bn:scale-only"])
def test_precise_statistics_set_the_pooled_moment(spec):
    torch.manual_seed(0)
    model = randomize(cifar_resnet("resnet8", spec).double())
    set_chunk_size(model, 2)
    target = model.layer2[0].norm1
    inputs = []
    handle = target.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    before = target.running.clone()
    with precise_statistics(model, [torch.randn(4, 3, 32, 32, dtype=D) for _ in range(2)]):
        handle.remove()
        seen = torch.cat(inputs)
        moment = seen.mean(dim=(0, 2, 3)) if spec.endswith("mean-only") else (seen ** 2).mean(dim=(0, 2, 3))
        torch.testing.assert_close(target.running, moment)
    assert torch.equal(target.running, before)


# -- mean-only and scale-only GN -------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["mean-only", "scale-only"])
def test_group_ablations_are_the_formula(shape, mode):
    for groups in (1, 2, shape[1]):
        layer = randomize(make_norm(f"gn:{groups}:{mode}", shape[1], act=False).double())
        assert isinstance(layer, GroupAblation2d) and layer.num_groups == groups
        x = torch.randn(shape, dtype=D) * 2 + 0.3
        reference = lambda x: group_ablation_reference(x, groups, mode, layer.weight, layer.bias)
        compare(layer, reference, x)
        compare(layer.eval(), reference, x)   # no batch dependence, no running statistics
        torch.testing.assert_close(layer(x), torch.cat([layer(x[i:i + 1]) for i in range(len(x))]))


def test_group_ablation_act_is_relu_and_layers_are_recorded():
    layer = randomize(make_norm("ln:scale-only", 4, act=True).double())
    x = torch.randn(2, 4, 3, 3, dtype=D)
    torch.testing.assert_close(layer(x), F.relu(group_ablation_reference(x, 1, "scale-only", layer.weight, layer.bias)))
    layers = norm_layers(cifar_resnet(20, "gn:16:mean-only"))
    assert layers["norm1"] == {"channels": 16, "groups": 16} and layers["layer3.0.norm2"] == {"channels": 64, "groups": 16}


# -- no normalization ------------------------------------------------------------------------------
def identity_network_output(model, x):
    """A ResNet whose every block is the identity: the stem, then option A's subsampling and
    zero-padding at each stage change, pooling and the classifier."""
    out = model.norm1(model.conv1(x))
    for stage in (model.layer2, model.layer3):
        out = stage[0].shortcut(out)
    return model.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("spec", ["none", "none:skipinit"])
def test_no_norm_starts_every_block_as_the_identity_and_trains(spec):
    torch.manual_seed(0)
    model = cifar_resnet(20, spec).double()
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    if spec == "none":
        assert all(isinstance(b.norm1, Affine2d) and b.norm1.act and torch.all(b.norm2.weight == 0) for b in blocks)
    else:
        assert all(isinstance(b.norm2, SkipInitScale) and b.norm2.weight.shape == () and b.norm2.weight == 0
                   and b.norm1.weight is None for b in blocks)
    x = torch.randn(3, 3, 32, 32, dtype=D)
    torch.testing.assert_close(model(x), identity_network_output(model, x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # after one step the last layers are no longer 0 and every weight learns
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_none_is_the_affine_alone_and_skipinit_the_scalar():
    layer = randomize(make_norm("none", 4).double())
    x = torch.randn(2, 4, 3, 3, dtype=D)
    torch.testing.assert_close(layer(x), layer.weight.view(1, -1, 1, 1) * x + layer.bias.view(1, -1, 1, 1))
    assert torch.equal(make_norm("none:skipinit", 4, act=True)(x.float()), F.relu(x.float()))
    scale = make_norm("none:skipinit", 4, branch_end=True).double()
    with torch.no_grad():
        scale.weight.fill_(0.3)
    compare(scale, lambda x: x * scale.weight, x)
    assert sum(p.numel() for p in scale.parameters()) == 1
    # option B's projection keeps its layer (not SkipInit's scalar), so the shortcut carries signal
    model = cifar_resnet(8, "none:skipinit", shortcut="B")
    assert isinstance(model.layer2[0].shortcut[1], Affine2d)


@pytest.mark.parametrize("spec", ["bn:mean-only", "bn:scale-only", "gn:16:scale-only", "none", "none:skipinit"])
def test_ablations_run_under_bf16_autocast(spec):
    model = cifar_resnet(8, spec)
    set_chunk_size(model, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_report_draws_every_ablation_apart_from_its_norm():
    from normlab.report import labels
    for spec in ("bn:mean-only", "bn:scale-only", "ln:mean-only", "in:scale-only", "gn:16:mean-only",
                 "gn:cpg=4:scale-only", "none", "none:skipinit"):
        assert labels.family(spec) in labels.FAMILIES, spec
    why = ["bn", "bn:mean-only", "bn:scale-only", "gn:16", "gn:16:mean-only", "gn:16:scale-only", "none",
           "none:skipinit"]
    style = labels.styles(why)
    assert len({style[n]["color"] for n in why}) == len(why)                  # every norm its own colour
    every = ["bn", "bn:mean-only", "bn:scale-only", "ln", "ln:mean-only", "ln:scale-only", "in:mean-only",
             "gn:16", "gn:16:mean-only", "gn:16:scale-only", "brn+pbn", "none", "none:skipinit", "evonorm-b0+pbn"]
    every = [n for n in every if "+pbn" not in n] + ["brn@precise-bn=512", "evonorm-b0:16@precise-bn=512"]
    style = labels.styles(every)
    assert len({style[n]["marker"] for n in every}) == len(every)             # and its own marker
    assert labels.sweep_value("gn:16:mean-only", "groups") is None  # not a point of the group sweep


@pytest.mark.parametrize("spec", ["bn:mean-only", "bn:scale-only", "gn:4:mean-only", "ln:scale-only", "none"])
def test_ablations_fuse_into_run_arrays(spec):
    from normlab.config import RunConfig
    from normlab.train.array import Network
    from normlab.train.build import initial_model

    models = [initial_model(RunConfig(model="resnet8", norm=spec, seed=s, zero_init_residual=False,
                                      virtual_gpus=2, batch_size=2), 10) for s in (0, 1)]
    network = Network(models)
    xs = [torch.randn(4, 3, 16, 16) for _ in models]
    outs = network.split(network.model(network.join(xs)))
    for out, model, x in zip(outs, models, xs):
        torch.testing.assert_close(out, model(x))
    for lone, fused in zip(models[1].state_dict().values(), network.state(1).values()):
        torch.testing.assert_close(lone, fused)


def test_skipinit_runs_train_alone_not_fused():
    from normlab.train.array import fusable
    assert "SkipInit's alpha" in fusable("none:skipinit") and fusable("none") is None
