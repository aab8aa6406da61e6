import pytest
import torch
from torch import nn

from normlab import cifar_resnet
from normlab.errors import NormlabError
from normlab.models import BasicBlock, PadShortcut
from normlab.norms import norm_layers


@pytest.mark.parametrize("depth,params", [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_parameter_counts(depth, params):
    assert sum(p.numel() for p in cifar_resnet(depth).parameters()) == params
    assert sum(p.numel() for p in cifar_resnet(depth, norm="gn:16").parameters()) == params


def test_option_b_has_projections():
    a, b = cifar_resnet(20), cifar_resnet(20, shortcut="B")
    assert sum(p.numel() for p in b.parameters()) > sum(p.numel() for p in a.parameters())


@pytest.mark.parametrize("norm", ["bn", "gn:16", "ln", "in", "gn:cpg=4"])
def test_zero_gamma_in_each_blocks_last_norm(norm):
    model = cifar_resnet(20, norm=norm)
    for module in model.modules():
        if isinstance(module, BasicBlock):
            assert torch.all(module.norm2.weight == 0)
            assert torch.all(module.norm1.weight == 1)
    assert torch.all(model.norm1.weight == 1)
    off = cifar_resnet(20, norm=norm, zero_init_residual=False)
    assert all(torch.all(m.norm2.weight == 1) for m in off.modules() if isinstance(m, BasicBlock))


def test_effective_groups_recorded_and_clamped():
    layers = norm_layers(cifar_resnet(20, norm="gn:32"))
    assert layers["norm1"] == {"channels": 16, "groups": 16}
    assert layers["layer3.2.norm2"] == {"channels": 64, "groups": 32}


def test_divisibility_error_names_layer():
    with pytest.raises(NormlabError, match=r"layer norm1.*1, 2, 4, 8, 16"):
        cifar_resnet(20, norm="gn:3")


def test_option_a_shapes():
    pad = PadShortcut(16)
    out = pad(torch.ones(2, 16, 32, 32))
    assert out.shape == (2, 32, 16, 16)
    assert torch.all(out[:, :8] == 0) and torch.all(out[:, 24:] == 0) and torch.all(out[:, 8:24] == 1)
    model = cifar_resnet(20)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert cifar_resnet(20, num_classes=100).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", ["resnet21", "resnet", "vgg16", "resnet2"])
def test_bad_model_names(name):
    with pytest.raises(NormlabError, match="unknown model"):
        cifar_resnet(name)


def test_convs_use_he_fan_out():
    torch.manual_seed(0)
    conv = cifar_resnet(110).layer3[0].conv2
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.005
    assert isinstance(conv, nn.Conv2d)
