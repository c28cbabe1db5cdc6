"""Where work runs: the device chosen once and passed down, and what its memory allows."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lora_lab.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA GPU; use device=cpu")
    return torch.device(name)


def free_memory(device: torch.device) -> int:
    """Bytes free for a batch: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


_CARRIED = "cuda_peak_carried"  # the key in a worker's memory (``carry``) for the peak before a reset


def reset_cuda_peak(device: torch.device, carry: dict) -> None:
    """Start measuring a CUDA device's peak memory afresh (e.g. at a trial's start).

    Args:
        device: A CUDA device.
        carry: The worker's memory (its render plan): the peak from before :class:`PeakMemory`
            reset the allocator's statistics is kept there, not in this module.
    """
    torch.cuda.reset_peak_memory_stats(device)
    carry[_CARRIED] = 0


def cuda_peak_bytes(device: torch.device, carry: dict) -> int:
    """The device's peak allocated memory since :func:`reset_cuda_peak`, across the resets
    that measuring one image's cost makes."""
    return max(carry.get(_CARRIED, 0), torch.cuda.max_memory_allocated(device))


class PeakMemory:
    """Peak memory one call adds: CUDA's allocator statistics, or Linux's resident high-water
    mark (reset through /proc/self/clear_refs). ``bytes`` is None where neither is readable.
    ``carry`` (the worker's memory) keeps the CUDA peak from before the reset."""

    def __init__(self, device: torch.device, carry: Optional[dict] = None):
        self.device = device
        self.carry = {} if carry is None else carry
        self.bytes: Optional[int] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.carry[_CARRIED] = cuda_peak_bytes(self.device, self.carry)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
                self.start = self._hwm()
            except OSError:
                self.start = None
        return self

    @staticmethod
    def _hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise OSError("no VmHWM")

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            try:
                self.bytes = self._hwm() - self.start
            except OSError:
                self.bytes = None
