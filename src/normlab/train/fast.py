"""--fast-path: whole-step paths for small batches on CUDA, where launching kernels costs more
than running them (a ResNet-56 step is about a thousand launches, whatever the batch).

    graph    the whole training step (gather, augmentation, forward, backward, SGD update)
             captured once as a CUDA graph and replayed every step: the step's inputs are
             copied into static buffers and the learning rate lives in a device tensor
    compile  torch.compile(mode="reduce-overhead") of the model: Inductor's kernels replayed as
             CUDA graphs; the optimizer step stays eager

Both compute what the eager step computes, up to float rounding (the update below rounds
lr * momentum-buffer before subtracting it; Inductor fuses differently). Off by default until a
GPU run shows that they pay (benchmarks/gpu/).
"""
from __future__ import annotations

import contextlib

import torch

from ..config import FAST_PATHS
from ..errors import NormlabError

# Real, eager steps before the capture: cuDNN's and autograd's lazy set-up and the optimizer's
# momentum buffers come into being outside the graph (PyTorch's recipe warms up for 3).
WARMUP_STEPS = 3


def check(fast_path: str, device: torch.device, compile_: bool, processes: int) -> None:
    """Refuse a fast path where it cannot work, before anything is built or written."""
    if fast_path not in FAST_PATHS:
        raise NormlabError(f"unknown fast path '{fast_path}'; use one of: {', '.join(FAST_PATHS)}")
    if fast_path == "off":
        return
    if device.type != "cuda":
        raise NormlabError(f"--fast-path {fast_path} needs a CUDA device (it replays CUDA graphs) and this "
                           f"run is on {device.type}; drop --fast-path (or use --fast-path off)")
    if compile_:
        raise NormlabError(f"--compile and --fast-path {fast_path} both change how the model runs; "
                           f"choose one of them")
    if processes > 1:
        raise NormlabError(f"--fast-path {fast_path} trains in one process; under torchrun leave it off")


@torch.no_grad()
def sgd_update(optimizer: torch.optim.SGD, lr: torch.Tensor) -> None:
    """torch.optim.SGD's step (momentum, weight decay; no dampening or Nesterov, as normlab
    builds it) on the optimizer's own state, with the learning rate read from the tensor `lr`,
    so that a captured graph reads it afresh at every replay: torch's SGD turns a tensor lr
    into a Python number, a host sync that capture forbids."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["momentum"]:
            bufs = [optimizer.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


class GraphStep:
    """The trainer's step as one CUDA graph (--fast-path graph). Called like the step's core,
    with this step's image indices, crop offsets and flips (one step's worth for every run)
    and its learning rate; returns each run's loss and error count, as the eager step does.

    The first WARMUP_STEPS calls after every (re)build are ordinary eager steps on a side
    stream; the next one captures the step and every later one replays it. The graph holds the
    model's and the optimizer's tensors: the trainer makes a new GraphStep whenever it builds
    a new network or loads a checkpoint (which replaces the optimizer's state).
    capture=False runs the same static-buffer step eagerly: what tests check on the CPU."""

    def __init__(self, trainer, capture: bool = True):
        self.trainer = trainer
        self.capture = capture
        self.device = trainer.device
        self.eager_steps = 0
        self.graph = None
        self.static = None   # index, offsets, flips, lr: the graph's inputs
        self.outputs = None  # losses, wrong: the graph's outputs

    def __call__(self, index, offsets, flips, lr: float):
        trainer = self.trainer
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            with self.side_stream():
                return trainer.compute_step(index, offsets.to(self.device), flips.to(self.device),
                                            trainer.optimizer.step)
        if self.static is None:
            self.static = (index.clone(), offsets.to(self.device), flips.to(self.device),
                           torch.zeros((), device=self.device))
            if self.capture:
                self.record()
        static_index, static_offsets, static_flips, static_lr = self.static
        static_index.copy_(index)
        static_offsets.copy_(offsets)
        static_flips.copy_(flips)
        static_lr.fill_(lr)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = self.body()
        return tuple(out.clone() for out in self.outputs)  # the next replay overwrites them

    def body(self):
        trainer = self.trainer
        index, offsets, flips, lr = self.static
        autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)) \
            if trainer.amp else contextlib.nullcontext  # autocast's weight cache must not outlive a capture
        return trainer.compute_step(index, offsets, flips, lambda: sgd_update(trainer.optimizer, lr), autocast)

    def record(self) -> None:
        """Capture the step (capture runs nothing: this step is the first replay)."""
        self.trainer.optimizer.zero_grad(set_to_none=True)  # backward allocates them in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.body()

    @contextlib.contextmanager
    def side_stream(self):
        if self.device.type != "cuda":
            yield
            return
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)
