"""Which precision a run computes in: bf16 autocast where the device computes bf16 natively.

On CUDA bf16 autocast is the default. On a CPU it pays only where the processor has native bf16
arithmetic (Intel AMX or AVX512-BF16 on x86, the BF16 extension on Arm): there ResNet training
runs about twice as fast, elsewhere bf16 is emulated and slower than fp32. The choice is how a
run is executed, never what is trained: it is recorded in config.json, not in the run id.
Parameters, BN's running statistics and the loss stay in fp32 either way (autocast casts only
the inputs of convolutions and matrix products).
"""
from __future__ import annotations

import platform

import torch


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU?, why), from what PyTorch itself reports about the processor."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        found = [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)]
        if found:
            return True, f"the CPU has native bf16 ({' and '.join(found)})"
        if not capabilities:
            return False, "this torch cannot report the CPU's capabilities"
        return False, "the CPU has no native bf16 (no AMX or AVX512-BF16)"
    if machine in ("aarch64", "arm64"):
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # checks the Arm BF16 extension
            return True, "the CPU has native bf16 (Arm BF16)"
        return False, "the CPU has no native bf16 (no Arm BF16 extension)"
    return False, f"no native bf16 is known for {machine or 'this'} processors"


def choose_amp(device: torch.device, requested: bool | None) -> tuple[bool, str]:
    """(bf16 autocast on?, the reason), for --amp (True), --no-amp (False) or auto (None)."""
    if requested is not None:
        return requested, "--amp" if requested else "--no-amp"
    if device.type == "cuda":
        return True, "auto: bf16 on CUDA"
    if device.type == "cpu":
        native, why = cpu_bf16_support()
        return native, f"auto: {why}"
    return False, f"auto: fp32 on {device.type}"


def describe(amp: bool, reason: str) -> str:
    """One line for the start of a run or study."""
    return f"precision: {'bf16 autocast' if amp else 'fp32'} ({reason})"
