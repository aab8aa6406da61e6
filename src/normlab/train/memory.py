"""Out of GPU memory is bad input: a batch the GPU cannot hold is refused in one line naming
the fix, before any run directory exists, rather than failing a run halfway.

probe() runs one training step's forward and backward at the run's batch and one evaluation
batch when the trainer is built, and puts everything back as it was. A run that still runs out
(another process took the memory) fails with the same line (Trainer.train_members).
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import NormlabError


def message(trainer, what: str) -> str:
    cfg, device = trainer.cfg, trainer.device
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    runs = f" for {trainer.runs} fused runs" if trainer.runs > 1 else ""
    return (f"out of GPU memory on {device}{f' ({total:.0f} GiB)' if total else ''} in {what}: {cfg.model} at "
            f"{cfg.virtual_gpus} x {cfg.batch_size} images per step{runs} does not fit; lower --batch-size "
            f"or --virtual-gpus{' (or fuse fewer runs)' if trainer.runs > 1 else ''}")


@contextlib.contextmanager
def refused_when_out_of_memory(trainer, what: str):
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise NormlabError(message(trainer, what)) from None


def probe(trainer) -> None:
    """One training step's forward and backward (no update) and one evaluation batch, then the
    model's parameters and statistics put back and its gradients dropped. Uses the first
    training and test images, no random numbers: every generator is left untouched. The
    trainer calls it on CUDA only (on a CPU, memory runs out in the operating system's way)."""
    model, network = trainer.model, trainer.network
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    per_run = trainer.cfg.images_per_step // trainer.dist.world
    count = len(trainer.data.train)
    index = torch.arange(trainer.runs * per_run, device=trainer.device) % count
    offsets = torch.zeros(2, len(index), dtype=torch.long, device=trainer.device)
    flips = torch.zeros(len(index), dtype=torch.bool, device=trainer.device)
    try:
        with refused_when_out_of_memory(trainer, "one training step"):
            model.train()
            trainer.compute_step(index, offsets, flips, update=lambda: None)
        with refused_when_out_of_memory(trainer, "one evaluation batch"), torch.inference_mode(), trainer.autocast():
            model.eval()
            model(network.repeat(trainer.normalize(trainer.data.test.images[:trainer.opts.eval_batch_size])))
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
