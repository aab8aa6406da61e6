"""The registry-built ResNet computes exactly what the model of normlab 0.1 computed.

OldBasicBlock / OldCifarResNet / old_init_weights below are verbatim copies of main's
models.py before the norm zoo (only renamed), with main's GhostBatchNorm2d and make_norm, so
that the comparison does not depend on today's norm classes. Both models are built from the
same seed and trained side by side in one process; losses, weights, running statistics and
evaluation outputs must be bit-identical (never compared with numbers from another machine).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab import rundir, train
from normlab.train import build
from normlab.config import RunConfig, RuntimeOptions
from normlab.models import cifar_resnet
from normlab.norms import NormSpec, parse_norm, set_chunk_size

EPS = 1e-5
STAGE_WIDTHS = (16, 32, 64)


# -- main's norms.py (GhostBatchNorm2d, make_norm) ------------------------------------------------
class OldGhostBatchNorm2d(nn.BatchNorm2d):
    chunk_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.chunk_size
        if not self.training or n is None or x.shape[0] <= n:
            return super().forward(x)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} is not a multiple of the chunk size {n}")
        chunks = x.split(n)
        means = [self.running_mean.clone() for _ in chunks]
        variances = [self.running_var.clone() for _ in chunks]
        out = torch.cat([F.batch_norm(chunk, m, v, self.weight, self.bias, True, self.momentum, self.eps)
                         for chunk, m, v in zip(chunks, means, variances)])
        with torch.no_grad():
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
            self.num_batches_tracked.add_(1)
        return out


def make_norm(spec, num_channels: int, *, layer: str = "") -> nn.Module:
    parsed = spec if isinstance(spec, NormSpec) else parse_norm(spec)
    if parsed.kind == "bn":
        return OldGhostBatchNorm2d(num_channels, eps=EPS)
    groups = parsed.groups_for(num_channels, layer)
    return nn.GroupNorm(groups, num_channels, eps=EPS)


# -- main's models.py ------------------------------------------------------------------------------
class PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the new channels on both sides."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class OldBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormSpec,
                 shortcut: str, name: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, planes, layer=f"{name}.norm1")
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, planes, layer=f"{name}.norm2")
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                    make_norm(norm, planes, layer=f"{name}.shortcut.1"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class OldCifarResNet(nn.Module):
    def __init__(self, depth: int, norm: NormSpec, num_classes: int, shortcut: str):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, 1, 1, bias=False)
        self.norm1 = make_norm(norm, STAGE_WIDTHS[0], layer="norm1")
        stages, in_planes = [], STAGE_WIDTHS[0]
        for s, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(OldBasicBlock(in_planes, planes, stride, norm, shortcut,
                                            name=f"layer{s + 1}.{b}"))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def old_init_weights(model: nn.Module, zero_init_residual: bool = True) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, OldBasicBlock):
                nn.init.zeros_(module.norm2.weight)


def old_cifar_resnet(depth, norm="bn", num_classes=10, shortcut="A", zero_init_residual=True):
    depth = int(str(depth).replace("resnet", ""))
    model = OldCifarResNet(depth, parse_norm(norm), num_classes, shortcut)
    old_init_weights(model, zero_init_residual)
    return model


# -- the comparison ----------------------------------------------------------------------------
def train_side_by_side(norm, depth=8, shortcut="A", chunk=None, channels_last=False, steps=3, device="cpu"):
    torch.manual_seed(0)
    old = old_cifar_resnet(depth, norm, shortcut=shortcut).to(device)
    torch.manual_seed(0)
    new = cifar_resnet(depth, norm, shortcut=shortcut).to(device)
    assert list(old.state_dict()) == list(new.state_dict())  # checkpoints of 0.1 still load
    for name, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[name]), name
    for m in old.modules():
        if isinstance(m, OldGhostBatchNorm2d):
            m.chunk_size = chunk
    set_chunk_size(new, chunk)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = [m.to(memory_format=fmt) for m in (old, new)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in models]
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=data).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (8,), generator=data).to(device)
        losses = []
        for model, optimizer in zip(models, optimizers):
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), (norm, losses)
    for name, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[name]), name
    x = torch.randn(16, 3, 32, 32, generator=data).to(device).contiguous(memory_format=fmt)
    with torch.no_grad():
        assert torch.equal(old.eval()(x), new.eval()(x))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["bn", "gn:4", "ln", "in"])
def test_same_training_steps_and_outputs_as_the_model_of_0_1(norm, exact):
    train_side_by_side(norm, device=exact)


@pytest.mark.gpu
def test_same_with_virtual_gpus_channels_last_option_b_and_resnet20(exact):
    train_side_by_side("bn", chunk=2, channels_last=True, device=exact)
    train_side_by_side("gn:4", depth=20, shortcut="B", steps=2, device=exact)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["bn", "gn:4"])
def test_a_whole_run_gives_the_same_metrics(norm, cifar_fixture, tmp_path, monkeypatch, device):
    cfg = RunConfig(model="resnet8", norm=norm, batch_size=10, epochs=2, data="cifar10")
    opts = RuntimeOptions(data_dir=str(cifar_fixture), progress=False, threads=1, device=str(device),
                          deterministic=device.type == "cuda")
    train.train(cfg, tmp_path / "new", opts)
    monkeypatch.setattr(build, "cifar_resnet", old_cifar_resnet)
    train.train(cfg, tmp_path / "old", opts)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]
    new, old = (strip(rundir.read_metrics(tmp_path / d / rundir.METRICS)) for d in ("new", "old"))
    assert new == old and len(new) == 2
