"""Run arrays: R runs of one shape trained as one network (HFTA, Wang et al., MLSys 2021).

The R runs' networks are laid side by side along the channels: the input is [N, 3R, H, W]
(run r's images in channels 3r..3r+2), every convolution becomes one grouped convolution with
R times the channels and groups, every norm works per run because its statistics never cross
a run's channels (BN and its relatives are per channel; GN, LN, IN and EvoNorm-S0 take R times
the groups, and groups are contiguous blocks of channels), option A's zero padding pads each
run's channels, and the classifier is one batched matrix product. So each run computes what it
would alone, up to float rounding: a grouped convolution sums in another order than R
separate ones.

A lone run is an array of one, and then the network is the run's own model, untouched, so a
lone run computes exactly what it always did. For R > 1 each run's parameters, buffers and
optimizer state are stacked from (and split back into) its lone form, so that every run keeps
its own checkpoint in its own directory and can be resumed alone or in another array.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NormlabError
from ..models import PadShortcut
from ..norms import parse_norm

CHANNEL_ATTRIBUTES = ("num_features", "num_channels", "num_groups")


def auto_array_size(cfg, device: str, amp: bool) -> int:
    """How many runs of `cfg` (differing only in their seeds) `--fuse auto` trains as one array:
    where fusing was measured to pay on this kind of device (README, Run arrays; benchmarks/)."""
    if device != "cpu":
        return 1  # not measured on a GPU yet: scripts/gpu-check.sh measures it
    # benchmarks/cpu-fused*.json (AMD EPYC, AVX2, fp32, 1 thread; ResNet-8/20/56, BN and GN):
    # 2 images per step, R = 8 1.57-1.91x; 8 images, R = 3 1.09-1.15x but R = 8 down to 0.95x;
    # 32 images 0.77-1.04x
    if cfg.images_per_step <= 2:
        return 8
    return 3 if cfg.images_per_step <= 8 else 1


def fusable(norm: str) -> str | None:
    """Why runs of this norm cannot be fused (None if they can)."""
    spec = parse_norm(norm)
    if spec.learned_eps:
        return "FRN's learned eps is one scalar per layer, which a fused layer cannot hold per run"
    if spec.skipinit:
        return "SkipInit's alpha is one scalar per residual branch, which a fused layer cannot hold per run"
    return None


class FusedPadShortcut(nn.Module):
    """Option A for R runs: every other pixel, each run's channels zero-padded on both sides."""

    def __init__(self, pad: int, runs: int):
        super().__init__()
        self.pad, self.runs = pad, runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        n, c, h, w = x.shape
        per_run = x.reshape(n, self.runs, c // self.runs, h, w)
        return F.pad(per_run, (0, 0, 0, 0, self.pad, self.pad)).reshape(n, -1, h, w)


class FusedLinear(nn.Module):
    """R linear layers applied to R slices of the features: [N, R*in] -> [N, R*out]."""

    def __init__(self, linear: nn.Linear, runs: int):
        super().__init__()
        self.runs, self.in_features, self.out_features = runs, linear.in_features, linear.out_features
        like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.weight = nn.Parameter(torch.empty(runs * linear.out_features, linear.in_features, **like))
        self.bias = nn.Parameter(torch.empty(runs * linear.out_features, **like)) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.runs
        x = x.reshape(x.shape[0], r, self.in_features).transpose(0, 1)           # [R, N, in]
        w = self.weight.view(r, self.out_features, self.in_features)
        out = torch.bmm(x, w.transpose(1, 2))                                      # [R, N, out]
        if self.bias is not None:
            out = out + self.bias.view(r, 1, self.out_features)
        return out.transpose(0, 1).reshape(x.shape[1], r * self.out_features)


def widen(module: nn.Module, runs: int) -> nn.Module:
    """A copy of a lone model with every layer made for `runs` runs side by side (its tensors are
    placeholders of the right shapes: load stacked states into it)."""
    fused = copy.deepcopy(module)
    _widen_children(fused, runs)
    return fused


def _widen_children(module: nn.Module, runs: int) -> None:
    for name, child in module.named_children():
        setattr(module, name, _widened(child, runs))


def _widened(child: nn.Module, runs: int) -> nn.Module:
    if isinstance(child, nn.Conv2d):
        child.in_channels, child.out_channels, child.groups = (
            child.in_channels * runs, child.out_channels * runs, child.groups * runs)
        _widen_tensors(child, child.out_channels // runs, runs, dim=0)  # [out, in/groups, kh, kw]
        return child
    if isinstance(child, nn.Linear):
        return FusedLinear(child, runs)
    if isinstance(child, PadShortcut):
        return FusedPadShortcut(child.pad, runs)
    own = list(child.named_parameters(recurse=False)) + list(child.named_buffers(recurse=False))
    if own:
        channels = next((getattr(child, a) for a in ("num_features", "num_channels") if hasattr(child, a)), None)
        if channels is None:
            raise NormlabError(f"{type(child).__name__} cannot be fused into a run array (it has no channel "
                               f"count); train its runs with --fuse off")
        for attribute in CHANNEL_ATTRIBUTES:
            if isinstance(getattr(child, attribute, None), int):
                setattr(child, attribute, getattr(child, attribute) * runs)
        _widen_tensors(child, channels, runs)
    _widen_children(child, runs)
    return child


def _widen_tensors(module: nn.Module, channels: int, runs: int, dim: int | None = None) -> None:
    """Replace each parameter and buffer of `module` by one with R times its channel dimension
    (`dim`, or the one dimension of size `channels`)."""
    for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
        for name, tensor in list(tensors.items()):
            if tensor is None or tensor.dim() == 0:
                if kind == "parameter" and tensor is not None:
                    raise NormlabError(f"{type(module).__name__}.{name} is one number per layer, which a "
                                       f"run array cannot hold per run; train its runs with --fuse off")
                continue  # a shared scalar (a step count, a schedule limit): the same for every run
            shape = list(tensor.shape)
            shape[dim if dim is not None else channel_dim(shape, channels, f"{type(module).__name__}.{name}")] *= runs
            wide = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            tensors[name] = nn.Parameter(wide, tensor.requires_grad) if kind == "parameter" else wide


def channel_dim(shape, channels: int, what: str) -> int:
    dims = [d for d, size in enumerate(shape) if size == channels]
    if len(dims) != 1:
        raise NormlabError(f"{what} of shape {tuple(shape)} has no single channel dimension of size "
                           f"{channels}; train its runs with --fuse off")
    return dims[0]


class Layout:
    """How each entry of a lone state dict sits in the fused one: stacked along a dimension
    (cat), or shared by every run (a scalar such as BN's num_batches_tracked)."""

    def __init__(self, lone: dict, fused: dict, runs: int):
        self.runs = runs
        self.dims: dict[str, int | None] = {}
        for key, tensor in lone.items():
            wide = fused[key]
            if wide.shape == tensor.shape:
                self.dims[key] = None
                continue
            dims = [d for d in range(tensor.dim()) if wide.shape[d] == runs * tensor.shape[d]
                    and all(wide.shape[e] == tensor.shape[e] for e in range(tensor.dim()) if e != d)]
            if wide.dim() != tensor.dim() or len(dims) != 1:
                raise NormlabError(f"cannot stack {key}: {tuple(tensor.shape)} into {tuple(wide.shape)}")
            self.dims[key] = dims[0]

    def stack(self, states: list[dict]) -> dict:
        out = {}
        for key, dim in self.dims.items():
            values = [s[key] for s in states]
            if dim is None:
                if any(not torch.equal(v, values[0]) for v in values[1:]):
                    raise NormlabError(f"the runs disagree on {key}, which a run array shares; train "
                                       f"them apart (--fuse off)")
                out[key] = values[0]
            else:
                out[key] = torch.cat(values, dim)
        return out

    def split(self, state: dict, run: int) -> dict:
        return {key: (state[key] if dim is None else state[key].chunk(self.runs, dim)[run].clone())
                for key, dim in self.dims.items()}


class Network:
    """The network of an array of runs: one lone model (R = 1) or the R models fused."""

    def __init__(self, lone_models: list[nn.Module]):
        self.runs = len(lone_models)
        self.template = lone_models[0]
        if self.runs == 1:
            self.model = lone_models[0]
            return
        self.model = widen(lone_models[0], self.runs)
        self.layout = Layout(lone_models[0].state_dict(), self.model.state_dict(), self.runs)
        self.model.load_state_dict(self.layout.stack([m.state_dict() for m in lone_models]))
        self.optimizer_names: list[str] = []

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Note which parameter each of the optimizer's state entries belongs to (its state dict
        numbers them in the order of its parameter groups)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.optimizer_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    # -- the data path: R inputs in, R outputs out --------------------------------------------
    def join(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The R runs' batches [N, 3, H, W] as one input [N, 3R, H, W]."""
        return inputs[0] if self.runs == 1 else torch.cat(inputs, dim=1)

    def repeat(self, x: torch.Tensor) -> torch.Tensor:
        """One batch seen by every run (evaluation)."""
        return x if self.runs == 1 else x.repeat(1, self.runs, 1, 1)

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """The network's output [N, R*classes] as each run's logits [N, classes]."""
        if self.runs == 1:
            return [out]
        return list(out.view(out.shape[0], self.runs, -1).unbind(1))

    # -- each run's own state -----------------------------------------------------------------
    def load(self, states: list[dict]) -> None:
        self.model.load_state_dict(states[0] if self.runs == 1 else self.layout.stack(states))

    def state(self, run: int) -> dict:
        """Run `run`'s model state in its lone form."""
        state = self.model.state_dict()
        return state if self.runs == 1 else self.layout.split(state, run)

    def lone_model(self, run: int) -> nn.Module:
        """A standalone copy of run `run`'s model (for probes and inspection)."""
        model = copy.deepcopy(self.template)
        model.load_state_dict(self.state(run))
        return model

    def optimizer_state(self, state: dict, run: int) -> dict:
        """Run `run`'s part of the optimizer's state dict, in its lone form."""
        if self.runs == 1:
            return state
        lone = {"param_groups": copy.deepcopy(state["param_groups"]), "state": {}}
        for index, values in state["state"].items():
            dim = self.layout.dims[self.optimizer_names[index]]
            lone["state"][index] = {k: (v.chunk(self.runs, dim)[run].clone() if torch.is_tensor(v) and v.dim() else v)
                                    for k, v in values.items()}
        return lone

    def stack_optimizer_states(self, states: list[dict]) -> dict:
        if self.runs == 1:
            return states[0]
        fused = {"param_groups": copy.deepcopy(states[0]["param_groups"]), "state": {}}
        for index in states[0]["state"]:
            dim = self.layout.dims[self.optimizer_names[index]]
            keys = states[0]["state"][index]
            fused["state"][index] = {k: (torch.cat([s["state"][index][k] for s in states], dim)
                                         if torch.is_tensor(keys[k]) and keys[k].dim() else keys[k])
                                     for k in keys}
        return fused
