"""Numeric precision and memory layout of a training step: fp32, or bfloat16 autocast and ``channels_last_3d``.

On a GPU both are the paper profile's settings. On a CPU, PyTorch's autocast to bfloat16 runs through oneDNN and is
only worth it where the CPU has bf16 units (``avx512_bf16``, ``amx_bf16``: ``/proc/cpuinfo``); without them a bf16
request is refused with a one-line notice and the step stays fp32. ``channels_last_3d`` is a layout only and is
honoured on both. Whether a profile uses them on CPU is decided by a measured side-by-side
(``bench/precision_side_by_side.py``; the ``cpu`` profile stays fp32: README, "Performance and scale").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix/vector units this CPU reports (``/proc/cpuinfo`` flags): amx_bf16, amx_tile, avx512_bf16."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if f" {f}" in flags + " "]


@dataclass(frozen=True)
class Precision:
    """What a step uses: ``bf16`` autocast, ``channels_last`` layout, and the sentence the log prints."""

    device_type: str
    bf16: bool
    channels_last: bool
    description: str

    def autocast(self):
        """A fresh autocast context (bf16) or a no-op one (fp32)."""
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(memory_format=torch.channels_last_3d) if self.channels_last else module

    def batch(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else image


def plan(device: torch.device, bf16: bool, channels_last: bool) -> Precision:
    """The precision a run on ``device`` gets for the requested ``bf16``/``channels_last``."""
    notes = []
    if bf16 and device.type == "cpu":
        units = cpu_bf16_units()
        if units:
            notes.append(f"bf16 autocast on the CPU's {'/'.join(units)}")
        else:
            notes.append("bf16 requested but this CPU reports no bf16 units (avx512_bf16, amx_bf16): fp32")
            bf16 = False
    elif bf16:
        notes.append("bf16 autocast")
    else:
        notes.append("fp32")
    if channels_last:
        notes.append("channels_last_3d")
    return Precision(device.type, bool(bf16), bool(channels_last), ", ".join(notes))
