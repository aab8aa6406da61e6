"""The norms GN is compared with, in float64 against their papers' formulas written out."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab import cifar_resnet
from normlab.errors import NormlabError
from normlab.models import BasicBlock
from normlab.norms import (BatchRenorm2d, EvoNormB0, EvoNormS0, FilterResponseNorm2d, GhostBatchNorm2d,
                           RenormRamp, WSConv2d, canonical_norm, family, label, make_conv, make_norm,
                           norm_layers, parse_norm, precise_statistics, set_chunk_size)
from normlab.norms.batch import PAPER_RENORM_STEPS, batch_renorm_reference
from normlab.norms.evonorm import evonorm_b0_reference, evonorm_s0_reference
from normlab.norms.response import frn_reference
from normlab.norms.standardize import standardize_weight

SHAPES = [(1, 8, 5, 3), (4, 16, 6, 4), (3, 12, 1, 1), (2, 8, 7, 7)]
D = torch.float64


def randomize(layer: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return layer


def compare(layer, reference, x, rtol=1e-10, atol=1e-10):
    """Output and every gradient (input and parameters) of `layer` against `reference(x)`."""
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    expected = reference(x)
    expected.backward(grad)
    theirs = [x.grad] + [p.grad for p in layer.parameters()]
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# -- the registry --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,canonical,tag,text,fam", [
    ("bn", "bn", "bn", "BN", "bn"),
    ("GN:16", "gn:16", "gn16", "GN G=16", "gn"),
    ("gn:cpg=4", "gn:cpg=4", "gncpg4", "GN 4 ch/group", "gn"),
    ("gn:1", "ln", "ln", "LN", "ln"),
    ("in", "in", "in", "IN", "in"),
    ("gn:16+ws", "gn:16+ws", "gn16ws", "GN+WS G=16", "gn+ws"),
    ("bn+ws", "bn+ws", "bnws", "BN+WS", "bn+ws"),
    ("ln+ws", "ln+ws", "lnws", "LN+WS", "ln+ws"),
    ("brn", "brn", "brn", "BRN", "brn"),
    ("frn", "frn", "frn", "FRN+TLU", "frn"),
    ("frn:learned-eps", "frn:learned-eps", "frnle", "FRN+TLU (learned eps)", "frn"),
    ("evonorm-s0", "evonorm-s0:32", "evos0g32", "EvoNorm-S0 G=32", "evonorm-s0"),
    ("evonorm-s0:8", "evonorm-s0:8", "evos0g8", "EvoNorm-S0 G=8", "evonorm-s0"),
    ("evonorm-b0", "evonorm-b0", "evob0", "EvoNorm-B0", "evonorm-b0"),
])
def test_specs_names_tags_labels_and_families(spec, canonical, tag, text, fam):
    check_names(spec, canonical, tag, text, fam)
    assert label("bn", precise_bn=512) == "BN + PreciseBN"


def check_names(spec, canonical, tag, text, fam):
    """A spec's canonical form, run-id tag, label and family; the canonical form parses alike."""
    assert canonical_norm(spec) == canonical
    assert parse_norm(spec).tag() == tag
    assert label(spec) == text and family(spec) == fam
    assert parse_norm(canonical) == parse_norm(spec)


@pytest.mark.parametrize("spec,message", [
    ("frn:4", "frn:4' takes no such argument"),
    ("evonorm-b0:2", "use plain evonorm-b0"),
    ("brn:3", "use plain brn"),
    ("foo+ws", "unknown norm 'foo' in 'foo+ws'; +ws modifies one of"),
    ("+ws", "+ws modifies one of"),
    ("gn:16+ws+ws", "the only modifier is +ws"),
    ("gn+bs", "the only modifier is +ws"),
    ("evonorm-s0:cpg=4", "positive whole count"),
    ("evonorm-s0:0", "positive count"),
])
def test_bad_new_specs(spec, message):
    with pytest.raises(NormlabError, match="norm") as err:
        parse_norm(spec)
    assert message in str(err.value)


def test_evonorm_groups_are_clamped_and_checked_like_gn():
    with pytest.raises(NormlabError, match=r"evonorm-s0:5 needs a group count that divides the 16 "
                                           r"channels.*layer norm1.*1, 2, 4, 8, 16"):
        cifar_resnet(8, "evonorm-s0:5")
    layers = norm_layers(cifar_resnet(20, "evonorm-s0"))
    assert layers["norm1"] == {"channels": 16, "groups": 16}          # 32 clamped to 16
    assert layers["layer3.0.norm1"] == {"channels": 64, "groups": 32}


@pytest.mark.parametrize("spec", ["brn", "frn", "frn:learned-eps", "evonorm-s0:8", "evonorm-b0",
                                  "gn:16+ws", "bn+ws", "brn+ws"])
def test_every_new_spec_builds_the_resnet_trains_and_zero_inits_the_residual_gamma(spec):
    model = cifar_resnet(20, spec)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(torch.all(b.norm2.weight == 0) and torch.all(b.norm1.weight == 1) for b in blocks)
    assert all(not b.norm2.act and b.norm1.act for b in blocks) and model.norm1.act
    ws = parse_norm(spec).ws
    assert all(isinstance(m, WSConv2d) == ws for m in model.modules() if isinstance(m, nn.Conv2d))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_act_false_forms_are_the_norm_alone():
    frn = make_norm("frn", 8)
    assert frn.tau is None
    for spec in ("evonorm-s0:4", "evonorm-b0"):  # the reference code: gamma * x + beta only
        layer = randomize(make_norm(spec, 8).double())
        x = torch.randn(3, 8, 4, 5, dtype=D)
        torch.testing.assert_close(layer(x), x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))
        assert not any(n.startswith("running") for n, _ in layer.named_buffers())


# -- FRN + TLU -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", [True, False])
def test_frn_matches_the_paper_in_train_and_eval(shape, act):
    layer = randomize(make_norm("frn", shape[1], act=act).double())
    x = torch.randn(shape, dtype=D) * 2 + 0.3
    tau = layer.tau if act else None
    compare(layer, lambda x: frn_reference(x, layer.weight, layer.bias, tau, eps=1e-6), x)
    layer.eval()
    compare(layer, lambda x: frn_reference(x, layer.weight, layer.bias, tau, eps=1e-6), x)
    # per sample and channel: each image alone gives the same output (no batch dependence)
    torch.testing.assert_close(layer(x), torch.cat([layer(x[i:i + 1]) for i in range(len(x))]))


def test_frn_eps_is_the_papers_and_can_be_learned():
    x = torch.randn(2, 4, 3, 3, dtype=D) * 1e-3  # nu^2 ~ 1e-6: the eps matters
    layer = make_norm("frn", 4, act=True).double()
    torch.testing.assert_close(layer(x), frn_reference(x, layer.weight, layer.bias, layer.tau, eps=1e-6))
    assert not torch.allclose(layer(x), frn_reference(x, layer.weight, layer.bias, layer.tau, eps=1e-5))
    learned = randomize(make_norm("frn:learned-eps", 4, act=True).double())
    with torch.no_grad():
        learned.eps.fill_(-2e-6)  # enters as |eps|
    assert isinstance(learned.eps, nn.Parameter)
    compare(learned, lambda x: frn_reference(x, learned.weight, learned.bias, learned.tau, eps=learned.eps), x)


# -- EvoNorm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_evonorm_s0_matches_the_reference_code(shape):
    for groups in (1, 4, shape[1]):
        layer = randomize(make_norm(f"evonorm-s0:{groups}", shape[1], act=True).double())
        x = torch.randn(shape, dtype=D) * 2 + 0.3
        reference = lambda x: evonorm_s0_reference(x, groups, layer.v, layer.weight, layer.bias, eps=1e-5)
        compare(layer, reference, x)
        compare(layer.eval(), reference, x)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] > 1])
def test_evonorm_b0_matches_the_reference_code_in_train_and_eval(shape):
    layer = randomize(make_norm("evonorm-b0", shape[1], act=True).double())
    x = torch.randn(shape, dtype=D) * 2 + 0.3
    start = layer.running_var.clone()
    compare(layer, lambda x: evonorm_b0_reference(x, start, layer.v, layer.weight, layer.bias)[0], x)
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 2.0)
    layer.eval()
    compare(layer, lambda x: evonorm_b0_reference(x, layer.running_var, layer.v, layer.weight, layer.bias,
                                                  training=False)[0], x)


def test_evonorm_b0_running_variance_is_biased_with_decay_0_9():
    torch.manual_seed(1)
    layer = make_norm("evonorm-b0", 6, act=True).double()
    expected = torch.ones(6, dtype=D)
    for _ in range(4):
        x = torch.randn(3, 6, 4, 2, dtype=D) * 3
        layer(x)
        expected = 0.9 * expected + 0.1 * x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.running_var, expected)
    bessel = 0.9 * expected + 0.1 * x.var(dim=(0, 2, 3), unbiased=True)  # timm's choice differs
    assert not torch.allclose(layer.running_var, bessel)


# -- Batch Renorm ----------------------------------------------------------------------------------
def brn_with_state(channels, r_max, d_max, seed=0):
    layer = randomize(BatchRenorm2d(channels).double(), seed)
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_std.uniform_(0.5, 2.0)
    layer.set_limits(r_max, d_max)
    return layer


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] > 1])
@pytest.mark.parametrize("limits", [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)])
def test_batch_renorm_is_algorithm_1(shape, limits):
    layer = brn_with_state(shape[1], *limits)
    mean, std = layer.running_mean.clone(), layer.running_std.clone()
    x = torch.randn(shape, dtype=D) * 2 + 0.7

    def reference(x):
        return batch_renorm_reference(x, mean, std, layer.weight, layer.bias, *limits, momentum=0.01)[0]
    compare(layer, reference, x)  # the gradient of the reference treats r and d as constants
    _, new_mean, new_std = batch_renorm_reference(x, mean, std, layer.weight, layer.bias, *limits, momentum=0.01)
    torch.testing.assert_close(layer.running_mean, new_mean)  # running mean and std, alpha = 0.01
    torch.testing.assert_close(layer.running_std, new_std)
    layer.eval()
    compare(layer, lambda x: batch_renorm_reference(x, layer.running_mean, layer.running_std, layer.weight,
                                                    layer.bias, *limits, training=False)[0], x)


def test_batch_renorm_r_and_d_carry_no_gradient():
    layer = brn_with_state(4, 3.0, 5.0)
    x = torch.randn(5, 4, 3, 3, dtype=D, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ours = x.grad.clone()
    # the same formula with gradients through r and d gives another gradient: the test can fail
    shape = (1, -1, 1, 1)
    mu = x.mean(dim=(0, 2, 3))
    sigma = torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    r = torch.clamp(sigma / layer.running_std, 1 / 3, 3.0)
    d = torch.clamp((mu - layer.running_mean) / layer.running_std, -5.0, 5.0)
    y = layer.weight.view(shape) * ((x - mu.view(shape)) / sigma.view(shape) * r.view(shape) + d.view(shape)) \
        + layer.bias.view(shape)
    with_grad = torch.autograd.grad(y.pow(2).sum(), x)[0]
    assert not torch.allclose(ours, with_grad, atol=1e-6)


def test_batch_renorm_at_limits_1_and_0_is_bn_with_eps_inside_the_root():
    layer = brn_with_state(4, 1.0, 0.0)
    std = layer.running_std.clone()
    x = torch.randn(6, 4, 3, 5, dtype=D) * 1e-3 + 1  # batch variance ~1e-6: eps matters
    compare(layer, lambda x: F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, 1e-5), x)
    var = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.running_std, 0.99 * std + 0.01 * torch.sqrt(var + 1e-5))
    # eps outside the root (ludvb/batchrenorm) would give another running std
    assert not torch.allclose(layer.running_std, 0.99 * std + 0.01 * (var.sqrt() + 1e-5))


def test_renorm_ramp_follows_the_papers_steps_scaled_to_the_run():
    ramp = RenormRamp()
    at = lambda steps: ramp.limits(steps / PAPER_RENORM_STEPS)
    assert at(0) == (1.0, 0.0) and at(5_000) == (1.0, 0.0)
    assert at(40_000)[0] == pytest.approx(3.0) and at(25_000)[1] == pytest.approx(5.0)
    assert at(100_000) == (3.0, 5.0)
    assert at(22_500)[0] == pytest.approx(2.0) and at(15_000)[1] == pytest.approx(2.5)  # linear
    assert RenormRamp(2.0, 1.0, 0.0, 0.5, 0.5).limits(0.25) == pytest.approx((1.5, 0.5))


# -- chunks (virtual GPUs) and the linearity of running statistics -------------------------------
@pytest.mark.parametrize("spec", ["bn", "brn", "evonorm-b0"])
def test_chunked_statistics_equal_each_chunk_alone_and_averaged_buffers(spec):
    torch.manual_seed(0)
    ghost = randomize(make_norm(spec, 6, act=True).double())
    if spec == "brn":
        ghost.set_limits(2.0, 1.0)
        with torch.no_grad():
            ghost.running_std.uniform_(0.5, 2.0)
    alone = [randomize(make_norm(spec, 6, act=True).double()) for _ in range(3)]
    for a in alone:
        a.load_state_dict(ghost.state_dict())
        if spec == "brn":
            a.set_limits(2.0, 1.0)
    set_chunk_size(ghost, 2)
    x = torch.randn(6, 6, 4, 3, dtype=D) * 2 + 1
    out = ghost(x)
    torch.testing.assert_close(out, torch.cat([a(c) for a, c in zip(alone, x.split(2))]))
    # K processes with the same start, each on its chunk, then their float buffers averaged
    for name, buffer in ghost.named_buffers():
        if buffer.is_floating_point() and name.startswith("running"):
            averaged = torch.stack([dict(a.named_buffers())[name] for a in alone]).mean(0)
            torch.testing.assert_close(buffer, averaged)
    assert isinstance(ghost, (GhostBatchNorm2d, BatchRenorm2d, EvoNormB0))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["brn", "evonorm-b0"])
def test_virtual_gpus_equal_chunks_through_the_whole_model(spec, device):
    torch.manual_seed(0)
    model = cifar_resnet("resnet8", spec, zero_init_residual=False).double().to(device)
    for layer in model.modules():
        if isinstance(layer, BatchRenorm2d):
            layer.running_std.uniform_(0.5, 2.0)
    plain = cifar_resnet("resnet8", spec, zero_init_residual=False).double().to(device)
    plain.load_state_dict(model.state_dict())
    for layer in [*model.modules(), *plain.modules()]:
        if isinstance(layer, BatchRenorm2d):
            layer.set_limits(2.0, 1.0)
    set_chunk_size(model, 2)
    x = torch.randn(6, 3, 32, 32, dtype=D, device=device)
    # each device starts from the same running statistics (Batch Renorm's forward reads them)
    torch.testing.assert_close(model(x), torch.cat([copy.deepcopy(plain)(c) for c in x.split(2)]))


# -- Weight Standardization -----------------------------------------------------------------------
def test_ws_conv_standardizes_per_output_channel_and_leaves_the_weight_alone():
    torch.manual_seed(0)
    conv = make_conv("gn:4+ws", 5, 6, 3, 1, 1).double()
    assert isinstance(conv, WSConv2d) and conv.bias is None
    stored = conv.weight.detach().clone()
    x = torch.randn(2, 5, 7, 6, dtype=D, requires_grad=True)
    out = conv(x)
    torch.testing.assert_close(out, F.conv2d(x, standardize_weight(conv.weight), padding=1))
    out.sum().backward()
    assert torch.equal(conv.weight.detach(), stored)  # never modified in place
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    w = standardize_weight(stored)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=D), atol=1e-12, rtol=0)
    # biased variance, eps inside the root (the paper); the authors' code (unbiased std + eps) differs
    var = stored.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(w, (stored - stored.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(var + 1e-5))
    authors = (stored - stored.mean(dim=(1, 2, 3), keepdim=True)) / (stored.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
    assert (w - authors).abs().max() > 1e-3
    assert type(make_conv("gn:4", 5, 6, 3)) is nn.Conv2d


# -- PreciseBN -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["bn", "brn", "evonorm-b0"])
def test_precise_statistics_pool_the_chunks_and_are_restored_after(spec):
    torch.manual_seed(0)
    model = randomize(cifar_resnet("resnet8", spec).double())
    set_chunk_size(model, 2)
    batches = [torch.randn(4, 3, 32, 32, dtype=D) for _ in range(3)]
    target = model.layer2[0].norm1
    inputs = []
    handle = target.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with precise_statistics(model, batches):
        handle.remove()
        seen = torch.cat(inputs)                       # 12 images = 6 chunks of 2
        mean = seen.mean(dim=(0, 2, 3))
        var = seen.var(dim=(0, 2, 3), unbiased=False)  # biased variance of all the images pooled
        if spec == "brn":
            torch.testing.assert_close(target.running_mean, mean)
            torch.testing.assert_close(target.running_std, torch.sqrt(var + 1e-5))
        elif spec == "bn":
            torch.testing.assert_close(target.running_mean, mean)
            torch.testing.assert_close(target.running_var, var)
        else:
            torch.testing.assert_close(target.running_var, var)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # moving averages back, weights untouched
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["brn", "frn:learned-eps", "evonorm-s0:8", "evonorm-b0", "gn:16+ws"])
def test_new_norms_run_under_bf16_autocast(spec, device):
    model = cifar_resnet(8, spec).to(device)
    set_chunk_size(model, 2)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 32, 32, device=device))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
