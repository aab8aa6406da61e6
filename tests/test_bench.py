import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.bench import PerSampleCifar, bench_config, ratios, reference_model, training_flops_per_image
from normlab.cli import main
from normlab.config import RunConfig, RuntimeOptions
from normlab.data import Normalizer, augment
from normlab.models import cifar_resnet
from normlab.norms import GhostBatchNorm2d, ReferenceGroupNorm


def test_counted_flops_match_the_known_resnet56_cost():
    assert training_flops_per_image("resnet56", "bn") == pytest.approx(752e6, rel=0.01)


@pytest.mark.parametrize("norm", ["bn", "gn:16", "ln", "in"])
def test_fast_path_computes_the_same_loss_as_the_plain_one(norm):
    torch.manual_seed(0)
    cfg = RunConfig(model="resnet20", norm=norm)
    fast = cifar_resnet("resnet20", norm, zero_init_residual=False).double()
    plain = reference_model(cfg).double()
    plain.load_state_dict(fast.state_dict())
    assert not any(type(m) is torch.nn.GroupNorm for m in plain.modules())
    assert any(isinstance(m, (ReferenceGroupNorm, torch.nn.BatchNorm2d)) for m in plain.modules())
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    loss_fast = F.cross_entropy(fast(x), y)
    loss_plain = F.cross_entropy(plain(x), y)
    torch.testing.assert_close(loss_fast, loss_plain, rtol=1e-9, atol=1e-9)
    # channels_last (the default for BN) computes the same in float32
    fast32, cl = fast.float(), cifar_resnet("resnet20", norm, zero_init_residual=False)
    cl.load_state_dict(fast32.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    torch.testing.assert_close(F.cross_entropy(cl(x.float().contiguous(memory_format=torch.channels_last)), y),
                               F.cross_entropy(fast32(x.float()), y), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_virtual_gpu_bn_equals_chunks_through_plain_bn(device):
    torch.manual_seed(0)
    model = cifar_resnet("resnet8", "bn").double().to(device)
    plain = cifar_resnet("resnet8", "bn").double().to(device)
    plain.load_state_dict(model.state_dict())
    for m in model.modules():
        if isinstance(m, GhostBatchNorm2d):
            m.chunk_size = 2
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, device=device)
    torch.testing.assert_close(model(x), torch.cat([plain(c) for c in x.split(2)]))


def test_augmentation_distribution_matches_the_per_sample_pipeline():
    n = 6000
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 0, :] = 255     # top row: shows the vertical offset
    images[:, :, :, 0] = 128     # left column: shows the horizontal offset and the flip
    np.random.seed(0)
    per_sample = PerSampleCifar(images, torch.zeros(n, dtype=torch.long), (0, 0, 0), (1, 1, 1))
    ref = (torch.stack([per_sample[i][0] for i in range(n)])[:, 0] * 255).round()
    ours = augment(images, torch.Generator().manual_seed(0))[:, 0].float()

    def summary(batch):
        top = (batch[:, :, 5] == 255).float().argmax(1).where(batch[:, :, 5].amax(1) == 255, torch.tensor(-1))
        left = (batch[:, 10, :] == 128).float().argmax(1).where((batch[:, 10, :] == 128).any(1), torch.tensor(-1))
        return torch.bincount(top + 1, minlength=33)[:10].float() / n, torch.bincount(left + 1, minlength=33).float() / n
    for a, b in zip(summary(ours), summary(ref)):
        assert (a - b).abs().max() < 0.03


def test_normalization_is_the_same():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    per_sample = PerSampleCifar(images, torch.zeros(4, dtype=torch.long), mean, std)
    np.random.seed(1)
    x, _ = per_sample[0]
    # recover which crop it took from the seed, then compare with the batched normalizer
    np.random.seed(1)
    oy, ox = np.random.randint(0, 9, size=2)
    flip = np.random.rand() < 0.5
    padded = F.pad(images[:1], (4, 4, 4, 4))[:, :, oy:oy + 32, ox:ox + 32]
    if flip:
        padded = padded.flip(-1)
    torch.testing.assert_close(x, Normalizer(mean, std, "cpu")(padded)[0])


def test_bench_one_config_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    # fp32 only: bf16 autocast on a CPU without native bf16 is emulated, minutes per step on a busy one
    code = main(["bench", "--model", "resnet8", "--norm", "gn:4", "--batch-size", "8", "--steps", "2",
                 "--repeats", "1", "--warmup", "1", "--no-amp", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["normlab_images_per_s"] > 0 and result["reference_images_per_s"] > 0
    assert result["train_flops_per_image"] > 0 and 0 < result["fraction_of_peak"]
    assert result["ratios"] == {"normlab fp32/reference": pytest.approx(result["speedup"])}
    out = capsys.readouterr().out
    assert "speed-up" in out and "measured side by side: normlab fp32/reference " in out
    for option in ("--force", "--checkpoint-every", "--data-dir"):  # the training commands' options
        with pytest.raises(SystemExit):
            main(["bench", option, "1"])
        assert f"unrecognized arguments: {option}" in capsys.readouterr().err


def test_the_ratios_are_those_measured_side_by_side():
    both = {"precisions": {"fp32": {"images_per_s": 100.0}, "bf16": {"images_per_s": 150.0}},
            "reference_images_per_s": 50.0}
    assert ratios(both) == {"bf16/fp32": 1.5, "normlab fp32/reference": 2.0, "normlab bf16/reference": 3.0}
    assert ratios({"precisions": {"bf16": {"images_per_s": 150.0}}}) == {}  # nothing side by side


def test_bench_virtual_gpus_and_its_progress():
    heard = []
    r = bench_config(RunConfig(model="resnet8", norm="bn", batch_size=2, virtual_gpus=4), RuntimeOptions(),
                     steps=2, warmup=1, repeats=1, reference=True, reference_workers=0, progress=heard.append)
    assert r["images_per_step"] == 8 and r["reference_batch_size"] == 2
    assert heard == ["repeat 1/1: normlab fp32", "repeat 1/1: reference fp32"]
    assert set(r["ratios"]) == {"normlab fp32/reference"}  # one precision: no bf16/fp32
