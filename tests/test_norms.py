import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab import make_norm
from normlab.errors import NormlabError
from normlab.norms import (GhostBatchNorm2d, canonical_norm, group_norm_reference, parse_norm,
                           set_chunk_size)

SHAPES = [(1, 16, 8, 8), (3, 32, 5, 7), (2, 64, 1, 1), (4, 6, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gn_matches_functional_and_reference_formula(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    c = shape[1]
    for groups in sorted({1, 2, c // 2 or 1, c}):
        if c % groups:
            continue
        layer = make_norm(f"gn:{groups}", c).double()
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
        fast = layer(x)
        expected = F.group_norm(x, groups, layer.weight, layer.bias, eps=1e-5)
        reference = group_norm_reference(x, groups, layer.weight, layer.bias)
        torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)


def test_reference_formula_is_the_papers_by_hand():
    x = torch.arange(2 * 4 * 2 * 3, dtype=torch.float64).reshape(2, 4, 2, 3) ** 1.5
    out = group_norm_reference(x, 2)
    group = x[1, 2:4].flatten()  # sample 1, group 1 = channels 2..3
    mean, var = group.mean(), ((group - group.mean()) ** 2).mean()  # biased variance
    torch.testing.assert_close(out[1, 2:4].flatten(), (group - mean) / torch.sqrt(var + 1e-5))


def test_ln_and_in_are_gn_extremes_with_per_channel_affine():
    x = torch.randn(3, 16, 4, 5, dtype=torch.float64)
    ln, inorm = make_norm("ln", 16).double(), make_norm("in", 16).double()
    assert (ln.num_groups, inorm.num_groups) == (1, 16)
    assert ln.weight.shape == inorm.weight.shape == (16,)
    for layer, groups in ((ln, 1), (inorm, 16)):
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
        torch.testing.assert_close(layer(x), group_norm_reference(x, groups, layer.weight, layer.bias))


def test_cpg_and_default_groups():
    assert make_norm("gn:cpg=4", 64).num_groups == 16
    assert make_norm("gn:cpg=4", 16).num_groups == 4
    assert make_norm("gn", 64).num_groups == 32
    assert canonical_norm("GN:1") == "ln" and canonical_norm("gn:cpg=1") == "in"


def test_group_count_is_clamped_to_channels():
    assert make_norm("gn:32", 16).num_groups == 16
    assert make_norm("gn", 16).num_groups == 16
    assert make_norm("gn:cpg=32", 16).num_groups == 1


def test_groups_that_do_not_divide_are_refused_with_the_choices():
    with pytest.raises(NormlabError, match=r"divides the 16 channels.*layer x.*1, 2, 4, 8, 16"):
        make_norm("gn:6", 16, layer="x")
    with pytest.raises(NormlabError, match="cpg"):
        make_norm("gn:cpg=3", 16)


@pytest.mark.parametrize("spec", ["bx", "gn:0", "gn:-2", "ln:4", "gn:cpg=", "bn:2", ""])
def test_bad_specs(spec):
    with pytest.raises(NormlabError, match="norm"):
        parse_norm(spec)


def test_bn_train_and_eval_modes():
    torch.manual_seed(0)
    bn = make_norm("bn", 8).double()
    x = torch.randn(6, 8, 4, 4, dtype=torch.float64) * 2 + 3
    out = bn(x)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    bn.eval()
    expected = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(bn(x), expected)


@pytest.mark.gpu
def test_ghost_bn_equals_each_chunk_alone(device):
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(8).double().to(device)
    plain = nn.BatchNorm2d(8).double().to(device)
    nn.init.normal_(ghost.weight)
    nn.init.normal_(ghost.bias)
    plain.load_state_dict(ghost.state_dict())
    ghost.chunk_size = 2
    x = torch.randn(8, 8, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    out = ghost(x)
    chunks = [plain(c) for c in x.split(2)]
    torch.testing.assert_close(out, torch.cat(chunks))
    # running statistics: the average of what each chunk alone contributes
    torch.testing.assert_close(ghost.running_mean, 0.1 * torch.stack([c.mean(dim=(0, 2, 3)) for c in x.detach().split(2)]).mean(0))
    out.sum().backward()  # gradients flow


def test_set_chunk_size_leaves_gn_alone():
    model = nn.Sequential(make_norm("bn", 4), make_norm("gn:2", 4))
    set_chunk_size(model, 2)
    assert model[0].chunk_size == 2 and not hasattr(model[1], "chunk_size")
    x = torch.randn(4, 4, 2, 2)
    torch.testing.assert_close(model[1](x), torch.cat([model[1](c) for c in x.split(2)]))
